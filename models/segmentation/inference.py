"""Sliding-window inference of the committed segmenter (a ``core.ports.Segmenter``).

The model is loaded once per process and reused; torch runs on one thread (on two shared cores
two threads ran 3-13x slower). Input is the CT in HU on its native grid; output labels and the
lesion probability are on the same grid, so no resampling back is needed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from monai.inferers.utils import sliding_window_inference

from core.errors import ModelError
from core.types import Segmentation, Volume
from models.segmentation.network import NetConfig, build_network, encode_hu

__all__ = ["DEFAULT_WEIGHTS", "MonaiSegmenter"]

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "segmenter.pt"
ROI_KJI = (48, 96, 96)


class MonaiSegmenter:
    """UNet organ + lesion segmenter from a weights file written by ``models.segmentation.train``."""

    def __init__(
        self, weights: Path = DEFAULT_WEIGHTS, device: str | None = None, overlap: float = 0.25
    ) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        if not weights.is_file():
            raise ModelError(
                f"segmentation weights {weights.name!r} not found; run 'make weights' or set "
                "INTERVAL_SEGMENTER_WEIGHTS to a weights file"
            )
        raw = weights.read_bytes()
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            cfg = NetConfig.from_dict(state["net"])
            net = build_network(cfg)
            net.load_state_dict({k: v.float() for k, v in state["model"].items()})
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise ModelError(
                f"weights {weights.name!r} do not fit the segmentation network: {type(e).__name__}"
            ) from None
        if state.get("encoding") != "encode_hu/v1":
            raise ModelError(f"weights {weights.name!r} expect input encoding {state.get('encoding')!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.to(self.device).eval()
        self.overlap = overlap
        self._version = f"interval-seg-unet-{hashlib.sha256(raw).hexdigest()[:12]}"

    @property
    def model_version(self) -> str:
        return self._version

    @torch.inference_mode()
    def probabilities(self, volume: Volume) -> np.ndarray:
        """Softmax class probabilities ``[C, k, j, i]`` (float32)."""
        x = torch.from_numpy(encode_hu(volume.voxels_hu))[None].to(self.device)
        logits = sliding_window_inference(
            x, roi_size=ROI_KJI, sw_batch_size=1, predictor=self.net, overlap=self.overlap, mode="gaussian"
        )
        assert isinstance(logits, torch.Tensor)
        return torch.softmax(logits, dim=1)[0].float().cpu().numpy()

    def segment(self, volume: Volume) -> Segmentation:
        prob = self.probabilities(volume)
        labels = np.argmax(prob, axis=0).astype(np.uint8)
        return Segmentation(labels=labels, lesion_probability=prob[3].astype(np.float32))
