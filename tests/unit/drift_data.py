"""Hand-made study signals for the drift tests: one scanner's values, with knobs for what a swap changes."""

from __future__ import annotations

import numpy as np

from core.drift_signals import StudySignals, Unit

UNIT = Unit("north", "CT-N1")


def study(
    rng: np.random.Generator,
    n: int,
    *,
    noise_hu: float = 5.0,
    liver_shift: float = 0.0,
    manufacturer: str = "GE MEDICAL SYSTEMS",
    unit: Unit = UNIT,
) -> StudySignals:
    return StudySignals(
        f"1.2.826.0.1.3680043.8.498.{n}",
        unit,
        f"{manufacturer} Revolution CT",
        numeric={
            "liver_hu_median": float(rng.normal(106.0 + liver_shift, 3.0)),
            "liver_hu_sd": float(rng.normal(15.0, 1.5)),
            "noise_hu": float(rng.normal(noise_hu, 0.6)),
            "body_hu_median": float(rng.normal(-78.0, 4.0)),
            "lesion_count": float(rng.poisson(3.0)),
            "slice_thickness_mm": 2.5,
        },
        categorical={"manufacturer": manufacturer, "kvp": "120"},
    )


def stream(seed: int, n: int, start: int = 0, **kw: float | str | Unit) -> list[StudySignals]:
    """``n`` studies numbered from ``start`` (the number makes the StudyInstanceUID)."""
    rng = np.random.default_rng(seed)
    return [study(rng, start + i, **kw) for i in range(n)]  # type: ignore[arg-type]
