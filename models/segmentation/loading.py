"""Loading a segmentation network: the built-in weights file, a MONAI bundle directory or a TorchScript file.

Everything is read from local files (no hub, no download). A bundle's network is built from its
``configs/inference.json`` ``network_def`` by ``monai.bundle.ConfigParser`` and its ``models/model.pt`` state
dict is loaded with ``torch.load(weights_only=True)``; a bundle holding only ``models/model.ts`` is loaded as
TorchScript. Building ``network_def`` instantiates what the config names (MONAI's config language can call any
importable function), and a TorchScript file is code: only point Interval at models you trust, as you would
with any program.

After loading, the network is probed once with a zero patch of the declared ROI and input channels; a model
whose output does not have one channel per declared class, on the same grid, is refused with a
``ModelError`` that says what was declared and what came out.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import ModelError
from models.segmentation.contract import ModelContract, ModelSource, bundle_files, read_bundle_metadata
from models.segmentation.network import NetConfig, build_network

__all__ = ["LoadedModel", "load_model"]

Net = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LoadedModel:
    net: Net
    contract: ModelContract
    version: str
    description: str


def load_model(source: ModelSource, device: torch.device) -> LoadedModel:
    """The network of ``source`` on ``device`` in eval mode, checked against its contract."""
    if source.kind == "builtin":
        net: Any = _builtin(source.path)
    elif source.kind == "torchscript":
        net = _torchscript(source.path, device, source.describe())
    else:
        net = _bundle(source.path, device, source.describe())
    contract = source.contract()
    net = net.to(device).eval()
    # a user's network is tried on its declared window; the built-in UNet, fully convolutional and built here
    # from its own config, on the smallest patch its downsampling allows (10 ms instead of 0.3 s at each load)
    patch = _builtin_probe_patch(net) if source.kind == "builtin" else contract.roi_kji
    _probe(net, contract, device, source.describe(), patch)
    return LoadedModel(net=net, contract=contract, version=source.version(), description=source.describe())


def _builtin(weights: Path) -> torch.nn.Module:
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        cfg = NetConfig.from_dict(state["net"])
        net = build_network(cfg)
        net.load_state_dict({k: v.float() for k, v in state["model"].items()})
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelError(
            f"weights {weights.name!r} do not fit the segmentation network: {type(e).__name__}"
        ) from None
    if state.get("encoding") != "encode_hu/v1":
        raise ModelError(f"weights {weights.name!r} expect input encoding {state.get('encoding')!r}")
    return net


def _torchscript(path: Path, device: torch.device, where: str) -> Any:
    """PyTorch 2.13 deprecates TorchScript in favour of torch.export, but it still loads, and MONAI bundles and
    users' exports ship it: its notice is silenced here, once per load, and nowhere else."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning
            )
            return torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
    except (RuntimeError, ValueError, OSError) as e:
        raise ModelError(f"{where} cannot be loaded with torch.jit.load: {_first_line(e)}") from None


def _bundle(bundle: Path, device: torch.device, where: str) -> Any:
    config, pt, ts = bundle_files(bundle)
    if config is not None and pt is not None:
        return _bundle_network(bundle, config, pt, where)
    if ts is not None:
        return _torchscript(ts, device, where)
    raise ModelError(
        f"{where} holds neither configs/inference.json with models/model.pt nor models/model.ts "
        f"(found: {', '.join(sorted(p.name for p in bundle.rglob('*') if p.is_file())[:8]) or 'nothing'})"
    )


def _bundle_network(bundle: Path, config: Path, weights: Path, where: str) -> torch.nn.Module:
    from monai.bundle.config_parser import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config(str(config))
        parser.read_meta(read_bundle_metadata(bundle))
        parser["bundle_root"] = str(bundle)
        key = next((k for k in ("network_def", "network") if k in parser), None)
        if key is None:
            raise ModelError(f"{where}: {config.name} defines no 'network_def'")
        net = parser.get_parsed_content(key, instantiate=True)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - the config language raises anything; it is reported, not hidden
        raise ModelError(
            f"{where}: building 'network_def' from {config.name} failed: {type(e).__name__}: {_first_line(e)}"
        ) from None
    if not isinstance(net, torch.nn.Module):
        raise ModelError(f"{where}: 'network_def' is a {type(net).__name__}, not a torch.nn.Module")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            state = next(state[k] for k in ("model", "state_dict", "network") if k in state)
        net.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, StopIteration) as e:
        raise ModelError(
            f"{where}: models/model.pt does not fit its network_def: {type(e).__name__}: {_first_line(e)}"
        ) from None
    return net


def _builtin_probe_patch(net: Any) -> tuple[int, int, int]:
    """A patch the built-in UNet takes: two voxels per axis at its deepest level."""
    side = 2 * 2 ** len(getattr(net, "strides", (2, 2, 2)))
    return (side, side, side)


def _probe(
    net: Any, contract: ModelContract, device: torch.device, where: str, patch_kji: Sequence[int]
) -> None:
    """Run the network once on a zero patch of ``patch_kji`` voxels; its channels, classes and shape must fit."""
    channels = len(contract.input_windows_hu)
    x = torch.zeros((1, channels, *patch_kji), device=device)
    try:
        with torch.inference_mode():
            y = net(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ModelError(
            f"{where} fails on a {channels}-channel patch of {list(patch_kji)} voxels (declared input "
            f"windows {len(contract.input_windows_hu)}, roi {list(contract.roi_kji)}): {_first_line(e)}"
        ) from None
    if isinstance(y, (tuple, list)):
        y = y[0]
    expected = (1, len(contract.output_classes), *patch_kji)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != expected:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ModelError(
            f"{where} returns {got} for a patch of {list(patch_kji)}; its declared output_classes "
            f"{list(contract.output_classes)} need {expected}"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
