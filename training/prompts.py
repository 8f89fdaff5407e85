"""Simulated user prompts for interactive training, following the SAM paper's recipe.

The first prompt for a ground-truth mask is a foreground point drawn uniformly inside it or
its bounding box with noise. Each later prompt is one click drawn uniformly from the error
region of the previous prediction: positive where the prediction missed the object (false
negative), negative where it spilled over it (false positive). The previous low-res logits
go back in as the mask prompt.

Everything works on a batch of B masks at once; randomness comes from one torch.Generator
so a seed fixes every prompt. Coordinates are (x, y) pixel indices in the model's input
frame, the frame `Sam.decode` expects.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torchvision.ops import masks_to_boxes

BOX_NOISE_FRACTION = 0.1  # noise std as a fraction of the box side
BOX_NOISE_MAX = 20.0  # px, the most a box edge moves


@dataclass
class Prompts:
    """The prompts given so far for B masks.

    point_coords: B x N x 2 (x, y) or None; point_labels: B x N (1 fg, 0 bg) or None;
    boxes: B x 4 XYXY or None; mask_input: B x 1 x 4e x 4e low-res logits or None.
    """

    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    mask_input: torch.Tensor | None = None

    def with_point(self, coords: torch.Tensor, labels: torch.Tensor) -> "Prompts":
        """Add one click per mask: coords B x 2, labels B."""
        coords, labels = coords[:, None].float(), labels[:, None].long()
        if self.point_coords is not None:
            coords = torch.cat([self.point_coords, coords], dim=1)
            labels = torch.cat([self.point_labels, labels], dim=1)
        return replace(self, point_coords=coords, point_labels=labels)

    def with_mask(self, low_res_logits: torch.Tensor) -> "Prompts":
        """Replace the mask prompt by B x 1 x 4e x 4e logits (no gradient flows back)."""
        return replace(self, mask_input=low_res_logits.detach())

    def decode_kwargs(self) -> dict[str, torch.Tensor | None]:
        """Keyword arguments for `Sam.decode`."""
        return dict(
            point_coords=self.point_coords,
            point_labels=self.point_labels,
            boxes=self.boxes,
            mask_input=self.mask_input,
        )


def sample_pixels(regions: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One pixel per region, uniformly among its set pixels.

    regions: B x H x W bool. Returns (coords B x 2 float (x, y), found B bool); a row
    with an empty region gets coords (0, 0) and found False.
    """
    b, h, w = regions.shape
    # The argmax of i.i.d. uniform scores over the set pixels is a uniform draw among them.
    scores = torch.rand(regions.shape, generator=generator, device=regions.device)
    scores = scores.masked_fill_(~regions, -1.0).view(b, h * w)
    flat = scores.argmax(dim=1)
    coords = torch.stack([flat % w, flat // w], dim=1).float()
    found = regions.view(b, h * w).any(dim=1)
    return coords * found[:, None], found


def first_points(masks: torch.Tensor, generator: torch.Generator) -> Prompts:
    """A foreground click drawn uniformly inside each mask (B x H x W bool, none empty)."""
    coords, _ = sample_pixels(masks, generator)
    return Prompts().with_point(coords, torch.ones(len(masks), dtype=torch.long, device=masks.device))


def noisy_boxes(
    masks: torch.Tensor,
    generator: torch.Generator,
    noise_fraction: float = BOX_NOISE_FRACTION,
    max_noise: float = BOX_NOISE_MAX,
) -> torch.Tensor:
    """B x 4 XYXY boxes: each mask's tight box with every edge moved by Gaussian noise of
    std noise_fraction x the box side along that axis, clipped to +-max_noise px and to
    the image. masks: B x H x W bool, none empty."""
    h, w = masks.shape[-2:]
    boxes = masks_to_boxes(masks).float()  # x0, y0, x1, y1 of the set pixels
    sides = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # width, height, width, height
    noise = torch.randn(boxes.shape, generator=generator, device=masks.device) * noise_fraction * sides
    boxes = boxes + noise.clamp(-max_noise, max_noise)
    limits = boxes.new_tensor([w - 1, h - 1, w - 1, h - 1])
    boxes = torch.minimum(boxes.clamp(min=0), limits)
    # Noise can cross the edges of a thin box; keep the corners ordered.
    low, high = torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])
    return torch.cat([low, high], dim=1)


def first_boxes(masks: torch.Tensor, generator: torch.Generator) -> Prompts:
    """A noisy box around each mask (B x H x W bool, none empty)."""
    return Prompts(boxes=noisy_boxes(masks, generator))


def error_points(
    predicted: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next click for each mask: uniform in the error region of the prediction.

    predicted, masks: B x H x W bool. Returns coords B x 2 (x, y) and labels B: 1 on a
    false-negative pixel, 0 on a false-positive one. A perfect prediction has no error
    region; it gets a positive click inside the object, which asks for no change.
    """
    coords, found = sample_pixels(predicted ^ masks, generator)
    x, y = coords[:, 0].long(), coords[:, 1].long()
    labels = masks[torch.arange(len(masks), device=masks.device), y, x].long()
    if not bool(found.all()):
        perfect = ~found
        coords[perfect], _ = sample_pixels(masks[perfect], generator)
        labels[perfect] = 1
    return coords, labels
