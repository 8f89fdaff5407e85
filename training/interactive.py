"""One training forward pass: encode a batch of images, then play a simulated user against
the decoder for several rounds of prompts on every ground-truth mask, and sum the losses.

It is one nn.Module whose forward does the whole step, so that DistributedDataParallel,
which synchronises gradients through forward, sees everything the step computes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from model import Sam

from .losses import mask_iou, segmentation_loss
from .prompts import error_points, first_boxes, first_points

STATS = ("loss", "focal", "dice", "iou_mse", "miou_first", "miou")


class SimulatedInteraction(nn.Module):
    """Sam trained on simulated interactive sessions.

    iterations: decoder passes per mask; the first uses the first prompt (multimask
    output: a lone point is ambiguous), later ones the single-mask output.
    mask_only_iterations: how many of the last passes add no new click and only refine
    from the previous mask, as in the paper.
    box_probability: chance that a mask's first prompt is a noisy box rather than a point.
    low_res_loss: compute focal and dice on the decoder's own low-res logits against the
    ground truth's coverage per low-res pixel (a soft target), instead of on logits
    upscaled to the input frame: 16x fewer pixels for the losses and their gradients.
    IoUs (the IoU head's target, the choice of clicks) stay measured at full resolution.
    """

    def __init__(
        self, sam: Sam, iterations: int = 4, mask_only_iterations: int = 1, box_probability: float = 0.5,
        low_res_loss: bool = False,
    ):
        super().__init__()
        if iterations < 1 or not 0 <= mask_only_iterations < iterations:
            raise ValueError("need iterations >= 1 and 0 <= mask_only_iterations < iterations")
        self.low_res_loss = low_res_loss
        self.sam = sam
        self.iterations = iterations
        self.mask_only_iterations = mask_only_iterations
        self.box_probability = box_probability

    def forward(
        self,
        images: list[torch.Tensor],
        masks: torch.Tensor,
        image_index: torch.Tensor,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """images: B resized images 3 x h x w (0-255 RGB, longest side = image_size);
        masks: M x S x S bool ground truth in the padded input frame (S = image_size);
        image_index: M, the image of each mask. Returns the STATS as scalars; "loss" is
        the one to minimise."""
        embeddings = encode_images(self.sam, images)[image_index]  # M x C x e x e
        use_box = torch.rand(len(masks), generator=generator, device=masks.device) < self.box_probability
        sums = {name: masks.new_zeros((), dtype=torch.float) for name in STATS}
        # Masks are decoded in two groups, so every call has one prompt structure.
        for box_first, group in ((True, use_box), (False, ~use_box)):
            if not bool(group.any()):
                continue
            stats = self.interact(embeddings[group], masks[group], box_first, generator)
            for name in STATS:
                sums[name] = sums[name] + stats[name] * group.sum()
        return {name: value / len(masks) for name, value in sums.items()}

    def interact(
        self, embeddings: torch.Tensor, masks: torch.Tensor, use_box: bool, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """All decoder passes for M masks that share the kind of first prompt; the mean of
        the per-pass losses."""
        prompts = first_boxes(masks, generator) if use_box else first_points(masks, generator)
        size = masks.shape[-2:]
        rows = torch.arange(len(masks), device=masks.device)
        totals = {"loss": 0.0, "focal": 0.0, "dice": 0.0, "iou_mse": 0.0}
        clicks_until = self.iterations - self.mask_only_iterations
        coverage = None
        for step in range(self.iterations):
            low_res, iou_predictions = self.sam.decode(embeddings, **prompts.decode_kwargs(), multimask_output=step == 0)
            if self.low_res_loss:
                if coverage is None:
                    coverage = F.adaptive_avg_pool2d(masks[:, None].float(), low_res.shape[-2:])[:, 0]
                with torch.no_grad():
                    logits = F.interpolate(low_res.detach().float(), size, mode="bilinear", align_corners=False)
                    actual_iou = mask_iou(logits > 0, masks[:, None])
                loss = segmentation_loss(low_res, coverage, iou_predictions, actual_iou=actual_iou)
            else:
                logits = F.interpolate(low_res.float(), size, mode="bilinear", align_corners=False)
                loss = segmentation_loss(logits, masks, iou_predictions)
            for name, value in (("loss", loss.total), ("focal", loss.focal), ("dice", loss.dice), ("iou_mse", loss.iou_mse)):
                totals[name] = totals[name] + value
            if step == 0:
                miou_first = loss.iou.mean()
            if step + 1 == self.iterations:
                break
            # The chosen candidate is what the simulated user looks at next.
            prompts = prompts.with_mask(low_res[rows, loss.best][:, None])
            if step + 1 < clicks_until:
                predicted = logits[rows, loss.best].detach() > 0
                prompts = prompts.with_point(*error_points(predicted, masks, generator))
        stats = {name: value / self.iterations for name, value in totals.items()}
        return {**stats, "miou_first": miou_first, "miou": loss.iou.mean()}


def encode_images(sam: Sam, images: list[torch.Tensor]) -> torch.Tensor:
    """B resized images 3 x h x w -> B x C x e x e embeddings; one batched call when the
    images share a shape (the usual case), else one call each."""
    if all(image.shape == images[0].shape for image in images):
        return sam.encode(torch.stack(images))
    return torch.cat([sam.encode(image[None]) for image in images])
