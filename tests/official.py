"""Helpers to build the official segment-anything model (the test oracle) with the same
architecture as one of our configs, to give every parameter random values, and to tell a
rounding flip from a real difference between two automatic masks."""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
from pycocotools import mask as coco_mask
from segment_anything import SamPredictor
from segment_anything.modeling import (
    ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer,
)

from amg.rle import to_coco_rle
from model.config import SamConfig


def build_official(config: SamConfig) -> Sam:
    e = config.embedding_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=config.encoder_depth,
            embed_dim=config.encoder_embed_dim,
            img_size=config.image_size,
            mlp_ratio=config.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=config.encoder_num_heads,
            patch_size=config.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=config.encoder_global_attn_indexes,
            window_size=config.window_size,
            out_chans=config.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(e, e),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
        pixel_mean=list(config.pixel_mean),
        pixel_std=list(config.pixel_std),
    ).eval()


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter, including those initialized to zeros or
    ones (position tables, norms), so that a wrongly wired one shows up."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        fan_in = p.shape[1:].numel() if p.ndim > 1 else 1
        std = (1.0 / fan_in) ** 0.5 if p.ndim > 1 else 0.1
        noise = torch.randn(p.shape, generator=g) * std
        if p.ndim == 1 and name.endswith("weight"):
            noise += 1.0  # norm scales stay around one
        p.copy_(noise)


def pixels_off_threshold(official: Sam, image, ours: dict, theirs: dict) -> float:
    """Where two automatic records of the same prompt differ, how far the official logits lie
    from the mask threshold (the largest |logit - threshold| over the differing pixels; 0
    when the masks are equal). Rounding can flip only pixels within float error of the
    threshold; a real difference shows up as a pixel far from it. The logits are the official
    predictor's for the record's point on its crop, of the multimask output whose mask is
    closest to the official record's; outside the crop they count as infinitely far."""
    a, b = (coco_mask.decode(to_coco_rle(r["segmentation"])).astype(bool) for r in (ours, theirs))
    differ = a != b
    if not differ.any():
        return 0.0
    x0, y0, w, h = (int(v) for v in theirs["crop_box"])
    predictor = SamPredictor(official)
    predictor.set_image(np.ascontiguousarray(image[y0:y0 + h, x0:x0 + w]))
    point = np.asarray(theirs["point_coords"], dtype=np.float64) - [x0, y0]
    logits, _, _ = predictor.predict(point_coords=point, point_labels=np.ones(len(point)), multimask_output=True,
                                     return_logits=True)
    full = np.full((len(logits), *image.shape[:2]), np.inf, dtype=np.float64)
    full[:, y0:y0 + h, x0:x0 + w] = logits - official.mask_threshold
    closest = max(range(len(full)), key=lambda k: ((full[k] > 0) & b).sum() / max(((full[k] > 0) | b).sum(), 1))
    return float(np.abs(full[closest][differ]).max())
