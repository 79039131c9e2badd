"""The committed MONAI segmenter on a generated patient it has never seen."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adapters.dicom_series import load_study
from core.errors import ModelError
from core.lesions import extract_lesions
from core.types import LabelId
from models.segmentation.inference import MonaiSegmenter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def segmenter() -> MonaiSegmenter:
    return MonaiSegmenter()


def test_organs_and_every_lesion_are_found(segmenter, demo_patient):
    tp = demo_patient.folder / "t0"
    vol = load_study(tp / "dicom")
    seg = segmenter.segment(vol)
    truth = np.load(tp / "truth_labels.npz")
    for label, floor in ((LabelId.LIVER, 0.85), (LabelId.LUNG, 0.9)):
        a, b = seg.labels == label, truth["labels"] == label
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > floor, (label.name, dice)
    lesions = extract_lesions(vol, seg)
    inst = truth["instances"]
    rows = json.loads((tp / "truth.json").read_text())["lesions"]
    for row in rows:
        if not row["present"]:
            continue
        centre = np.rint(vol.lps_to_kji(row["center_lps_mm"])).astype(int)
        nearest = min(
            lesions,
            key=lambda d: np.linalg.norm(np.subtract(d.centroid_lps_mm, row["center_lps_mm"])),
            default=None,
        )
        assert nearest is not None, row["label"]
        assert np.linalg.norm(np.subtract(nearest.centroid_lps_mm, row["center_lps_mm"])) < 5.0, row["label"]
        assert nearest.organ.value == row["organ"], row["label"]
        assert inst[tuple(centre)] == row["instance"]
    assert len(lesions) == sum(1 for r in rows if r["present"])  # no false positive on this patient
    assert 0.5 <= min(d.probability for d in lesions) <= 1.0


def test_model_version_names_the_weights(segmenter):
    assert segmenter.model_version.startswith("interval-seg-unet-")
    assert MonaiSegmenter().model_version == segmenter.model_version


def test_weights_that_do_not_fit_are_a_model_error(tmp_path):
    import torch

    bad = tmp_path / "bad.pt"
    torch.save(
        {
            "model": {"x": torch.zeros(1)},
            "net": {"channels": [4], "strides": [], "num_res_units": 0, "in_channels": 2, "out_channels": 4},
            "encoding": "encode_hu/v1",
        },
        bad,
    )
    with pytest.raises(ModelError, match="do not fit"):
        MonaiSegmenter(bad)
    with pytest.raises(ModelError, match="not found"):
        MonaiSegmenter(tmp_path / "missing.pt")


def test_monai_reads_the_generated_series_with_the_same_geometry(demo_patient):
    """An independent reader (MONAI's PydicomReader, RAS) agrees with Interval's LPS geometry."""
    from monai.transforms.io.array import LoadImage

    folder = demo_patient.folder / "t0" / "dicom"
    ours = load_study(folder)
    img = LoadImage(reader="PydicomReader", image_only=True)(str(folder))
    affine = np.asarray(img.affine, dtype=float)
    arr = np.asarray(img)
    assert arr.shape == ours.shape[::-1]  # MONAI's axes are (i, j, k)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(0, n, 200) for n in arr.shape], axis=1)
    lps = (ras_to_lps @ (affine[:3, :3] @ idx.T + affine[:3, 3:4])).T
    kji = ours.lps_to_kji(lps)
    assert np.allclose(kji, np.rint(kji), atol=1e-3)  # the same voxel centres
    kji = np.rint(kji).astype(int)
    ours_hu = ours.voxels_hu[kji[:, 0], kji[:, 1], kji[:, 2]]
    assert np.allclose(arr[idx[:, 0], idx[:, 1], idx[:, 2]], ours_hu, atol=0.5)
