"""Once-per-process set-up of a worker: freed-memory reuse and the SEG/SR writers' DICOM tables."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout.strip()


def test_freed_memory_reuse_is_set_on_glibc_and_changes_no_array() -> None:
    # a fresh process: the thresholds are process-wide
    result = _run(
        """
        import numpy as np
        from models.segmentation.memory import keep_freed_memory
        before = np.random.default_rng(0).random((64, 512, 512)).sum()
        ok = keep_freed_memory()
        after = np.random.default_rng(0).random((64, 512, 512)).sum()
        print(ok, before == after)
        """
    )
    assert result == "True True"


def test_writer_tables_are_loaded_once_and_a_moved_private_module_is_survived() -> None:
    result = _run(
        """
        import sys, time
        from adapters.dicom_seg import load_writer_tables
        from highdicom import _standard_utils as su
        load_writer_tables()
        start = time.perf_counter(); su.get_module_attribute_map(); su.get_iod_module_map()
        cached = time.perf_counter() - start
        sys.modules["highdicom._standard_utils"] = None  # as if a release had moved it
        load_writer_tables()
        print(cached < 0.01)
        """
    )
    assert result == "True"
