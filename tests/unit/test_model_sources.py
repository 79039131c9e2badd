"""A user's own segmentation model: a MONAI bundle directory or a TorchScript file, with the contract it
declares; test-time augmentation views and occlusion saliency on small networks. Nothing is downloaded: the
bundle and TorchScript files are written here from the committed network."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from adapters.settings import Settings
from core.errors import ModelError
from core.types import LabelId, Volume
from models.segmentation.contract import BUILTIN_CONTRACT, ModelSource, source_from_settings
from models.segmentation.inference import (
    DEFAULT_WEIGHTS,
    MonaiSegmenter,
    encode_windows,
    segmenter_from_settings,
)
from models.segmentation.network import encode_hu
from models.segmentation.saliency import occlusion_saliency

ROOT = Path(__file__).resolve().parents[2]


def _volume(shape=(48, 96, 96), seed=0) -> Volume:
    """A body of soft tissue with a liver-like region, a lung-like region and two bright balls."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape)
    hu = np.full(shape, -1000.0, np.float32)
    body = ((j - shape[1] / 2) / (shape[1] * 0.42)) ** 2 + ((i - shape[2] / 2) / (shape[2] * 0.45)) ** 2 < 1
    hu[body] = 40.0
    hu[body & (i < shape[2] / 2) & (j > shape[1] / 2)] = 110.0  # "liver"
    hu[body & (i > shape[2] / 2) & (j < shape[1] / 2)] = -850.0  # "lung"
    for c, r in (((24, 60, 30), 5), ((20, 30, 66), 3)):
        ball = ((k - c[0]) * 2.5) ** 2 + ((j - c[1]) * 2) ** 2 + ((i - c[2]) * 2) ** 2 <= (2 * r) ** 2
        hu[ball] = 20.0 if c[2] < 48 else 60.0
    hu += rng.normal(0, 8, shape).astype(np.float32)
    return Volume(hu, (2.5, 2.0, 2.0), (0.0, 0.0, 0.0))


@pytest.fixture(scope="module")
def builtin() -> MonaiSegmenter:
    return MonaiSegmenter()


def _builtin_net(builtin: MonaiSegmenter) -> torch.nn.Module:
    net = builtin.net
    assert isinstance(net, torch.nn.Module)
    return net


def _metadata(**interval) -> dict:
    return {"name": "my liver model", "version": "0.3.1", "interval": interval}


CONTRACT = BUILTIN_CONTRACT.to_dict()


def _torchscript(net: torch.nn.Module, path: Path, meta: dict | None, *, script: bool = False) -> Path:
    """A TorchScript file as users' files were made (PyTorch 2.13 deprecates making them; Interval loads them)."""
    extra = {"metadata.json": json.dumps(meta)} if meta is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer notices of the export itself
        module = (
            torch.jit.script(net)
            if script
            else torch.jit.trace(net, torch.zeros(1, 2, 48, 96, 96), check_trace=False)
        )
        torch.jit.save(module, str(path), _extra_files=extra)
    return path


def _bundle(net_builtin: MonaiSegmenter, root: Path, meta: dict) -> Path:
    """A minimal MONAI bundle of the committed network: metadata, an inference config naming the network, the
    state dict."""
    cfg = json.loads(json.dumps(torch.load(DEFAULT_WEIGHTS, weights_only=True)["net"]))
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    network_def = {
        "_target_": "monai.networks.nets.UNet",
        "spatial_dims": 3,
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "channels": cfg["channels"],
        "strides": cfg["strides"],
        "num_res_units": cfg["num_res_units"],
    }
    (root / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}))
    torch.save(_builtin_net(net_builtin).state_dict(), root / "models" / "model.pt")
    return root


def _same(a, b) -> None:
    assert np.array_equal(a.labels, b.labels)
    assert np.allclose(a.lesion_probability, b.lesion_probability, atol=1e-5)


def test_the_builtin_contract_is_the_training_encoding():
    hu = np.random.default_rng(1).uniform(-1200, 500, (4, 5, 6)).astype(np.float32)
    got = encode_windows(torch.from_numpy(hu), BUILTIN_CONTRACT.input_windows_hu).numpy()
    assert np.allclose(got, encode_hu(hu), atol=1e-6)


def test_torchscript_and_bundle_exports_of_the_committed_network_segment_as_the_builtin(builtin, tmp_path):
    vol = _volume()
    want = builtin.segment(vol)
    assert (want.labels == LabelId.LESION).any()  # the check means something
    ts = _torchscript(_builtin_net(builtin), tmp_path / "model.ts", _metadata(**CONTRACT))
    from_ts = MonaiSegmenter(source=ModelSource("torchscript", ts))
    _same(from_ts.segment(vol), want)
    assert from_ts.model_version.startswith("torchscript-")
    bundle = _bundle(builtin, tmp_path / "bundle", _metadata(**CONTRACT))
    from_bundle = MonaiSegmenter(source=ModelSource("bundle", bundle))
    _same(from_bundle.segment(vol), want)
    assert from_bundle.model_version.startswith("bundle-my_liver_model-0.3.1-")
    # a bundle that ships TorchScript only
    ts_only = tmp_path / "ts-bundle"
    (ts_only / "models").mkdir(parents=True)
    (ts_only / "configs").mkdir()
    (ts_only / "configs" / "metadata.json").write_text(json.dumps(_metadata(**CONTRACT)))
    _torchscript(_builtin_net(builtin), ts_only / "models" / "model.ts", None)
    _same(MonaiSegmenter(source=ModelSource("bundle", ts_only)).segment(vol), want)


