"""The two measured processes on Interval's side, each run alone in its own subprocess by ``bench.py``:

    python -m benchmarks.imaging.paths interval SERIES_DIR OUT_DIR REPORT.json
    python -m benchmarks.imaging.paths floor SERIES_DIR OUT_DIR REPORT.json

``interval``: the production imaging path, as ``interval analyze`` and the workers run it (a worker process first
reads the DICOM standard's tables for its SEG/SR writers, once, at start: ``load_writer_tables``, done here before
the timed span and reported as ``writer_tables_s``): ``analyze_study``
(``FolderImageSource`` -> ``load_study``; ``MonaiSegmenter.segment`` on the working grid; ``extract_lesions``;
no priors, so a baseline with deterministic wording) and ``write_lesion_seg`` (one segment per lesion) with the
series' headers read as ``workers.analysis.source_headers`` reads them. The timed span, ``series_to_seg_s``,
starts before the model is loaded and ends when the SEG is on disk (the SDK's ``app.run()`` also loads its model).

``floor``: the model's sliding-window inference alone, on the series already loaded, area-averaged to the working
grid and encoded (none of that timed), with Interval's ROI, overlap and Gaussian blending: once with Interval's
windows per network call (``SW_BATCH``, the floor the targets use) and once with one window per call (MONAI's
default, as the SDK's examples run it).

Torch runs on 1 thread in both. Each writes its timings to REPORT.json; the parent measures wall time and peak RSS.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
T_START = time.perf_counter()

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from monai.inferers.utils import sliding_window_inference  # noqa: E402

from adapters.dicom_seg import load_writer_tables, write_lesion_seg  # noqa: E402
from adapters.dicom_series import load_study, scan_folder  # noqa: E402
from adapters.image_folder import FolderImageSource  # noqa: E402
from adapters.prior_bundle import NoPriors  # noqa: E402
from benchmarks.imaging.rss import peak_rss_mib  # noqa: E402
from core.pipeline import analyze_study  # noqa: E402
from models.segmentation.inference import OVERLAP, ROI_KJI, MonaiSegmenter, working_shape  # noqa: E402
from models.segmentation.network import encode_hu  # noqa: E402

torch.set_num_threads(1)
T_IMPORTED = time.perf_counter()


def interval(series: Path, out: Path) -> dict[str, Any]:
    # as a worker process does at start (workers.celery_app): the standard's tables for the SEG/SR writers,
    # read once per process, reported apart (``writer_tables_s``) like the imports, outside the timed span
    t_tables = time.perf_counter()
    load_writer_tables()
    t0 = time.perf_counter()
    segmenter = MonaiSegmenter()
    t_model = time.perf_counter()
    result = analyze_study(str(series), images=FolderImageSource(), priors=NoPriors(), segmenter=segmenter)
    t_analyzed = time.perf_counter()
    headers = [ds for _, ds in scan_folder(series).series[result.acquisition.series_uid]]
    seg_path = write_lesion_seg(result, headers, out / "seg.dcm")
    t1 = time.perf_counter()
    return {
        "series_to_seg_s": round(t1 - t0, 3),
        "model_load_s": round(t_model - t0, 3),
        "steps_s": result.step_seconds,
        "write_seg_s": round(t1 - t_analyzed, 3),
        "writer_tables_s": round(t0 - t_tables, 3),
        "lesions": sum(t.detected is not None for t in result.lesions),
        "volume_kji": list(result.volume_shape),
        "working_kji": list(working_shape(result.volume_shape, result.spacing_kji_mm)),
        "seg_files": [seg_path.name],
        "seg_bytes": seg_path.stat().st_size,
    }


@torch.inference_mode()
def floor(series: Path) -> dict[str, Any]:
    segmenter = MonaiSegmenter()
    volume = load_study(series)
    hu = torch.from_numpy(np.ascontiguousarray(volume.voxels_hu, dtype=np.float32))
    shape = working_shape(volume.shape, volume.spacing_kji_mm)
    if shape != volume.shape:
        hu = F.interpolate(hu[None, None], size=shape, mode="area")[0, 0]
    x = torch.from_numpy(encode_hu(hu.numpy()))[None]
    seconds = {}
    for batch in (segmenter.sw_batch_size, 1):
        t0 = time.perf_counter()
        logits = sliding_window_inference(
            x,
            roi_size=ROI_KJI,
            sw_batch_size=batch,
            predictor=segmenter.net,
            overlap=OVERLAP,
            mode="gaussian",
        )
        seconds[batch] = round(time.perf_counter() - t0, 3)
    assert isinstance(logits, torch.Tensor)
    return {
        "sliding_window_s": seconds[segmenter.sw_batch_size],
        "sw_batch_size": segmenter.sw_batch_size,
        "sliding_window_batch1_s": seconds[1],
        "working_kji": list(shape),
        "logits_shape": list(logits.shape),
    }


def main() -> None:
    kind, series, out, report = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    out.mkdir(parents=True, exist_ok=True)
    if kind == "interval":
        figures = interval(series, out)
    elif kind == "floor":
        figures = floor(series)
    else:
        raise SystemExit(f"unknown path {kind!r}: expected 'interval' or 'floor'")
    figures |= {
        "import_s": round(T_IMPORTED - T_START, 3),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "vm_hwm_mib": peak_rss_mib(),
    }
    report.write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
