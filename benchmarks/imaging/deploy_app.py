"""The peer: Interval's segmenter as a MONAI Deploy App SDK 4.0 application, with the SDK's standard operators.

Runs in the SDK's own virtual environment (``bench.py`` makes it), never imports Interval:

    python deploy_app.py -i SERIES_DIR -o OUT_DIR -m MODEL.ts --pixdim 2 2 0 --roi 96 96 48 --report R.json

DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator (CT) -> DICOMSeriesToVolumeOperator -> a segmentation
operator built as the SDK's examples build theirs (``LiverTumorSegOperator``: MONAI dictionary transforms around
``MonaiSegInferenceOperator``) -> DICOMSegmentationWriterOperator.

What the segmentation operator does, matching Interval's model and its pre/post-processing:

- pre: ``LoadImaged`` (the SDK's ``InMemImageReader``), ``EnsureChannelFirstd``, ``Spacingd`` to Interval's working
  spacing (``--pixdim``, in the SDK's WHD = i, j, k axis order; 0 keeps an axis, as Interval keeps an axis that is
  not finer than 3/4 of the working spacing), then Interval's ``encode_hu`` written as standard transforms: two
  ``ScaleIntensityRanged`` windows (soft tissue -160..240 HU, lung -1000..400 HU, clipped to 0..1) joined by
  ``ConcatItemsd`` into 2 channels.
- inference: ``sliding_window_inference`` with Interval's ROI, overlap 0.25, Gaussian blending and windows per
  network call (``--sw-batch``, Interval's ``SW_BATCH``), on the
  committed weights exported to TorchScript (the export only permutes the SDK's i, j, k axes to the k, j, i order
  the network was trained in, and back).
- post (the MONAI bundle convention): ``Activationsd`` softmax, ``Invertd`` back to the native grid (bilinear on
  the 4 class probabilities), ``AsDiscreted`` argmax, then the lesion class as the one segment written (Interval's
  SEG holds lesions only).

Torch runs on 1 thread. Timings go to ``--report`` (JSON); the parent measures the process's wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
T_START = time.perf_counter()
SW_BATCH = [1]  # set from --sw-batch before the app is built

import torch  # noqa: E402
from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import AppContext, Application, Fragment, Operator, OperatorSpec  # noqa: E402
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator  # noqa: E402
from monai.deploy.operators.dicom_seg_writer_operator import (  # noqa: E402
    DICOMSegmentationWriterOperator,
    SegmentDescription,
)
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator  # noqa: E402
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator  # noqa: E402
from monai.deploy.operators.monai_seg_inference_operator import (  # noqa: E402
    InfererType,
    InMemImageReader,
    MonaiSegInferenceOperator,
)
from monai.transforms import (  # noqa: E402
    Activationsd,
    AsDiscreted,
    Compose,
    ConcatItemsd,
    CopyItemsd,
    EnsureChannelFirstd,
    Invertd,
    Lambdad,
    LoadImaged,
    ScaleIntensityRanged,
    Spacingd,
)
from pydicom.sr.codedict import codes  # noqa: E402

from benchmarks.imaging.rss import peak_rss_mib  # noqa: E402 (PYTHONPATH: the repository)

torch.set_num_threads(1)
T_IMPORTED = time.perf_counter()

LESION = 3  # core.types.LabelId.LESION
RULES = '{"selections": [{"name": "CT Series", "conditions": {"Modality": "(?i)CT"}}]}'
STAGES: dict[str, float] = {}


class StampedCompose(Compose):
    """A ``Compose`` that notes when it starts and ends (to split the SDK's segmentation time into pre-transforms,
    sliding window and post-transforms); ``Invertd`` still inverts it as a ``Compose``."""

    def __init__(self, name: str, transforms: list[object]) -> None:
        super().__init__(transforms)
        self.name = name

    def __call__(self, data, *args, **kwargs):  # type: ignore[no-untyped-def]
        STAGES[f"{self.name}_start"] = time.perf_counter()
        out = super().__call__(data, *args, **kwargs)
        STAGES[f"{self.name}_done"] = time.perf_counter()
        return out


class IntervalSegOperator(Operator):
    """Interval's UNet with its pre/post-processing as MONAI transforms, delegating to MonaiSegInferenceOperator."""

    def __init__(
        self,
        fragment: Fragment,
        *args: object,
        app_context: AppContext,
        model_path: Path,
        pixdim: tuple[float, float, float],
        roi: tuple[int, int, int],
        **kwargs: object,
    ) -> None:
        self.app_context = app_context
        self.model_path = model_path
        self.pixdim = pixdim
        self.roi = roi
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("image")
        spec.output("seg_image")

    def compute(self, op_input, op_output, context):  # type: ignore[no-untyped-def]
        STAGES["volume_ready"] = time.perf_counter()
        image = op_input.receive("image")
        reader = InMemImageReader(image)
        pre = StampedCompose(
            "pre",
            [
                LoadImaged(keys="image", reader=reader),
                EnsureChannelFirstd(keys="image"),
                Spacingd(keys="image", pixdim=self.pixdim, mode="bilinear"),
                CopyItemsd(keys="image", names="wide"),
                ScaleIntensityRanged(
                    keys="image", a_min=-160.0, a_max=240.0, b_min=0.0, b_max=1.0, clip=True
                ),
                ScaleIntensityRanged(
                    keys="wide", a_min=-1000.0, a_max=400.0, b_min=0.0, b_max=1.0, clip=True
                ),
                ConcatItemsd(keys=["image", "wide"], name="image", dim=0),
            ],
        )
        post = StampedCompose(
            "post",
            [
                Activationsd(keys="pred", softmax=True),
                Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
                AsDiscreted(keys="pred", argmax=True),
                Lambdad(keys="pred", func=lambda x: x == LESION),
            ],
        )
        infer = MonaiSegInferenceOperator(
            self.fragment,
            roi_size=self.roi,
            pre_transforms=pre,
            post_transforms=post,
            overlap=0.25,
            app_context=self.app_context,
            model_name="",
            inferer=InfererType.SLIDING_WINDOW,
            sw_batch_size=SW_BATCH[0],
            model_path=self.model_path,
            mode="gaussian",
            name="monai_seg_inference_op",
        )
        infer.input_dataset_key = "image"
        infer.pred_dataset_key = "pred"
        seg = infer.compute_impl(image, context)
        STAGES["seg_ready"] = time.perf_counter()
        op_output.emit(seg, "seg_image")


