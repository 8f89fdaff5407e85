"""Training the image side of the "minilm-crops" embedder (model.crop_embedder).

Each synthetic instance's crop (model.crop_embedder.mask_crop) should land on the frozen
MiniLM embedding of its full name ("red striped ellipse"): the logits are the crop vector's
cosine similarity to every possible name, scaled by a learned temperature, and the loss is
cross-entropy with the true name: CLIP's contrastive objective with every name of the
vocabulary as a negative, and a text tower that does not move.

Evaluation on held-out scenes: how often the nearest name is the right one, and how often
each word (colour, texture, shape) of the nearest name is right.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch.nn import functional as F

from model.crop_embedder import CropEncoder, mask_crop

from .synthetic import COLOURS, SHAPES, TEXTURES, Scene

MIN_AREA = 12  # px: a crop of fewer visible pixels says too little about its object


def name_vocabulary() -> list[str]:
    """Every full name a synthetic instance can have."""
    return [" ".join(w) for w in itertools.product(COLOURS, TEXTURES, SHAPES)]


def scene_crops(scenes: Iterable[Scene]) -> tuple[np.ndarray, list[str]]:
    """N x S x S x 3 uint8 crops of the instances with at least MIN_AREA visible pixels, and
    their names."""
    crops, names = [], []
    for scene in scenes:
        for name, mask in zip(scene.names, scene.masks):
            if mask.sum() >= MIN_AREA:
                crops.append(mask_crop(scene.image, mask))
                names.append(name)
    return np.stack(crops), names


@dataclass
class CropTrainConfig:
    steps: int = 2000
    batch: int = 128
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.05
    width: int = 32
    seed: int = 0


def train_crop_encoder(crops: np.ndarray, names: list[str], name_vectors: torch.Tensor, vocabulary: list[str],
                       cfg: CropTrainConfig, log: Callable[[dict], None] | None = None
                       ) -> tuple[CropEncoder, list[dict]]:
    """Fit a CropEncoder so each crop is nearest to its name's vector among all names.
    name_vectors: len(vocabulary) x D unit rows (the frozen text side)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    index = {n: k for k, n in enumerate(vocabulary)}
    labels = torch.tensor([index[n] for n in names])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous()
    encoder = CropEncoder(name_vectors.shape[1], cfg.width)
    log_scale = torch.nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
    optimizer = torch.optim.AdamW([*encoder.parameters(), log_scale], lr=cfg.lr, weight_decay=cfg.weight_decay)
    history, start = [], time.perf_counter()
    encoder.train()
    for step in range(cfg.steps):
        scale = min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * scale
        rows = torch.as_tensor(rng.choice(len(x), min(cfg.batch, len(x)), replace=False))
        batch = x[rows]
        if rng.random() < 0.5:  # a mirrored object keeps its name
            batch = batch.flip(-1)
        logits = encoder(batch) @ name_vectors.T * log_scale.exp().clamp(max=100)
        loss = F.cross_entropy(logits, labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        row = dict(step=step + 1, loss=float(loss.detach()),
                   accuracy=float((logits.argmax(1) == labels[rows]).float().mean()),
                   seconds=time.perf_counter() - start)
        history.append(row)
        if log is not None:
            log(row)
    return encoder.eval(), history


@torch.inference_mode()
def crop_accuracy(embed_images: Callable[[np.ndarray], np.ndarray], crops: np.ndarray, names: list[str],
                  name_vectors: np.ndarray, vocabulary: list[str]) -> dict[str, float]:
    """Nearest-name accuracy of embedded crops, whole name and per word; with chance levels."""
    nearest = (embed_images(crops) @ name_vectors.T).argmax(1)
    got = [vocabulary[k].split() for k in nearest]
    want = [n.split() for n in names]
    out = {"name": float(np.mean([g == w for g, w in zip(got, want)]))}
    for k, word in enumerate(("colour", "texture", "shape")):
        out[word] = float(np.mean([g[k] == w[k] for g, w in zip(got, want)]))
    out |= {"chance_name": 1 / len(vocabulary), "crops": len(names)}
    return out
