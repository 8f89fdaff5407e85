"""Refit a checkpoint's IoU head to rank the candidates of automatic mode.

Interactive training teaches the IoU head to predict the IoU of each mask with the object
the user meant. Automatic mode asks another question of it: of the 3 x 1024 candidates of a
32 x 32 point grid, which are real objects? Most grid points fall on background, on object
borders or on parts, cases the interactive recipe rarely shows the head. So this step
regresses the head, and only the head, on the automatic-mode target: for every candidate
mask of the grid on synthetic scenes, its best mask IoU with any ground-truth instance. The
input is the IoU token's final embedding, which the rest of the network computes unchanged,
so the embeddings are computed once and the fit itself takes seconds. Everything except the
IoU head's weights stays bit-identical (masks, stability, text grounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from amg import AmgParams
from model import Sam

from .evaluate import point_batches

ALL_TOKENS = slice(None)  # the single-mask token and the three multimask tokens


@dataclass
class IouTargets:
    """tokens: N x C final IoU-token embeddings of the grid prompts (N = scenes x points);
    best: N x T the best mask IoU of each of the T mask tokens' masks with any ground-truth
    instance; scene: N the index of each prompt's scene (to hold whole scenes back)."""

    tokens: torch.Tensor
    best: torch.Tensor
    scene: torch.Tensor


@torch.inference_mode()
def grid_targets(model: Sam, scenes: Iterable, points_per_side: int = 32, batch: int = 128) -> IouTargets:
    """scenes: objects with .image (H x W x 3 uint8) and .masks (G x H x W bool). The
    prompts are the generator's whole-image grid of points_per_side x points_per_side."""
    grid = AmgParams(points_per_side=points_per_side).grids()[0]
    head = model.mask_decoder.iou_prediction_head
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0].float().cpu()))
    best, scene_index = [], []
    try:
        for index, scene in enumerate(scenes):
            h, w = scene.image.shape[:2]
            truth = torch.from_numpy(np.asarray(scene.masks).reshape(len(scene.masks), -1)).float()
            for masks, _ in point_batches(model, scene.image, grid * np.array([w, h]), ALL_TOKENS, batch):
                best.append(_best_iou(masks.flatten(2).float(), truth))
                scene_index.append(torch.full((len(masks),), index))
    finally:
        hook.remove()
    return IouTargets(torch.cat(captured), torch.cat(best), torch.cat(scene_index))


def _best_iou(masks: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """masks B x T x P (0/1), truth G x P -> B x T best IoU with any instance (0 if none)."""
    if not len(truth):
        return torch.zeros(masks.shape[:2])
    inter = masks @ truth.T  # B x T x G
    union = masks.sum(-1, keepdim=True) + truth.sum(-1) - inter
    return (inter / union.clamp_min(1)).amax(-1)


def ranking_quality(head: torch.nn.Module, data: IouTargets) -> dict[str, float]:
    """MSE of the head's predictions against the targets, and the Spearman rank correlation
    between predicted and actual IoU over the multimask tokens (what the generator ranks)."""
    with torch.no_grad():
        predicted = head(data.tokens)
    mse = float(((predicted - data.best) ** 2).mean())
    a, b = predicted[:, 1:].flatten(), data.best[:, 1:].flatten()
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).float()
    return {"mse": mse, "spearman": float(torch.corrcoef(ranks)[0, 1])}


def fit_iou_head(head: torch.nn.Module, data: IouTargets, steps: int = 3000, batch: int = 1024, lr: float = 1e-3,
                 weight_decay: float = 1e-4, seed: int = 0) -> list[float]:
    """Regress head (in place) on data with MSE, AdamW and a cosine schedule. Returns the
    training loss every 100 steps."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    head.train()
    with torch.enable_grad():
        for step in range(steps):
            rows = torch.randint(0, len(data.tokens), (batch,), generator=generator)
            loss = ((head(data.tokens[rows]) - data.best[rows]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 100 == 0 or step == steps - 1:
                losses.append(loss.item())
    head.eval()
    return losses


def split_scenes(data: IouTargets, held_back: float = 0.1) -> tuple[IouTargets, IouTargets]:
    """The prompts of the first scenes for fitting, those of the last held_back share of
    scenes (at least one when there are two or more) for measuring."""
    scenes = int(data.scene.max()) + 1 if len(data.scene) else 0
    cut = scenes - max(1 if scenes > 1 else 0, round(scenes * held_back))
    fit, back = data.scene < cut, data.scene >= cut
    return (IouTargets(data.tokens[fit], data.best[fit], data.scene[fit]),
            IouTargets(data.tokens[back], data.best[back], data.scene[back]))