class IntervalDeployApp(Application):
    def __init__(
        self, *args: object, pixdim: tuple[float, float, float], roi: tuple[int, int, int], **kw: object
    ):
        self.pixdim = pixdim
        self.roi = roi
        super().__init__(*args, **kw)

    def compose(self) -> None:
        app_context = Application.init_app_context(self.argv)
        model_path = Path(app_context.model_path)
        loader = DICOMDataLoaderOperator(
            self, CountCondition(self, 1), input_folder=Path(app_context.input_path), name="dcm_loader_op"
        )
        selector = DICOMSeriesSelectorOperator(self, rules=RULES, name="series_selector_op")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_vol_op")
        seg_op = IntervalSegOperator(
            self,
            app_context=app_context,
            model_path=model_path,
            pixdim=self.pixdim,
            roi=self.roi,
            name="seg_op",
        )
        writer = DICOMSegmentationWriterOperator(
            self,
            segment_descriptions=[
                SegmentDescription(
                    segment_label="Lesion",
                    segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                    segmented_property_type=codes.SCT.Lesion,
                    algorithm_name="Interval lesion segmenter (MONAI Deploy)",
                    algorithm_family=codes.DCM.ArtificialIntelligence,
                    algorithm_version="benchmark",
                )
            ],
            output_folder=Path(app_context.output_path),
            name="dcm_seg_writer_op",
        )
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, seg_op, {("image", "image")})
        self.add_flow(selector, writer, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(seg_op, writer, {("seg_image", "seg_image")})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-i", "--input", required=True)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--pixdim", type=float, nargs=3, required=True)
    ap.add_argument("--roi", type=int, nargs=3, required=True)
    ap.add_argument("--report", type=Path, required=True)
    ap.add_argument("--sw-batch", type=int, default=1, help="sliding windows per network call")
    args = ap.parse_args()
    SW_BATCH[0] = args.sw_batch
    # the SDK's own argument parser reads sys.argv, as in its examples
    sys.argv = [sys.argv[0], "-i", args.input, "-o", args.output, "-m", args.model, "-l", "WARN"]
    t0 = time.perf_counter()
    IntervalDeployApp(pixdim=tuple(args.pixdim), roi=tuple(args.roi)).run()
    t1 = time.perf_counter()
    written = sorted(Path(args.output).glob("*.dcm"))
    report = {
        "import_s": round(T_IMPORTED - T_START, 3),
        "series_to_seg_s": round(t1 - t0, 3),
        "load_to_volume_s": round(STAGES["volume_ready"] - t0, 3) if "volume_ready" in STAGES else None,
        "segment_s": round(STAGES["seg_ready"] - STAGES["volume_ready"], 3)
        if "seg_ready" in STAGES
        else None,
        "write_seg_s": round(t1 - STAGES["seg_ready"], 3) if "seg_ready" in STAGES else None,
        "segment_split_s": {
            "pre_transforms": round(STAGES["pre_done"] - STAGES["pre_start"], 3),
            "sliding_window": round(STAGES["post_start"] - STAGES["pre_done"], 3),
            "post_transforms": round(STAGES["post_done"] - STAGES["post_start"], 3),
        }
        if {"pre_done", "post_start", "post_done"} <= STAGES.keys()
        else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seg_files": [p.name for p in written],
        "seg_bytes": sum(p.stat().st_size for p in written),
        "vm_hwm_mib": peak_rss_mib(),
    }
    args.report.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
