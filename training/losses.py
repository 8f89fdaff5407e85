"""Losses of the SAM paper: focal + dice on the mask (20 : 1), mean squared error on the
predicted IoU, and "best of the candidates" for ambiguous prompts.

Shapes: logits are M x K x H x W (M masks, K candidates per mask), targets M x H x W bool,
predicted IoUs M x K. Per-candidate losses are M x K; the mask loss of a prompt is that of
its best candidate only, so the other candidates stay free to cover other readings of an
ambiguous prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import sigmoid_focal_loss

FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0


@dataclass
class SegmentationLoss:
    """total: scalar to minimise; focal, dice, iou_mse: their scalar parts (means over
    masks, focal and dice of the chosen candidates); best: M index of the chosen candidate;
    iou: M actual IoU of the chosen candidate's binary mask (no gradient)."""

    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou_mse: torch.Tensor
    best: torch.Tensor
    iou: torch.Tensor


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """... x H x W logits and 0/1 targets -> ... focal loss, the mean over pixels."""
    loss = sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="none")
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """... x H x W logits and 0/1 targets -> ... soft dice loss, 1 - 2|P.T| / (|P| + |T|)."""
    probs = logits.sigmoid().flatten(-2)
    targets = targets.to(probs.dtype).flatten(-2)
    overlap = (probs * targets).sum(-1)
    return 1 - (2 * overlap + smooth) / (probs.sum(-1) + targets.sum(-1) + smooth)


def mask_iou(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """... x H x W bool predictions and targets -> ... IoU (1 when both are empty)."""
    intersection = (predicted & targets).flatten(-2).sum(-1)
    union = (predicted | targets).flatten(-2).sum(-1)
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(intersection, dtype=torch.float))


def segmentation_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    iou_predictions: torch.Tensor,
    focal_weight: float = FOCAL_WEIGHT,
    dice_weight: float = DICE_WEIGHT,
    iou_weight: float = IOU_WEIGHT,
    actual_iou: torch.Tensor | None = None,
) -> SegmentationLoss:
    """Loss of M prompts with K candidate masks each.

    logits: M x K x H x W at the resolution the targets have; targets: M x H x W, bool or
    soft (the fraction of each pixel the object covers, for a loss at reduced resolution);
    iou_predictions: M x K. The IoU head is trained on every candidate: it has to rank
    them at inference time. actual_iou (M x K, no gradient): the IoUs of the binary
    candidates when they are measured elsewhere (at full resolution); required for soft
    targets."""
    logits, iou_predictions = logits.float(), iou_predictions.float()
    targets = targets[:, None].expand_as(logits)
    focal = focal_loss(logits, targets)  # M x K
    dice = dice_loss(logits, targets)  # M x K
    mask_loss = focal_weight * focal + dice_weight * dice
    best = mask_loss.detach().argmin(dim=1)
    rows = torch.arange(len(best), device=best.device)

    if actual_iou is None:
        if targets.dtype != torch.bool:
            raise ValueError("soft targets need actual_iou measured on binary masks")
        with torch.no_grad():
            actual_iou = mask_iou(logits > 0, targets)  # M x K
    iou_mse = ((iou_predictions - actual_iou) ** 2).mean()
    total = mask_loss[rows, best].mean() + iou_weight * iou_mse
    return SegmentationLoss(
        total=total,
        focal=focal[rows, best].mean(),
        dice=dice[rows, best].mean(),
        iou_mse=iou_mse,
        best=best,
        iou=actual_iou[rows, best],
    )
