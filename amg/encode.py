"""Stage 1 of automatic mask generation: an image and its crops to image embeddings."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.predictor import PRECISIONS, validate_image
from model.sam import Sam
from model.transforms import resize_image

from .grid import crop_boxes
from .params import AmgParams


@dataclass
class EncodedImage:
    """What the decoder needs of one image: one embedding per crop.

    embeddings: K x C x e x e (fp32, or bf16/fp16 to halve the payload); crop_boxes: K x 4
    XYXY pixels; crop_layers: K; input_sizes: K x 2 (h, w) of each crop after resizing to
    the model's input frame; orig_size: (h, w) of the image."""

    embeddings: torch.Tensor
    crop_boxes: np.ndarray
    crop_layers: np.ndarray
    input_sizes: np.ndarray
    orig_size: tuple[int, int]


@torch.inference_mode()
def encode_image(
    model: Sam, image: np.ndarray, params: AmgParams, precision: str = "fp32", batch_size: int = 4
) -> EncodedImage:
    """image: H x W x 3 uint8 RGB. Crops are resized exactly as the predictor resizes a
    whole image, and encoded batch_size at a time to bound memory."""
    validate_image(image)
    orig_size = image.shape[:2]
    boxes, layers = crop_boxes(orig_size, params.crop_n_layers, params.crop_overlap_ratio)
    resized = [resize_image(np.ascontiguousarray(image[y0:y1, x0:x1]), model.image_size)
               for x0, y0, x1, y1 in boxes]
    dtype = PRECISIONS[precision]
    chunks = []
    for start in range(0, len(resized), batch_size):
        batch = [_padded(model, r) for r in resized[start:start + batch_size]]
        x = torch.cat(batch)
        with torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
            chunks.append(model.image_encoder(x).to(dtype or torch.float32))
    return EncodedImage(
        embeddings=torch.cat(chunks),
        crop_boxes=np.asarray(boxes, dtype=np.int64),
        crop_layers=np.asarray(layers, dtype=np.int64),
        input_sizes=np.asarray([r.shape[:2] for r in resized], dtype=np.int64),
        orig_size=(int(orig_size[0]), int(orig_size[1])),
    )


def _padded(model: Sam, resized: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(resized, device=model.device).permute(2, 0, 1)[None].float()
    return model.preprocess(x)
