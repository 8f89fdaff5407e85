"""An image side for a text embedder: object crops -> vectors in the text embedder's space.

The paper trains its text input on CLIP *image* embeddings of mask crops (any mask, no
names needed) and prompts with CLIP *text* embeddings at inference, relying on CLIP having
put both in one space. An embedder that can do both has `embed_images(crops)` beside
`embed(texts)` (ImageTextEmbedder); the text path can then train on unnamed masks.

CLIP's weights cannot be fetched here, so the project ships its own small joint embedder:
a convolutional crop encoder trained (training/crop_embedder.py) to land each synthetic
object's crop on the frozen MiniLM embedding of its name, contrastively against every other
name, as CLIP aligns images and captions. Registered as "minilm-crops": texts go through
MiniLM unchanged, crops through the crop encoder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .text import MiniLMEmbedder, TextEmbedder

CROP_SIZE = 32
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "checkpoints" / "crop_embedder_minilm.pt"
BACKGROUND = 128  # grey: what replaces the pixels of a crop outside its mask


@runtime_checkable
class ImageTextEmbedder(TextEmbedder, Protocol):
    def embed_images(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """N object crops (mask_crop) -> N x dim float32 unit rows, in the space of embed()."""


def mask_crop(image: np.ndarray, mask: np.ndarray, size: int = CROP_SIZE, margin: float = 0.1) -> np.ndarray:
    """The object a mask covers as a size x size x 3 uint8 crop: its bounding box (plus a
    margin), pixels outside the mask grey, resized with the aspect ratio kept (padded grey).
    An empty mask gives a grey crop."""
    out = np.full((size, size, 3), BACKGROUND, np.uint8)
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return out
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    pad = int(round(margin * max(y1 - y0, x1 - x0)))
    y0, x0 = max(0, y0 - pad), max(0, x0 - pad)
    y1, x1 = min(mask.shape[0], y1 + pad), min(mask.shape[1], x1 + pad)
    crop = np.where(mask[y0:y1, x0:x1, None], image[y0:y1, x0:x1], BACKGROUND).astype(np.uint8)
    h, w = crop.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    t = torch.from_numpy(crop).permute(2, 0, 1)[None].float()
    resized = F.interpolate(t, (nh, nw), mode="area")[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    oy, ox = (size - nh) // 2, (size - nw) // 2
    out[oy:oy + nh, ox:ox + nw] = resized
    return out


class CropEncoder(nn.Module):
    """size x size RGB crops -> dim-wide unit vectors (a small CNN; ~0.3 M parameters)."""

    def __init__(self, dim: int, width: int = 48) -> None:
        super().__init__()
        layers, c = [], 3
        for k in range(4):  # 32 -> 16 -> 8 -> 4 -> 2
            out = width * 2 ** min(k, 2)
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.GELU(), nn.MaxPool2d(2)]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * 4, dim)
        self.register_buffer("mean", torch.tensor([BACKGROUND / 255.0] * 3).view(1, 3, 1, 1))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S uint8 or float (0-255) -> B x dim, unit rows."""
        x = crops.float() / 255.0 - self.mean
        return F.normalize(self.head(self.features(x).flatten(1)), dim=-1)


class MiniLMCropEmbedder(MiniLMEmbedder):
    """MiniLM for texts, the trained CropEncoder for object crops, in one space."""

    name = "minilm-crops"

    def __init__(self, weights: str | Path = DEFAULT_WEIGHTS, device: str = "cpu") -> None:
        super().__init__(device)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        self.encoder = CropEncoder(self.dim, state["width"]).eval()
        self.encoder.load_state_dict(state["model"])
        self.meta = state.get("meta", {})

    @torch.inference_mode()
    def embed_images(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        if not len(crops):
            return np.zeros((0, self.dim), np.float32)
        x = torch.from_numpy(np.stack([np.asarray(c, np.uint8) for c in crops])).permute(0, 3, 1, 2)
        if x.shape[1:] != (3, CROP_SIZE, CROP_SIZE):
            raise ValueError(f"crops must be {CROP_SIZE} x {CROP_SIZE} x 3 (mask_crop), got {tuple(x.shape[1:])}")
        return torch.cat([self.encoder(part) for part in x.split(512)]).numpy().astype(np.float32)
