"""The network and its input encoding, shared by training and inference."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.networks.nets.unet import UNet

__all__ = ["NetConfig", "build_network", "encode_hu"]


@dataclass(frozen=True)
class NetConfig:
    channels: tuple[int, ...] = (12, 24, 48, 96)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    in_channels: int = 2
    out_channels: int = 4  # background, liver, lung, lesion (core.types.LabelId)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetConfig:
        return cls(
            channels=tuple(d["channels"]),
            strides=tuple(d["strides"]),
            num_res_units=int(d["num_res_units"]),
            in_channels=int(d["in_channels"]),
            out_channels=int(d["out_channels"]),
        )


def build_network(cfg: NetConfig) -> torch.nn.Module:
    return UNet(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
    )


def encode_hu(hu: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Two windows of the HU volume ``[k, j, i]`` -> ``[2, k, j, i]`` in about [0, 1]:
    soft tissue (-160..240 HU) for liver lesions and nodes, lung (-1000..400 HU) for nodules."""
    soft = np.clip((hu + 160.0) / 400.0, 0.0, 1.0)
    wide = np.clip((hu + 1000.0) / 1400.0, 0.0, 1.0)
    return np.stack([soft, wide]).astype(np.float32)
