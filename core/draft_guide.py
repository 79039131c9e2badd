"""What a drafted sentence may say next, so that a language model can be kept to the facts as it writes.

The grounding verifier (``core.grounding``) judges a finished sentence. This module answers the question a
constrained decoder asks at every token: given the text drafted so far, which digits may come next, may a
unit follow the number just written, which lesion labels may be named, and which claim words would
contradict the lesions the sentence already names. It uses the verifier's own claim words, tolerances and
checks, so a sentence written under its guidance is one the verifier accepts on those counts. No machine
learning here: the decoder (``models.drafter.constrained``) turns the answer into banned tokens.

The guidance covers the failures measured on the fine-tuned drafter: a size that is not a measurement of
the named lesion, a lesion label that does not exist or contradicts what the sentence already claims
("new lesion L2" for an existing L2), and a direction, organ or side word that contradicts a named lesion.
It cannot make the model say anything true that it would not; it only removes choices that the verifier
would reject.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from core.grounding import (
    DIRECTION_WORDS,
    ROUNDING_TOLERANCE,
    SIDE_WORDS,
    SITE_WORDS,
    claim_problems,
    global_numbers,
    known_dates,
    lesion_numbers,
    stated_directions,
    sum_changes_pct,
)
from core.report import LesionFact, ReportFacts

__all__ = ["DraftGuide", "Guidance", "claim_words", "current_sentence"]

# a sentence ends at . ! ? followed by space, at a line break, or at a section heading
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n|\b(?:COMPARISON|FINDINGS|IMPRESSION)\s*:")
_LABEL_AT_END = re.compile(r"\b([LN])(\d*)$")
_COMPLETE_LABEL = re.compile(r"\b([LN]\d{1,3})(?=\W)")
_DATE_AT_END = re.compile(r"\d{4}-(?:\d{1,2}(?:-\d{0,2})?)?$")
_NUMBER_AT_END = re.compile(r"(\d+(?:\.\d*)?)( ?)$")
_WORD_AT_END = re.compile(r"[A-Za-z]+$")
# numbers a report writes that are neither sizes nor dates: "RECIST 1.1", small counts ("2 target lesions")
_OTHER_NUMBERS = frozenset({"1.1", *(str(n) for n in range(1, 10))})


def claim_words() -> dict[str, tuple[str, ...]]:
    """Every single-word claim, keyed ``direction:<change>``, ``site:<organ>`` or ``side:<side>`` (multi-word
    phrases are left out: a decoder bans tokens, and their first word says nothing alone)."""
    groups = {
        **{f"direction:{c.value}": w for c, w in DIRECTION_WORDS.items()},
        **{f"site:{o.value}": w for o, w in SITE_WORDS.items()},
        **{f"side:{s}": w for s, w in SIDE_WORDS.items()},
    }
    return {key: tuple(w for w in words if " " not in w) for key, words in groups.items()}


def current_sentence(text: str) -> str:
    """The unfinished sentence at the end of ``text`` (empty just after a sentence ends)."""
    return _SENTENCE_END.split(text)[-1]


@dataclass(frozen=True, slots=True)
class Guidance:
    """What may follow the text drafted so far.

    ``values``: the strings the digit run being written (``typed``, possibly empty) may complete to; None
    when digits are free (inside a date, or after a letter). ``must_continue``: the run is a lesion label
    that is not yet complete, so only a digit may follow. ``units``: after a number, the units that may
    follow it (``mm``, ``cm``, ``%``, ``x`` for "23 x 17"); None when the text does not end in a number.
    ``banned``: claim keys (see ``claim_words``) the sentence may not use. ``banned_next``: words that may
    not come next because they would finish a banned phrase ("no longer" + "seen"). ``word``: the
    unfinished word at the end of the text.
    """

    values: frozenset[str] | None
    typed: str
    must_continue: bool
    units: frozenset[str] | None
    banned: frozenset[str]
    banned_next: frozenset[str]
    word: str


def _whole_mm(values: list[float]) -> set[str]:
    out: set[str] = set()
    for v in values:
        for k in (math.floor(v), math.ceil(v), round(v)):
            if abs(k - v) <= ROUNDING_TOLERANCE or k == round(v):
                out.add(str(k))
    return out


def _cm(values: list[float]) -> set[str]:
    out: set[str] = set()
    for v in values:
        for c in (math.floor(v) / 10, math.ceil(v) / 10, round(v / 10, 1)):
            if abs(c * 10 - v) <= ROUNDING_TOLERANCE:
                out.add(f"{c:.1f}")
    return out


class DraftGuide:
    """Guidance for one report's facts; ``at(text)`` for the text drafted so far."""

    def __init__(self, facts: ReportFacts) -> None:
        self.facts = facts
        self.by_label = {f.label: f for f in facts.lesions if f.label}
        every = global_numbers(facts) + [v for f in facts.lesions for v in lesion_numbers(f)]
        self._all_mm, self._all_cm = frozenset(_whole_mm(every)), frozenset(_cm(every))
        self._pct = frozenset(_whole_mm([abs(p) for p in sum_changes_pct(facts)]))
        dates: set[str] = set()
        for d in known_dates(facts):
            dates |= {str(d.year), str(d.month), f"{d.month:02d}", str(d.day), f"{d.day:02d}"}
        self._dates = frozenset(dates)

    def _numbers(self, named: list[LesionFact]) -> tuple[frozenset[str], frozenset[str]]:
        if not named:
            return self._all_mm, self._all_cm
        values = [v for f in named for v in lesion_numbers(f)]
        return frozenset(_whole_mm(values)), frozenset(_cm(values))

    def _labels(self, before: str, letter: str) -> frozenset[str]:
        """The labels (their digits) that may be named after ``before``: those that add the fewest problems
        to it (none, when one fits what the sentence already says)."""
        base = set(claim_problems(before, self.facts, self.by_label))
        added = {
            lab[1:]: len(set(claim_problems(f"{before}{lab} ", self.facts, self.by_label)) - base)
            for lab in self.by_label
            if lab.startswith(letter)
        }
        fewest = min(added.values(), default=0)
        return frozenset(digits for digits, n in added.items() if n == fewest)

    def _banned(self, named: list[LesionFact], sentence: str) -> tuple[frozenset[str], frozenset[str]]:
        """The claim keys the sentence may not use, and the words that would finish a banned phrase.

        Once the sentence names lesions, every claim must agree with one of them (as the verifier checks).
        Before that, a direction it states ("New ...") narrows the lesions it can be about, and an organ or
        side that none of those has is not allowed ("New liver lesion" when the new lesion is in the lung).
        """
        about = named or [f for f in self.facts.lesions if f.change in stated_directions(sentence)]
        if not about:
            return frozenset(), frozenset()
        organs = {f.organ.value for f in about}
        sides = {f.laterality for f in about}
        banned = {f"site:{o.value}" for o in SITE_WORDS if o.value not in organs}
        banned |= {f"side:{s}" for s in SIDE_WORDS if s not in sides}
        if not named:
            return frozenset(banned), frozenset()
        changes = {f.change for f in named}
        banned |= {f"direction:{c.value}" for c in DIRECTION_WORDS if c not in changes}
        tail = " ".join(sentence.lower().split()[-3:])
        finishing = {
            phrase.rsplit(" ", 1)[1]
            for c, words in DIRECTION_WORDS.items()
            if c not in changes
            for phrase in words
            if " " in phrase and (" " + tail).endswith(" " + phrase.rsplit(" ", 1)[0])
        }
        return frozenset(banned), frozenset(finishing)

    def at(self, text: str) -> Guidance:
        sentence = current_sentence(text)
        named = [
            self.by_label[lab]
            for lab in dict.fromkeys(_COMPLETE_LABEL.findall(sentence))
            if lab in self.by_label
        ]
        banned, banned_next = self._banned(named, sentence)
        word = m.group(0) if (m := _WORD_AT_END.search(sentence)) else ""

        if label := _LABEL_AT_END.search(sentence):
            values = self._labels(sentence[: label.start()], label.group(1))
            typed = label.group(2)
            return Guidance(
                values, typed, bool(typed) and typed not in values, None, banned, banned_next, word
            )
        if _DATE_AT_END.search(sentence) or word:
            return Guidance(None, "", False, None, banned, banned_next, word)
        mm, cm = self._numbers(named)
        values = mm | cm | self._pct | self._dates | _OTHER_NUMBERS
        number = _NUMBER_AT_END.search(sentence)
        if number is None:
            return Guidance(values, "", False, None, banned, banned_next, word)
        typed, spaced = number.groups()
        units = {"mm"} if typed in mm else set()
        units |= {"cm"} if typed in cm else set()
        units |= {"x"} if typed in mm | cm else set()
        units |= {"%"} if typed in self._pct else set()
        return Guidance(values, "" if spaced else typed, False, frozenset(units), banned, banned_next, word)
