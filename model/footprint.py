"""The memory one inference worker needs, estimated from the model's shape.

A pipeline actor reserves this much of its node's memory with Ray (pipeline.pools), so that
the scheduler places no more model actors on a node than it can hold: without it Ray packs
actors by CPU count alone, and sixteen ViT-H workers on a 64 GB node are killed for memory.

The estimate is the process (Python, torch and a Ray worker), the weights the worker holds,
and the larger of the encoder's and the decoder's working sets, which run one after the
other (freed memory is reused: model.memory). Each term follows the model's shape; the
constants were fitted to peaks measured at one thread with every candidate kept (thresholds
0 / 0, random weights for the official sizes), coco_rle output, 32 x 32 points, and round up:

    model         measured peak (GiB)                 estimate (GiB)
    vit_tiny256   0.92-1.04 (photos of 0.26-6.5 MP)   1.22 (the bundled checkpoint)
    vit_b         3.67 (768 x 1024 photo)             4.18
    vit_b         2.99 (encoder alone)                3.25 (an encoder actor)
    vit_l         4.40 (encoder alone)                4.75
    vit_h         5.75 (encoder alone)                6.16

benchmarks/footprint.py measures them again beside the estimate.

The generator's memory does not grow with the photo's size (its full-size work goes in
bounded groups, amg.upsample.MIXED_PIXELS; measured flat from 0.26 to 6.5 MP), but it does
with the prompts decoded together and the candidates a crop keeps.
"""
from __future__ import annotations

from typing import Literal

import torch

from .config import SamConfig
from .sam import Sam

GIB = 2**30
# A worker process with torch imported, before any model: measured 0.68-0.72 GiB; a Ray
# actor with the pipeline's modules imported and the bundled model loaded: 0.77 GiB.
RUNTIME_BYTES = int(0.85 * GIB)
# The exact stability pass and the survivors' masks at full size: amg.upsample.MIXED_PIXELS
# (4 x 768 x 1024) pixels at ~80 bytes each.
FULL_SIZE_BYTES = 4 * 768 * 1024 * 80

Role = Literal["fused", "encoder", "decoder"]


def parameter_bytes(config: SamConfig, role: Role = "fused") -> int:
    """fp32 weights a worker of this role holds (a decoder worker drops the image encoder)."""
    with torch.device("meta"):  # shapes only
        sam = Sam(config)
    modules = {"fused": [sam], "encoder": [sam.image_encoder],
               "decoder": [sam.prompt_encoder, sam.mask_decoder]}[role]
    return sum(p.numel() * 4 for m in modules for p in m.parameters())


def encoder_working_bytes(config: SamConfig) -> int:
    """Peak activations of one image through the encoder: a global attention block's scores
    (queries x keys per head, and their softmax) plus the token activations around it."""
    tokens = config.embedding_size ** 2
    return 2 * config.encoder_num_heads * tokens**2 * 4 + 48 * tokens * config.encoder_embed_dim * 4


def decoder_working_bytes(config: SamConfig, points: int, points_per_batch: int) -> int:
    """Peak of the grid decode: one batch of prompts' per-prompt image features (a few
    copies of prompts x tokens x channels), the low-resolution logits of every candidate a
    crop keeps (points x multimask outputs, 4x the embedding's side), and the full-size work."""
    tokens = config.embedding_size ** 2
    batch = 5 * min(points, points_per_batch) * tokens * config.prompt_embed_dim * 4
    low_res = (4 * config.embedding_size) ** 2
    candidates = 2 * points * config.num_multimask_outputs * low_res * 4
    return batch + candidates + FULL_SIZE_BYTES


def worker_bytes(config: SamConfig, role: Role = "fused", points: int = 32 * 32, points_per_batch: int = 64) -> int:
    """Estimated peak resident memory of one worker of this role running the generator with
    `points` prompts per crop, `points_per_batch` at a time."""
    working = []
    if role in ("fused", "encoder"):
        working.append(encoder_working_bytes(config))
    if role in ("fused", "decoder"):
        working.append(decoder_working_bytes(config, points, points_per_batch))
    return RUNTIME_BYTES + parameter_bytes(config, role) + max(working)
