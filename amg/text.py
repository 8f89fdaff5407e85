"""Text-prompted automatic annotation: every image is prompted with the same phrases
instead of a point grid, one mask per phrase, through the same filters and the same compact
payload as the grid.

A phrase becomes a click where the model's grounding head points (model.text_grounding);
of the decoder's candidates for that click, the one it ranks first is the phrase's mask.
Phrases are embedded once, up front (model.text), and travel as vectors; only the whole-
image embedding is prompted (crop layers do not apply to a phrase)."""
from __future__ import annotations

import numpy as np
import torch

from model.predictor import PRECISIONS
from model.sam import Sam

from .decode import FILTER_PIXELS, Candidates, Survivors, chunk_size, filter_chunk, stability_candidates
from .encode import EncodedImage
from .params import AmgParams


@torch.inference_mode()
def decode_texts(model: Sam, encoded: EncodedImage, texts: list[str], text_embeddings: np.ndarray,
                 params: AmgParams, precision: str = "fp32") -> list[Candidates]:
    """Candidates of the whole image for each phrase (T x D embeddings) that pass the
    predicted-IoU and stability filters; Candidates.texts names each one's phrase."""
    if len(texts) != len(text_embeddings):
        raise ValueError(f"{len(texts)} texts but {len(text_embeddings)} text embeddings")
    x0, y0, x1, y1 = (int(v) for v in encoded.crop_boxes[0])
    crop_box, crop_size = (x0, y0, x1, y1), (y1 - y0, x1 - x0)
    dtype = PRECISIONS[precision]
    embedding = encoded.embeddings[:1].to(model.device, dtype or torch.float32)
    vectors = torch.as_tensor(np.asarray(text_embeddings, np.float32), device=model.device)
    with torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
        low_res, iou = model.decode(embedding, text_embedding=vectors, multimask_output=True,
                                    input_size=tuple(int(v) for v in encoded.input_sizes[0]))
    best = iou.float().argmax(dim=1)
    rows = torch.arange(len(texts), device=best.device)
    low_res, iou = low_res[rows, best].float(), iou[rows, best].float()
    funnel = dict(candidates=len(texts), iou=0, stability=0, crop_edge=0)
    keep = (iou > params.pred_iou_thresh).nonzero().squeeze(1) if params.pred_iou_thresh > 0 \
        else torch.arange(len(iou), device=iou.device)
    funnel["iou"] = len(keep)
    parts, kept_texts = [], []
    input_size = tuple(int(v) for v in encoded.input_sizes[0])
    # Filtered in chunks of the grid path's size (decode_crop): the same work, the same memory bound.
    for chunk in keep.split(chunk_size(crop_size[0] * crop_size[1], FILTER_PIXELS)):
        chunk = chunk[stability_candidates(model, low_res[chunk], input_size, crop_size, params)]
        # Points are a grid's; a phrase has none (the records carry an empty point list).
        no_points = torch.zeros(len(chunk), 2, dtype=torch.float64)
        part = filter_chunk(model, low_res[chunk], iou[chunk], no_points, input_size, crop_size, crop_box,
                            encoded.orig_size, params, funnel)
        parts.append(part)
        kept_texts += [texts[i] for i in chunk.cpu()[part.index].tolist()]
    out = Candidates(crop_box)
    if parts:  # no NMS: each phrase asked for its own mask
        out = Survivors.cat(parts).encode(model, input_size, crop_size, crop_box, encoded.orig_size)
    out.texts, out.num_prompts, out.funnel = kept_texts, len(texts), funnel
    return [out]
