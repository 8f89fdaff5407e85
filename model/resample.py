"""A model's weights carried over to a finer (or coarser) patch size, for fine-tuning at
a higher embedding resolution (the progressive-resizing idea of FlexiViT).

    fine = with_patch_size(model, 8)   # a 16-px model on a 256 image: 16 x 16 -> 32 x 32

What changes with the patch size, and how each piece is carried over:
- the patch-embedding kernel: for a factor f = old / new, the new kernel is the f x f
  sum-pool of the old one, so that the new model's first layer on an image equals the old
  one's on that image upsampled f times (nearest);
- the absolute position embedding: resampled (bicubic) to the new grid;
- the relative-position tables: resampled (linear) so that one offset still means the
  same distance in pixels; window sizes scale by f for the same reason.
The prompt encoder and mask decoder work at any grid size and keep their weights."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .config import SamConfig
from .image_encoder import resample_rel_pos
from .sam import Sam


def config_with_patch_size(config: SamConfig, patch_size: int) -> SamConfig:
    """config at patch_size, its attention windows scaled to cover the same pixels, and
    named for it (vit_tiny256 at 8 px: vit_tiny256-p8). The ratio of the two patch sizes
    must be a whole number."""
    old = config.patch_size
    if patch_size == old:
        return config
    if old % patch_size and patch_size % old:
        raise ValueError(f"patch_size {patch_size} and the model's {old}: one must divide the other")
    window = config.window_size * old / patch_size
    if window % 1:
        raise ValueError(f"window_size {config.window_size} cannot scale by {old}/{patch_size} to a whole number")
    return SamConfig(**config.model_dump() | {
        "patch_size": patch_size, "window_size": int(window), "name": f"{config.name}-p{patch_size}",
    })


def with_patch_size(model: Sam, patch_size: int) -> Sam:
    """A new model (same mode and device as `model`) at config_with_patch_size, its
    weights carried over from `model`'s."""
    if patch_size == model.config.patch_size:
        return model
    config = config_with_patch_size(model.config, patch_size)
    new = Sam(config)
    target = new.state_dict()
    state = {}
    for name, value in model.state_dict().items():
        shape = target[name].shape
        if value.shape == shape:
            state[name] = value
        elif name.endswith("patch_embed.proj.weight"):
            state[name] = _resample_kernel(value, shape[-1])
        elif name.endswith("pos_embed"):
            grid = F.interpolate(value.permute(0, 3, 1, 2).float(), size=tuple(shape[1:3]), mode="bicubic",
                                 align_corners=False)
            state[name] = grid.permute(0, 2, 3, 1).to(value.dtype)
        elif name.endswith(("rel_pos_h", "rel_pos_w")):
            state[name] = resample_rel_pos(value, shape[0])
        else:
            raise ValueError(f"{name}: shape {tuple(value.shape)} -> {tuple(shape)} has no resampling rule")
    new.load_state_dict(state)
    device = next(model.parameters()).device
    return new.to(device).train(model.training)


def _resample_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """out x in x k x k patch kernel -> out x in x size x size."""
    k = kernel.shape[-1]
    if k % size == 0:  # finer patches: sum-pool, exact for a nearest-upsampled image
        factor = k // size
        return F.avg_pool2d(kernel, factor) * factor * factor
    # coarser patches: each old weight spread over the factor x factor block it now covers
    factor = size // k
    return kernel.repeat_interleave(factor, -1).repeat_interleave(factor, -2) / (factor * factor)
