"""DICOM CT series -> label map -> DICOM SEG: Interval's imaging path vs MONAI Deploy App SDK 4.0 vs the floor.

    OMP_NUM_THREADS=1 PYTHONPATH=. flock /tmp/interval-cpu.lock .venv/bin/python -m benchmarks.imaging.bench

Two generated series (``fixtures.synth``), cropped to exactly 80 and 120 slices around their lesions:
256x256x80 (the ``siemens`` profile: 1.48 mm pixels, 3 mm slices) and 512x512x120 (``canon``: 0.70 mm pixels,
2 mm slices). For each, every path runs in its own subprocess, one after the other. The floor and Interval's path
run ``--repeats`` times (3), alternated, and the fastest run of each counts (this machine is shared: a disturbed run
is slower, never faster; a single run of each read the floor at 2.8 s one time and 4.4 s another); every run's time
is kept (``*_runs``) and the highest peak RSS. The SDK runs once (its ratios are far from their targets):

- **interval** (``paths.py interval``): ``analyze_study`` (load the series, segment on the working grid, measure
  the lesions) + ``write_lesion_seg``.
- **sdk** (``deploy_app.py``, in a separate virtual environment with ``monai-deploy-app-sdk==4.0.0`` and
  ``torch==2.13.0``, made here on first use): the SDK's standard operators, the same network and weights
  (TorchScript export), the same intensity encoding, resampling to the same working spacing, ``Invertd`` back.
- **floor** (``paths.py floor``): the model's ``sliding_window_inference`` alone on the loaded, resampled tensor,
  with Interval's windows per network call (``SW_BATCH``: the floor of the target) and, for reference, with one
  window per call (``wall_vs_floor_batch1``). Interval and the SDK run ``SW_BATCH`` windows per call too.

Wall time is the in-process span from before the model is loaded to the SEG on disk (``app.run()`` for the SDK),
after the imports (and, for Interval, after the once-per-process read of the DICOM standard's tables that its
workers do at start, ``writer_tables_s``; ``wall_with_writer_tables_vs_floor`` counts it in); the whole process's wall time (interpreter start, imports, exit) is reported too. Peak RSS is
the child's own ``VmHWM`` (``/proc/self/status`` at its end; ``wait4``'s ``ru_maxrss``, kept as ``ru_maxrss_mib``,
also counts this parent's resident set at the fork, about 1.2 GB once the model is exported). Torch uses 1 thread in every process (``OMP_NUM_THREADS=1`` and
``torch.set_num_threads(1)``; each child reports ``torch.get_num_threads()``). Each SEG is read back and the two
lesion masks compared (Dice), so that the two paths are seen to do the same job.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from benchmarks.machine import machine
from core.types import LabelId

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_VENV = Path.home() / ".cache" / "interval" / "deploy-venv"
SDK_PIN = "monai-deploy-app-sdk==4.0.0"
TORCH_PIN = "torch==2.13.0"
SDK_PACKAGES = (SDK_PIN, "monai", "pydicom", "highdicom", "SimpleITK", "nibabel", TORCH_PIN)
TARGETS = {"wall_vs_sdk": 0.7, "rss_vs_sdk": 0.6, "wall_vs_floor": 1.5}  # on 512x512x120


@dataclass(frozen=True)
class Size:
    name: str
    matrix: int
    vendor: str
    slices: int


SIZES = (Size("256x256x80", 256, "siemens", 80), Size("512x512x120", 512, "canon", 120))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- data -----------------------------------------------------------------------------------------------------------


def series_for(size: Size, data: Path) -> Path:
    """The cropped series folder for ``size``, generated on first use (the generator is deterministic)."""
    from fixtures.synth.cohort import CohortOptions, make_patient

    cropped = data / size.name / "series"
    if (cropped / "crop.json").is_file() and len(list(cropped.glob("*.dcm"))) == size.slices:
        return cropped
    options = CohortOptions(
        seed=303, matrix=size.matrix, vendors=(size.vendor,), min_time_points=1, max_time_points=1
    )
    patient = data / size.name / "generated" / "SYN3030000"
    if not (patient / "patient.json").is_file():
        began = time.monotonic()
        make_patient(data / size.name / "generated", 0, options)
        log(f"generated {size.name} ({size.vendor}) in {time.monotonic() - began:.0f} s")
    files = sorted((patient / "t0" / "dicom").glob("*.dcm"))
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    ordered = [f for _, f in sorted(zip(z, files, strict=True))]
    truth = np.load(patient / "t0" / "truth_labels.npz")["instances"]  # [k, j, i], k ascending in z
    rows = np.flatnonzero((truth > 0).any(axis=(1, 2)))
    centre = (int(rows[0]) + int(rows[-1])) // 2 if rows.size else len(ordered) // 2
    start = min(max(0, centre - size.slices // 2), len(ordered) - size.slices)
    if start < 0:
        raise SystemExit(f"{size.name}: the generator made {len(ordered)} slices, fewer than {size.slices}")
    shutil.rmtree(cropped, ignore_errors=True)
    cropped.mkdir(parents=True)
    for f in ordered[start : start + size.slices]:
        shutil.copy2(f, cropped / f.name)
    (cropped / "crop.json").write_text(json.dumps({"first_slice": start, "of": len(ordered)}))
    kept = int(np.count_nonzero((truth[start : start + size.slices] > 0).any(axis=(1, 2))))
    log(f"{size.name}: slices {start}..{start + size.slices - 1} of {len(ordered)} ({kept} with lesion)")
    return cropped


# --- the SDK's environment and model ----------------------------------------------------------------------------------


def deploy_venv(venv: Path) -> dict[str, str]:
    """Make (once) the SDK's virtual environment; refuse one whose torch is not exactly the pinned CPU wheel."""
    python = venv / "bin" / "python"
    if not python.is_file():
        log(f"creating the MONAI Deploy environment in {venv} (pip install {' '.join(SDK_PACKAGES)})")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(
            [*pip, TORCH_PIN], check=True
        )  # the CPU wheel first: the SDK must not pull another torch
        subprocess.run([*pip, *SDK_PACKAGES], check=True)
    probe = (
        "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
        "('monai-deploy-app-sdk', 'holoscan-cu13', 'monai', 'torch', 'pydicom', 'highdicom', 'numpy')}))"
    )
    versions: dict[str, str] = json.loads(
        subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True).stdout
    )
    if versions["torch"] != "2.13.0+cpu" or versions["monai-deploy-app-sdk"] != "4.0.0":
        raise SystemExit(f"{venv}: expected {SDK_PIN} with the CPU wheel {TORCH_PIN}, found {versions}")
    return versions


