"""Measurements read from the text of a prior report, when the EHR holds no structured findings.

Radiology prose such as "Liver lesion L1 has decreased, now 21 x 17 mm (previously 33 x 33 mm)"
or "a 2.3 cm nodule in the right lower lobe" carries site, side and size. Each sentence with an
organ word and a size gives one finding, marked ``source="text"``; parenthesised earlier
measurements ("previously ...") are ignored, as are sentences about resolved lesions and sums.
Findings from text have no position, so the matcher links them by site and size only, with the
lower confidence that it states.
"""

from __future__ import annotations

import re

from core.types import Organ, PriorFinding

__all__ = ["findings_from_text"]

_PAREN_PREVIOUS = re.compile(r"\((?:previously|prior|compared)[^)]*\)", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?;])\s+|\n+")
_DIMS = re.compile(r"(\d+(?:\.\d+)?)\s*(?:x|×|by)\s*(\d+(?:\.\d+)?)\s*(mm|cm)\b", re.IGNORECASE)
_ONE = re.compile(r"(\d+(?:\.\d+)?)\s*(mm|cm)\b", re.IGNORECASE)
_LABEL = re.compile(r"\bL(\d+)\b")
_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_SKIP = re.compile(r"\b(resolved|no longer|sum of|recist|not seen|no evidence)\b", re.IGNORECASE)
_ORGANS: tuple[tuple[re.Pattern[str], Organ], ...] = (
    (re.compile(r"\b(lymph\s*nodes?|nodal|adenopathy|node)\b", re.IGNORECASE), Organ.LYMPH_NODE),
    (re.compile(r"\b(liver|hepatic)\b", re.IGNORECASE), Organ.LIVER),
    (re.compile(r"\badrenal\b", re.IGNORECASE), Organ.ADRENAL),
    (re.compile(r"\b(lung|pulmonary|lobe|nodule)\b", re.IGNORECASE), Organ.LUNG),
)


def _mm(value: str, unit: str) -> float:
    return float(value) * (10.0 if unit.lower() == "cm" else 1.0)


def findings_from_text(text: str, report_key: str) -> tuple[PriorFinding, ...]:
    """Findings stated in ``text``; track ids come from lesion labels ("L3") when the text has them,
    so that the same lesion in several reports keeps one identity."""
    out: list[PriorFinding] = []
    for n, sentence in enumerate(_SENTENCE.split(_PAREN_PREVIOUS.sub("", text))):
        if _SKIP.search(sentence):
            continue
        organ = next((o for pattern, o in _ORGANS if pattern.search(sentence)), None)
        if organ is None:
            continue
        dims = _DIMS.search(sentence)
        if dims:
            a, b = _mm(dims.group(1), dims.group(3)), _mm(dims.group(2), dims.group(3))
        else:
            one = _ONE.search(sentence)
            if not one:
                continue
            a = b = _mm(one.group(1), one.group(2))
        label = _LABEL.search(sentence)
        side = _SIDE.search(sentence)
        out.append(
            PriorFinding(
                track_id=f"text:L{label.group(1)}" if label else f"text:{report_key}:{n}",
                organ=organ,
                long_axis_mm=max(a, b),
                short_axis_mm=min(a, b),
                source="text",
                laterality=side.group(1).lower() if side and organ is Organ.LUNG else None,
                label=f"L{label.group(1)}" if label else "",
            )
        )
    return tuple(out)
