"""Helpers to build the official segment-anything model (the test oracle) with the same
architecture as one of our configs, and to give every parameter random values."""
from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import (
    ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer,
)

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