def export_torchscript(out: Path) -> Path:
    """The committed segmenter as TorchScript for the SDK: the same network and weights, fed the SDK's
    ``[B, C, i, j, k]`` (WHD) layout and permuting it to the ``[B, C, k, j, i]`` the network was trained on."""
    import torch

    from models.segmentation.inference import ROI_KJI, MonaiSegmenter

    class WhdToKji(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)

    torch.set_num_threads(1)
    wrapped = WhdToKji(MonaiSegmenter().net).eval()
    example = torch.rand(1, 2, *ROI_KJI[::-1])
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, example)
        assert torch.allclose(traced(example), wrapped(example))
    path = out / "model.ts"
    traced.save(str(path))
    return path


def sdk_pixdim(series: Path) -> tuple[list[float], list[int]]:
    """Interval's working spacing in the SDK's (i, j, k) order, 0 where Interval keeps the native spacing; the
    ROI in the same order."""
    from adapters.dicom_series import load_study
    from models.segmentation.inference import ROI_KJI, WORKING_SPACING_KJI_MM, working_shape

    volume = load_study(series)
    kept = working_shape(volume.shape, volume.spacing_kji_mm)
    pixdim_kji = [
        w if n != m else 0.0 for n, m, w in zip(volume.shape, kept, WORKING_SPACING_KJI_MM, strict=True)
    ]
    return pixdim_kji[::-1], list(ROI_KJI[::-1])


# --- running and measuring one process --------------------------------------------------------------------------------


def run_measured(name: str, command: list[str], report: Path, cwd: Path) -> dict[str, Any]:
    """Run ``command`` alone; its report plus process wall time, peak RSS and CPU time (from ``wait4``)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    log_path = report.with_suffix(".log")
    with log_path.open("wb") as out:
        began = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not report.is_file():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
    figures: dict[str, Any] = json.loads(report.read_text())
    figures["process_wall_s"] = round(wall, 3)
    # the child's own VmHWM: wait4's ru_maxrss (kept as ru_maxrss_mib) also counts this parent's resident set
    figures["ru_maxrss_mib"] = round(usage.ru_maxrss / 1024, 1)
    figures["peak_rss_mib"] = figures.pop("vm_hwm_mib")
    figures["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
    log(
        f"{name}: {figures.get('series_to_seg_s', figures.get('sliding_window_s'))} s in process, "
        f"{wall:.2f} s process, {figures['peak_rss_mib']:.0f} MiB peak RSS"
    )
    return figures


def lesion_mask(seg_file: Path, series: Path) -> np.ndarray:
    """All segments of a SEG as one boolean ``[k, j, i]`` mask on the source series' grid."""
    import highdicom as hd

    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.glob("*.dcm")]
    headers.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    seg = hd.seg.segread(seg_file)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(d.SOPInstanceUID) for d in headers],
        combine_segments=True,
        skip_overlap_checks=True,
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
    )
    return np.asarray(pixels) > 0


def truth_lesions(series: Path) -> np.ndarray:
    """The generator's lesion voxels on the cropped series' grid."""
    start = json.loads((series / "crop.json").read_text())["first_slice"]
    labels = np.load(series.parent / "generated" / "SYN3030000" / "t0" / "truth_labels.npz")["labels"]
    n = len(list(series.glob("*.dcm")))
    return np.asarray(labels[start : start + n] == LabelId.LESION)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return round(2 * int((a & b).sum()) / total, 3) if total else 1.0


