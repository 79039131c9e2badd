"""Shared fixtures: small synthetic patients generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from fixtures.synth.cohort import CohortOptions, PatientTruth, make_patient
from fixtures.synth.demo import DEMO_OPTIONS, DEMO_PATIENT_INDEX

SMALL = CohortOptions(seed=31, matrix=64, min_time_points=2, max_time_points=2, vendors=("ge", "philips"))


@pytest.fixture(scope="session")
def small_patient(tmp_path_factory: pytest.TempPathFactory) -> PatientTruth:
    """A coarse (64 x 64 matrix) two-time-point patient: fast, for geometry and I/O tests."""
    return make_patient(tmp_path_factory.mktemp("small"), 0, SMALL)


@pytest.fixture(scope="session")
def demo_patient(tmp_path_factory: pytest.TempPathFactory) -> PatientTruth:
    """The README demo's patient at full resolution."""
    return make_patient(tmp_path_factory.mktemp("demo"), DEMO_PATIENT_INDEX, DEMO_OPTIONS)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
