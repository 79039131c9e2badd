"""What a segmentation model expects and returns (its contract), and the model version a source gives.

Interval runs three kinds of segmentation model (``INTERVAL_SEGMENTER_KIND``):

- ``builtin``: the committed UNet weights file (``models/weights/segmenter.pt``), or a retrained one;
- ``bundle``: a MONAI bundle directory (``configs/metadata.json``, ``configs/inference.json`` with a
  ``network_def`` and ``models/model.pt``; or ``models/model.ts``);
- ``torchscript``: a TorchScript file (``torch.jit.save``; MONAI's ``ckpt_export`` writes one with its
  ``metadata.json`` inside).

A user's model must say how it reads the CT and what its output channels mean. Interval cannot guess either:
a model fed the wrong intensity window, or whose "tumor" channel is read as "liver", gives plausible-looking
nonsense. The contract is read from the bundle's (or TorchScript file's) ``metadata.json`` under the key
``"interval"``, and any part of it may be given (or overridden) in settings::

    "interval": {
      "input_windows_hu": [[-160, 240], [-1000, 400]],   one input channel per window: clip((HU-lo)/(hi-lo), 0, 1)
      "output_classes": ["background", "liver", "lung", "lesion"],   one name per output channel
      "spacing_kji_mm": [2.5, 2.0, 2.0],   the grid it was trained on: slice, row, column spacing
      "roi_kji": [48, 96, 96],             the sliding-window patch
      "output": "logits"                   or "probabilities" (already softmax-ed)
    }

Output class names are Interval's labels (``background``, ``liver``, ``lung``, ``lesion``) or ``other`` (a class
Interval does not use, such as spleen: counted as background). Several channels may map to one label (their
probabilities are summed). A bundle whose ``network_data_format.outputs.pred.channel_def`` already uses
Interval's names needs no ``output_classes``.

This module imports no torch: the API process names the model version without loading the model.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapters.settings import Settings
from core.errors import ModelError

__all__ = [
    "BUILTIN_CONTRACT",
    "CLASS_NAMES",
    "ModelContract",
    "ModelSource",
    "bundle_files",
    "read_bundle_metadata",
    "read_torchscript_metadata",
    "source_from_settings",
]

Kind = Literal["builtin", "bundle", "torchscript"]
CLASS_NAMES = ("background", "liver", "lung", "lesion", "other")
_FIELDS = ("input_windows_hu", "output_classes", "spacing_kji_mm", "roi_kji", "output")


@dataclass(frozen=True, slots=True)
class ModelContract:
    """How a model reads HU (``input_windows_hu``), what its channels are (``output_classes``), the grid it
    was trained on (``spacing_kji_mm``) and its patch (``roi_kji``). Checked on construction."""

    input_windows_hu: tuple[tuple[float, float], ...]
    output_classes: tuple[str, ...]
    spacing_kji_mm: tuple[float, float, float]
    roi_kji: tuple[int, int, int]
    output: Literal["logits", "probabilities"] = "logits"

    def __post_init__(self) -> None:
        if not self.input_windows_hu or any(hi <= lo for lo, hi in self.input_windows_hu):
            raise ModelError(
                f"input_windows_hu must be one or more [low, high] HU pairs with high > low, got "
                f"{[list(w) for w in self.input_windows_hu]}"
            )
        unknown = [c for c in self.output_classes if c not in CLASS_NAMES]
        if unknown:
            raise ModelError(
                f"output_classes may only name {', '.join(CLASS_NAMES)}; got {unknown} (map a class Interval "
                "does not use to 'other')"
            )
        if "lesion" not in self.output_classes:
            raise ModelError(
                f"output_classes {list(self.output_classes)} has no 'lesion' channel: Interval measures lesions"
            )
        if len(self.spacing_kji_mm) != 3 or not all(s > 0 for s in self.spacing_kji_mm):
            raise ModelError(
                f"spacing_kji_mm must be three positive numbers, got {list(self.spacing_kji_mm)}"
            )
        if len(self.roi_kji) != 3 or not all(n >= 8 for n in self.roi_kji):
            raise ModelError(f"roi_kji must be three sizes of at least 8 voxels, got {list(self.roi_kji)}")
        if self.output not in ("logits", "probabilities"):
            raise ModelError(f"output must be 'logits' or 'probabilities', got {self.output!r}")

    @classmethod
    def from_declaration(cls, declared: Mapping[str, Any], where: str) -> ModelContract:
        """From the ``"interval"`` section of metadata.json merged with settings; ``where`` names the source
        in the message when a part is missing."""
        missing = [f for f in _FIELDS[:4] if declared.get(f) is None]
        if missing:
            env = ", ".join(f"INTERVAL_SEGMENTER_{f.upper()}" for f in missing)
            raise ModelError(
                f'{where} does not declare {", ".join(missing)}: add them under "interval" in its metadata.json '
                f"or set {env} (see models/segmentation/contract.py)"
            )
        try:
            return cls(
                input_windows_hu=tuple((float(lo), float(hi)) for lo, hi in declared["input_windows_hu"]),
                output_classes=tuple(str(c) for c in declared["output_classes"]),
                spacing_kji_mm=_triple(declared["spacing_kji_mm"], float),
                roi_kji=_triple(declared["roi_kji"], int),
                output=declared.get("output") or "logits",
            )
        except (TypeError, ValueError) as e:
            raise ModelError(f"{where}: the declared contract does not parse ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_windows_hu": [list(w) for w in self.input_windows_hu],
            "output_classes": list(self.output_classes),
            "spacing_kji_mm": list(self.spacing_kji_mm),
            "roi_kji": list(self.roi_kji),
            "output": self.output,
        }


def _triple(v: Any, kind: type[float] | type[int]) -> Any:
    items = [kind(x) for x in v]
    if len(items) != 3:
        raise ValueError(f"expected three numbers, got {len(items)}")
    return (items[0], items[1], items[2])


# The committed network: two windows (encode_hu/v1), Interval's four labels, the synthetic cohort's grid.
BUILTIN_CONTRACT = ModelContract(
    input_windows_hu=((-160.0, 240.0), (-1000.0, 400.0)),
    output_classes=("background", "liver", "lung", "lesion"),
    spacing_kji_mm=(2.5, 2.0, 2.0),
    roi_kji=(48, 96, 96),
)


def read_bundle_metadata(bundle: Path) -> dict[str, Any]:
    """``configs/metadata.json`` of a bundle directory ({} when it has none)."""
    path = bundle / "configs" / "metadata.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(
            f"bundle {bundle.name!r}: configs/metadata.json is not readable JSON ({e})"
        ) from None
    if not isinstance(meta, dict):
        raise ModelError(f"bundle {bundle.name!r}: configs/metadata.json is not a JSON object")
    return meta


def bundle_files(bundle: Path) -> tuple[Path | None, Path | None, Path | None]:
    """(inference config, model.pt, model.ts) of a bundle directory, each None when absent."""
    config = next(
        (
            bundle / "configs" / n
            for n in ("inference.json", "inference.yaml", "inference.yml")
            if (bundle / "configs" / n).is_file()
        ),
        None,
    )
    pt, ts = bundle / "models" / "model.pt", bundle / "models" / "model.ts"
    return config, pt if pt.is_file() else None, ts if ts.is_file() else None


def read_torchscript_metadata(path: Path) -> dict[str, Any]:
    """The ``metadata.json`` a TorchScript file carries as an extra file ({} when none). A TorchScript file is
    a zip archive: read without torch, so that the API process can name the model version."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/extra/metadata.json")), None)
            if name is None:
                return {}
            meta = json.loads(z.read(name) or b"{}")
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ModelError(
            f"TorchScript model {path.name!r} is not a readable TorchScript archive ({e})"
        ) from None
    return meta if isinstance(meta, dict) else {}