def fastest(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The least disturbed of repeated runs (the fastest by ``key``), with every run's ``key`` and the highest
    peak RSS of them all."""
    best = dict(min(runs, key=lambda r: float(r[key])))
    best[f"{key}_runs"] = [r[key] for r in runs]
    best["peak_rss_mib"] = max(float(r["peak_rss_mib"]) for r in runs)
    return best


def bench_size(
    size: Size, data: Path, work: Path, venv: Path, model_ts: Path, repeats: int = 1
) -> dict[str, Any]:
    from models.segmentation.inference import SW_BATCH

    series = series_for(size, data)
    for f in series.glob("*.dcm"):  # the page cache holds the series for every path alike
        f.read_bytes()
    pixdim, roi = sdk_pixdim(series)
    here = work / size.name
    here.mkdir(parents=True)
    paths = [sys.executable, "-m", "benchmarks.imaging.paths"]
    floors, intervals = [], []
    for n in range(1, repeats + 1):  # alternated, so that a busy spell of the machine falls on both alike
        for path, runs in (("floor", floors), ("interval", intervals)):
            out, report = here / f"{path}-{n}", here / f"{path}-{n}.json"
            runs.append(
                run_measured(
                    f"{size.name} {path} {n}/{repeats}",
                    [*paths, path, str(series), str(out), str(report)],
                    report,
                    REPO,
                )
            )
            runs[-1]["out_dir"] = out.name
    floor = fastest(floors, "sliding_window_s")
    interval = fastest(intervals, "series_to_seg_s")
    sdk_cwd = here / "sdk-cwd"
    sdk_cwd.mkdir()
    sdk_command = [
        str(venv / "bin" / "python"), str(HERE / "deploy_app.py"), "-i", str(series), "-o", str(here / "sdk"),
        "-m", str(model_ts), "--pixdim", *map(str, pixdim), "--roi", *map(str, roi),
        "--report", str(here / "sdk.json"), "--sw-batch", str(SW_BATCH),
    ]  # fmt: skip
    sdk = run_measured(f"{size.name} sdk", sdk_command, here / "sdk.json", sdk_cwd)
    sdk["pixdim_ijk"] = pixdim
    interval_mask = lesion_mask(here / interval["out_dir"] / interval["seg_files"][0], series)
    sdk_mask = lesion_mask(here / "sdk" / sdk["seg_files"][0], series)
    truth = truth_lesions(series)
    return {
        "series": {"size_ijk": [size.matrix, size.matrix, size.slices], "vendor_profile": size.vendor},
        "interval": interval,
        "sdk": sdk,
        "floor": floor,
        "ratios": {
            "wall_vs_sdk": round(interval["series_to_seg_s"] / sdk["series_to_seg_s"], 3),
            "rss_vs_sdk": round(interval["peak_rss_mib"] / sdk["peak_rss_mib"], 3),
            "wall_vs_floor": round(interval["series_to_seg_s"] / floor["sliding_window_s"], 3),
            "wall_with_writer_tables_vs_floor": round(
                (interval["series_to_seg_s"] + interval["writer_tables_s"]) / floor["sliding_window_s"], 3
            ),
            "wall_vs_floor_batch1": round(interval["series_to_seg_s"] / floor["sliding_window_batch1_s"], 3),
            "process_wall_vs_sdk": round(interval["process_wall_s"] / sdk["process_wall_s"], 3),
        },
        "lesion_voxels": {
            "interval": int(interval_mask.sum()),
            "sdk": int(sdk_mask.sum()),
            "truth": int(truth.sum()),
        },
        "lesion_dice": {
            "interval_vs_sdk": dice(interval_mask, sdk_mask),
            "interval_vs_truth": dice(interval_mask, truth),
            "sdk_vs_truth": dice(sdk_mask, truth),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE / "data", help="generated series (kept between runs)")
    ap.add_argument(
        "--venv", type=Path, default=DEFAULT_VENV, help="the MONAI Deploy SDK's virtual environment"
    )
    ap.add_argument("--sizes", default=",".join(s.name for s in SIZES))
    ap.add_argument("--out", type=Path, default=HERE / "result.json")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (SEGs, logs)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of Interval's path and of the floor, alternated; the fastest of each counts",
    )
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    result: dict[str, Any] = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "repeats": args.repeats,
    }
    result["sdk_environment"] = deploy_venv(args.venv)
    work = Path(tempfile.mkdtemp(prefix="interval-imaging-bench-"))
    try:
        model_ts = export_torchscript(work)
        result["sizes"] = {}
        for size in SIZES:
            if size.name in args.sizes.split(","):
                result["sizes"][size.name] = bench_size(
                    size, args.data, work, args.venv, model_ts, args.repeats
                )
    finally:
        if args.keep:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    large = result["sizes"].get("512x512x120")
    if large:
        result["targets_512"] = {
            k: {"limit": v, "measured": large["ratios"][k], "met": large["ratios"][k] <= v}
            for k, v in TARGETS.items()
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