def test_settings_declare_the_contract_and_output_channels_map_to_interval_labels(builtin, tmp_path):
    """A model whose channels come in another order, with a class Interval does not use: declared in settings
    (the file carries no metadata), its probabilities are summed into Interval's labels."""

    class Reordered(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)  # background, liver, lung, lesion
            spleen = torch.full_like(y[:, :1], -30.0)  # never likely
            return torch.cat([y[:, 3:4], spleen, y[:, 0:1], y[:, 2:3], y[:, 1:2]], dim=1)

    ts = _torchscript(Reordered(_builtin_net(builtin)), tmp_path / "reordered.ts", None)
    settings = Settings(
        segmenter_kind="torchscript",
        segmenter_model=ts,
        segmenter_input_windows_hu=[(-160, 240), (-1000, 400)],
        segmenter_output_classes=["lesion", "other", "background", "lung", "liver"],
        segmenter_spacing_kji_mm=(2.5, 2.0, 2.0),
        segmenter_roi_kji=(48, 96, 96),
    )
    seg = MonaiSegmenter(source=source_from_settings(settings))
    vol = _volume(seed=2)
    _same(seg.segment(vol), builtin.segment(vol))
    assert seg.model_version == source_from_settings(settings).version()


def test_models_that_do_not_fit_are_refused_with_what_to_fix(builtin, tmp_path):
    net = _builtin_net(builtin)
    undeclared = _torchscript(net, tmp_path / "undeclared.ts", None)
    with pytest.raises(
        ModelError, match=r"does not declare input_windows_hu.*INTERVAL_SEGMENTER_SPACING_KJI_MM"
    ):
        MonaiSegmenter(source=ModelSource("torchscript", undeclared))
    three = _torchscript(
        net,
        tmp_path / "three.ts",
        _metadata(**{**CONTRACT, "output_classes": ["background", "liver", "lesion"]}),
    )
    with pytest.raises(ModelError, match=r"returns \(1, 4, 48, 96, 96\).*need \(1, 3, 48, 96, 96\)"):
        MonaiSegmenter(source=ModelSource("torchscript", three))
    one_window = _torchscript(
        net, tmp_path / "one.ts", _metadata(**{**CONTRACT, "input_windows_hu": [[-160, 240]]})
    )
    with pytest.raises(ModelError, match="fails on a 1-channel patch"):
        MonaiSegmenter(source=ModelSource("torchscript", one_window))
    no_lesion = _metadata(**{**CONTRACT, "output_classes": ["background", "liver", "lung", "other"]})
    with pytest.raises(ModelError, match="no 'lesion' channel"):
        MonaiSegmenter(source=ModelSource("torchscript", _torchscript(net, tmp_path / "nl.ts", no_lesion)))
    with pytest.raises(ModelError, match="may only name"):
        MonaiSegmenter(
            source=ModelSource(
                "torchscript",
                _torchscript(
                    net,
                    tmp_path / "t.ts",
                    _metadata(**{**CONTRACT, "output_classes": ["background", "liver", "lung", "tumor"]}),
                ),
            )
        )
    wrong_weights = _bundle(builtin, tmp_path / "b", _metadata(**CONTRACT))
    torch.save({"model.0.conv.unit0.conv.weight": torch.zeros(1)}, wrong_weights / "models" / "model.pt")
    with pytest.raises(ModelError, match=r"models/model\.pt does not fit its network_def"):
        MonaiSegmenter(source=ModelSource("bundle", wrong_weights))
    empty = tmp_path / "empty-bundle"
    empty.mkdir()
    with pytest.raises(ModelError, match="holds neither"):
        MonaiSegmenter(source=ModelSource("bundle", empty))
    with pytest.raises(ModelError, match="is not a directory"):
        ModelSource("bundle", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs INTERVAL_SEGMENTER_MODEL"):
        Settings(segmenter_kind="bundle")


def test_the_api_names_a_users_model_version_without_torch(builtin, tmp_path):
    bundle = _bundle(builtin, tmp_path / "bundle", _metadata(**CONTRACT))
    code = (
        "import sys; from pathlib import Path; from models.segmentation.contract import ModelSource; "
        f"print(ModelSource('bundle', Path({str(bundle)!r})).version()); assert 'torch' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == MonaiSegmenter(source=ModelSource("bundle", bundle)).model_version
    # the contract is part of the version: the same file read another way is another model
    other = ModelSource("bundle", bundle, {"spacing_kji_mm": (3.0, 2.0, 2.0)})
    assert other.version() != out.stdout.strip()


def test_tta_views_are_the_flipped_volumes_segmentation_flipped_back(builtin):
    """On a volume of exactly one window, the left-right view of a box equals segmenting the mirrored volume
    and mirroring the result back."""
    seg = MonaiSegmenter(tta=("lr", "ap"))
    vol = _volume()
    box = ((18, 31), (50, 71), (20, 41))
    (views,) = seg.augmented_views(vol, [box])
    assert [v.labels.shape for v in views] == [(13, 21, 21)] * 2
    mirrored = Volume(np.ascontiguousarray(vol.voxels_hu[:, :, ::-1]), vol.spacing_kji_mm, vol.origin_lps_mm)
    back = builtin.segment(mirrored)
    crop = (slice(18, 31), slice(50, 71), slice(96 - 41, 96 - 20))
    assert np.array_equal(views[0].labels, back.labels[crop][:, :, ::-1])
    assert np.allclose(views[0].lesion_probability, back.lesion_probability[crop][:, :, ::-1], atol=1e-5)
    assert seg.augmentations == ("lr", "ap")
    assert MonaiSegmenter().augmented_views(vol, [box]) == [[]]
    with pytest.raises(ModelError, match="unknown TTA flip"):
        MonaiSegmenter(tta=("up",))


def test_segment_places_clear_contrast_edges_by_the_image_unless_settings_turn_it_off(builtin):
    """The built-in model's lesions on the test volume stand out of their surroundings by many times the noise: their
    edges move, within two voxels of the model's; the model's own result is what ``edges=None`` returns."""
    vol = _volume()
    plain = MonaiSegmenter(edges=None).segment(vol)
    refined = builtin.segment(vol)
    assert plain.refined is None and refined.refined is not None and refined.refined.any()
    moved = plain.labels != refined.labels
    model_lesion = plain.labels == LabelId.LESION
    near = ndimage.binary_dilation(model_lesion, np.ones((3, 3, 3), bool), iterations=2)
    assert moved.any() and not (moved & ~near).any()
    assert np.array_equal(refined.refined, (refined.labels == LabelId.LESION) & ~model_lesion)
    assert np.array_equal(refined.lesion_probability, plain.lesion_probability)
    off = Settings(segmenter_edge_refinement=False, min_lesion_long_axis_mm=7.0)
    assert segmenter_from_settings(off, tta=False).edges is None
    on = segmenter_from_settings(Settings(min_lesion_long_axis_mm=7.0), tta=False).edges
    assert (
        on is not None and on.keep.min_long_axis_mm == 7.0
    )  # what is refined follows the site's lesion floor


class _LocalContrast(torch.nn.Module):
    """Lesion where the soft-tissue window is locally brighter than 0.5 (a 5-voxel mean): the lesion depends
    on its own neighbourhood only, so occlusion saliency must sit there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = torch.nn.functional.avg_pool3d(x[:, :1], 5, stride=1, padding=2)
        lesion = 10.0 * (local - 0.6)
        zero = torch.zeros_like(lesion)
        return torch.cat([zero, zero - 5.0, zero - 5.0, lesion], dim=1)


def test_occlusion_saliency_sits_on_what_the_lesion_rests_on(tmp_path):
    ts = tmp_path / "local.ts"
    _torchscript(_LocalContrast(), ts, _metadata(**{**CONTRACT, "roi_kji": [32, 64, 64]}), script=True)
    seg = MonaiSegmenter(source=ModelSource("torchscript", ts))
    hu = np.full((40, 80, 80), 0.0, np.float32)  # soft window 0.4
    hu[18:23, 36:45, 36:45] = 200.0  # 0.9: a lesion
    hu[18:23, 36:45, 66:75] = 200.0  # another, far away
    vol = Volume(hu, (2.5, 2.0, 2.0), (0.0, 0.0, 0.0))
    s = seg.segment(vol)
    assert (s.labels[20, 40, 40], s.labels[20, 40, 10]) == (LabelId.LESION, LabelId.BACKGROUND)
    sal = occlusion_saliency(seg, vol, ((18, 23), (36, 45), (36, 45)))  # 12 mm patches every 8 mm
    assert sal.baseline > 0.7 and sal.occlusions == 125
    box = tuple(slice(a, b) for a, b in sal.box_kji)
    assert sal.box_kji[2][1] <= 60  # the occluded region stays near the lesion
    drop = np.zeros(vol.shape, np.float32)
    drop[box] = sal.drop
    assert drop[18:23, 36:45, 36:45].mean() > 0.02
    assert np.abs(drop[:, :, 60:]).max() == 0.0  # not computed far away
    near = np.zeros(vol.shape, bool)
    near[14:27, 30:51, 30:51] = True  # the lesion, its 5-voxel receptive field and a patch around them
    overlay = sal.overlay(vol.shape)
    assert overlay.max() == pytest.approx(1.0) and overlay.min() >= 0.0
    peak = np.unravel_index(np.argmax(overlay), vol.shape)
    assert near[peak]