def _channel_def_classes(meta: Mapping[str, Any]) -> list[str] | None:
    """Output classes from a bundle's ``network_data_format`` when they are already Interval's names."""
    try:
        outputs = meta["network_data_format"]["outputs"]
        channel_def = next(iter(outputs.values()))["channel_def"]
        names = [str(channel_def[str(i)]).lower() for i in range(len(channel_def))]
    except (KeyError, TypeError, StopIteration, AttributeError):
        return None
    return names if all(n in CLASS_NAMES for n in names) else None


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where the segmentation model comes from, with what the settings declare about it (``declared``: any
    of the contract's fields; they override the model's own metadata)."""

    kind: Kind
    path: Path
    declared: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("builtin", "bundle", "torchscript"):
            raise ModelError(f"segmenter kind must be builtin, bundle or torchscript, got {self.kind!r}")
        if self.kind == "bundle" and not self.path.is_dir():
            raise ModelError(f"MONAI bundle {str(self.path)!r} is not a directory (INTERVAL_SEGMENTER_MODEL)")
        if self.kind != "bundle" and not self.path.is_file():
            hint = (
                "run 'make weights' or set INTERVAL_SEGMENTER_WEIGHTS to a weights file"
                if self.kind == "builtin"
                else "set INTERVAL_SEGMENTER_MODEL to a TorchScript file"
            )
            raise ModelError(f"segmentation model {self.path.name!r} not found; {hint}")

    def contract(self) -> ModelContract:
        """The contract: settings over the model's own metadata (``"interval"``, then the output
        ``channel_def`` when it uses Interval's names); the built-in's is fixed."""
        if self.kind == "builtin":
            return BUILTIN_CONTRACT
        meta = (
            read_torchscript_metadata(self.path)
            if self.kind == "torchscript"
            else read_bundle_metadata(self.path)
        )
        section = meta.get("interval") or {}
        if not isinstance(section, Mapping):
            raise ModelError(f"{self.describe()}: metadata 'interval' must be a JSON object")
        merged: dict[str, Any] = {}
        classes = _channel_def_classes(meta)
        if classes is not None:
            merged["output_classes"] = classes
        merged.update({k: v for k, v in section.items() if k in _FIELDS})
        merged.update({k: v for k, v in self.declared.items() if k in _FIELDS and v is not None})
        return ModelContract.from_declaration(merged, self.describe())

    def describe(self) -> str:
        return {"builtin": "weights", "bundle": "MONAI bundle", "torchscript": "TorchScript model"}[
            self.kind
        ] + f" {self.path.name!r}"

    def version(self) -> str:
        """The model version results are keyed with: a digest of the model's files and of its contract.

        The built-in keeps its historical form ``interval-seg-unet-<sha256[:12] of the weights>``."""
        h = hashlib.sha256()
        if self.kind == "builtin":
            h.update(self.path.read_bytes())
            return f"interval-seg-unet-{h.hexdigest()[:12]}"
        if self.kind == "torchscript":
            h.update(self.path.read_bytes())
            prefix = "torchscript"
        else:
            config, pt, ts = bundle_files(self.path)
            for f in (self.path / "configs" / "metadata.json", config, pt if pt is not None else ts):
                if f is not None:
                    h.update(f.name.encode() + b"\0" + f.read_bytes())
            meta = read_bundle_metadata(self.path)
            name = "".join(
                c if c.isalnum() or c in "-_." else "_" for c in str(meta.get("name") or self.path.name)
            )
            prefix = f"bundle-{name[:40]}" + (f"-{meta['version']}" if meta.get("version") else "")
        h.update(json.dumps(self.contract().to_dict(), sort_keys=True).encode())
        return f"{prefix}-{h.hexdigest()[:12]}"


def source_from_settings(settings: Settings) -> ModelSource:
    """The model the settings choose (``INTERVAL_SEGMENTER_KIND``, ``_WEIGHTS``, ``_MODEL`` and the contract)."""
    if settings.segmenter_kind == "builtin":
        return ModelSource("builtin", settings.segmenter_weights)
    assert settings.segmenter_model is not None  # Settings refuses a user's kind without a path
    return ModelSource(settings.segmenter_kind, settings.segmenter_model, settings.segmenter_declared())
