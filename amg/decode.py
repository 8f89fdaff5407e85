"""Stage 2 of automatic mask generation: prompt every crop's embedding with its point
grid and keep the candidates that pass the per-mask filters.

Work is done only where it counts: the predicted-IoU filter runs on the decoder's output
before anything is upsampled; only survivors are thresholded at full size (in bounded
chunks, computing full-size values only along mask edges: amg.upsample), boxes come
without masks, so NMS within the crop runs before any mask exists, and only its survivors
are made into masks, run-length encoded in one vectorized pass per chunk. What leaves
this stage is compact: RLE counts, boxes and scores, no full-size masks."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from model.precision import decoding_model
from model.predictor import PRECISIONS
from model.sam import Sam
from model.transforms import scale_coords

from .encode import EncodedImage
from .masks import box_near_crop_edge, box_nms, uncrop_masks
from .params import AmgParams
from .rle import masks_to_rle_counts
from .stability_bounds import may_pass
from .upsample import ThresholdUpsampler

# Candidates x full-size pixels made into masks at once: 16 masks of a 768 x 1024 image,
# one at a time from ~12 MP up. A fixed 16 peaked at twice the memory of chunks of 2 on a
# 3000 x 4000 image (+660 MB vs +312 MB over the run) and took longer (11.4 vs 8.2 s).
UPSAMPLE_PIXELS = 16 * 768 * 1024
# Candidates x output pixels filtered at once (no full-size tensors: only the mixed blocks'
# pixels are evaluated); 96 candidates of a 768 x 1024 image. Small chunks pay torch's
# per-op overhead many times over: filtering in chunks of 96 instead of 16 took 20-28%
# less decode time there (2 cores).
FILTER_PIXELS = 96 * 768 * 1024
# Candidates whose stability is bounded at once: the bounds hold a few low-res-sized arrays
# per candidate, no full-size pixels. The default batch's 192 candidates in one call: the
# compiled CPU bounds took ~30% longer in calls of 96 (a fixed cost per call, and uneven
# candidates split over threads).
BOUNDS_CHUNK = 1024


def chunk_size(pixels: int, budget: int) -> int:
    """Candidates of `pixels` output pixels each that fit a budget of pixels (at least one)."""
    return max(1, budget // max(1, pixels))


@dataclass
class Candidates:
    """Masks of one crop that passed the per-mask filters and NMS within the crop.

    rle_counts: uncompressed COCO counts of each mask in the full image frame;
    boxes: N x 4 XYXY (inclusive pixel indices) in crop coordinates; iou_preds,
    stability: N; points: N x 2 prompt (x, y) in crop coordinates; crop_box: XYXY."""

    crop_box: tuple[int, int, int, int]
    rle_counts: list[np.ndarray] = field(default_factory=list)
    boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.int64))
    iou_preds: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    stability: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    points: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.float64))
    num_prompts: int = 0
    funnel: dict = field(default_factory=dict)
    texts: list[str] | None = None  # the phrase of each mask, when phrases prompted (amg.text)


@torch.inference_mode()
def decode_image(model: Sam, encoded: EncodedImage, params: AmgParams, precision: str = "fp32") -> list[Candidates]:
    """Candidates of every crop of an encoded image."""
    grids = params.grids()
    return [
        decode_crop(model, encoded.embeddings[k:k + 1], tuple(int(v) for v in encoded.crop_boxes[k]),
                    grids[int(encoded.crop_layers[k])], tuple(encoded.input_sizes[k]), encoded.orig_size,
                    params, precision)
        for k in range(len(encoded.crop_boxes))
    ]


@torch.inference_mode()
def decode_crop(
    model: Sam,
    embedding: torch.Tensor,
    crop_box: tuple[int, int, int, int],
    grid: np.ndarray,
    input_size: tuple[int, int],
    orig_size: tuple[int, int],
    params: AmgParams,
    precision: str = "fp32",
) -> Candidates:
    x0, y0, x1, y1 = crop_box
    crop_size = (y1 - y0, x1 - x0)
    points = grid * np.array(crop_size)[None, ::-1]  # normalized -> crop pixels (x, y)
    dtype = PRECISIONS[precision]
    # bf16 on a CPU the native kernels serve: their matmuls in bf16 on the float32 model (faster
    # than torch's bf16 there, which casts op by op); elsewhere a bf16 twin under autocast.
    pixels = embedding.shape[-2] * embedding.shape[-1]
    native_bf16 = dtype == torch.bfloat16 and model.mask_decoder.native_bf16_for(pixels)
    if native_bf16:
        dtype = None
    model = decoding_model(model, dtype)
    embedding = embedding.to(model.device, dtype or torch.float32)
    parts: list[Survivors] = []
    funnel = dict(candidates=0, iou=0, stability=0, crop_edge=0)
    autocast = lambda: torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    with autocast():
        image_pe = model.prompt_encoder.get_dense_pe()  # the same for every batch
    filter_chunk_size = chunk_size(crop_size[0] * crop_size[1], FILTER_PIXELS)
    # Candidates that may pass the stability filter (its bounds ruled the others out), held
    # until a chunk's worth is evaluated exactly: most are ruled out, and an exact pass per
    # chunk of the decoder's output would mostly pay torch's per-op overhead on a handful.
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def evaluate_pending(final: bool = False) -> None:
        """Whole chunks of the pending candidates (and, when final, the rest)."""
        if not pending:
            return
        low_res, iou, prompt_points = (torch.cat(column) for column in zip(*pending))
        pending.clear()
        whole = len(iou) if final else len(iou) - len(iou) % filter_chunk_size
        for first in range(0, whole, filter_chunk_size):  # chunks bound the exact evaluation's memory
            chunk = slice(first, min(first + filter_chunk_size, whole))
            parts.append(filter_chunk(model, low_res[chunk], iou[chunk], prompt_points[chunk], input_size,
                                      crop_size, crop_box, orig_size, params, funnel))
        if whole < len(iou):
            pending.append((low_res[whole:], iou[whole:], prompt_points[whole:]))

    for start in range(0, len(points), params.points_per_batch):
        batch = points[start:start + params.points_per_batch]
        coords = torch.as_tensor(scale_coords(batch, crop_size, model.image_size), device=model.device)
        with autocast():
            low_res, iou, prompt_idx = _decode_survivors(model, embedding, image_pe, coords, params.pred_iou_thresh,
                                                         native_bf16)
        funnel["candidates"] += 3 * len(batch)
        funnel["iou"] += len(iou)
        prompt_points = torch.as_tensor(batch)[prompt_idx.cpu()]
        for first in range(0, len(iou), BOUNDS_CHUNK):
            chunk = slice(first, first + BOUNDS_CHUNK)
            maybe = stability_candidates(model, low_res[chunk], input_size, crop_size, params)
            pending.append((low_res[chunk].index_select(0, maybe), iou[chunk].index_select(0, maybe),
                            prompt_points[chunk].index_select(0, maybe.cpu())))
            if sum(len(p[1]) for p in pending) >= filter_chunk_size:
                evaluate_pending()
    evaluate_pending(final=True)
    out = Candidates(crop_box)
    if parts:
        survivors = Survivors.cat(parts)
        # NMS within the crop needs only boxes and scores: masks are made for its survivors alone.
        survivors = survivors.select(box_nms(survivors.boxes, survivors.iou, params.box_nms_thresh))
        out = survivors.encode(model, input_size, crop_size, crop_box, orig_size)
    out.num_prompts, out.funnel = len(points), funnel
    return out


def _decode_survivors(model: Sam, embedding: torch.Tensor, image_pe: torch.Tensor, coords: torch.Tensor,
                      iou_thresh: float, native_bf16: bool = False):
    """Single-point prompts B x 2 -> the multimask candidates whose predicted IoU is
    above iou_thresh, in (prompt, token) order: low-res logits N x 4e x 4e, IoU N and
    the prompt index of each. Masks are computed only for surviving tokens."""
    labels = torch.ones(len(coords), 1, dtype=torch.int64, device=coords.device)
    sparse, dense = model.prompt_encoder((coords[:, None, :], labels), None, None)
    decoder = model.mask_decoder
    iou, scored = decoder.score(embedding, image_pe, sparse, dense, native_bf16=native_bf16)
    iou = iou[:, 1:].float()  # the multimask tokens
    keep = iou > iou_thresh if iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
    rows = keep.any(dim=1).nonzero().squeeze(1)
    if len(rows) == 0:
        e = 4 * scored.size[0]
        return iou.new_zeros(0, e, e), iou.new_zeros(0), rows
    token_index = torch.arange(1, decoder.num_mask_tokens)
    low_res = decoder.mask_logits(scored, rows, token_index).float()
    kept = keep[rows]
    prompt_idx = rows[:, None].expand_as(kept)
    if bool(kept.all()):  # a low IoU threshold keeps them all: views, no copy of the logits
        return low_res.flatten(0, 1), iou[rows].flatten(), prompt_idx.flatten()
    return low_res[kept], iou[rows][kept], prompt_idx[kept]


@dataclass
class Survivors:
    """Candidates of one crop that passed the per-mask filters, before their masks exist:
    low-res logits N x l x l, boxes N x 4 (XYXY, inclusive, crop coordinates), iou and
    stability N, prompt points N x 2 (CPU), index N (CPU): each one's position in the
    candidates given to filter_chunk."""

    low_res: torch.Tensor
    boxes: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor
    index: torch.Tensor

    @staticmethod
    def cat(parts: list["Survivors"]) -> "Survivors":
        return Survivors(*(torch.cat([getattr(p, k) for p in parts]) for k in Survivors.__dataclass_fields__))

    def select(self, keep: torch.Tensor) -> "Survivors":
        cpu = keep.cpu()
        return Survivors(self.low_res[keep], self.boxes[keep], self.iou[keep], self.stability[keep],
                         self.points[cpu], self.index[cpu])

    def encode(self, model: Sam, input_size, crop_size, crop_box, orig_size) -> Candidates:
        """Their masks at the model's threshold, as RLE in the full image frame, a few at a
        time (memory bounded by UPSAMPLE_PIXELS, the masks placed in the image frame, and by
        MIXED_PIXELS, their exact evaluation)."""
        upsampler = ThresholdUpsampler(self.low_res.shape[-1], model.image_size, input_size, crop_size,
                                       self.low_res.device)
        counts = []
        for chunk in self.low_res.split(chunk_size(orig_size[0] * orig_size[1], UPSAMPLE_PIXELS)):
            for _, thresholded in upsampler.classify(chunk, [model.mask_threshold]).exact_groups():
                counts += masks_to_rle_counts(uncrop_masks(thresholded.masks(0), crop_box, *orig_size))
        return Candidates(crop_box, counts, self.boxes.cpu(), self.iou.cpu(), self.stability.cpu(), self.points)


def stability_candidates(model, low_res, input_size, crop_size, params) -> torch.Tensor:
    """Indices (on low_res' device) of the candidates (low-res logits B x l x l) whose
    stability score may reach the threshold, from bounds on their pixel counts (all of them
    when there is no threshold)."""
    thresh = params.stability_score_thresh
    if thresh <= 0:
        return torch.arange(len(low_res), device=low_res.device)
    upsampler = ThresholdUpsampler(low_res.shape[-1], model.image_size, input_size, crop_size, low_res.device)
    return may_pass(upsampler, low_res, model.mask_threshold, params.stability_score_offset, thresh
                    ).to(low_res.device)


def filter_chunk(model, low_res, iou, points, input_size, crop_size, crop_box, orig_size, params,
                 funnel) -> Survivors:
    """The stability and crop-edge filters on a few candidates that stability_candidates
    kept (low-res logits B x l x l, iou B, prompt points B x 2), at crop resolution without
    full-size logits or masks (amg.upsample): stability from pixel counts, boxes from the
    blocks; the exact evaluation in groups (Blocks.groups) that bound its memory."""
    t, offset, thresh = model.mask_threshold, params.stability_score_offset, params.stability_score_thresh
    upsampler = ThresholdUpsampler(low_res.shape[-1], model.image_size, input_size, crop_size, low_res.device)
    blocks = upsampler.classify(low_res, [t + offset, t - offset, t])
    kept, kept_boxes, kept_stability = [], [], []
    for group, thresholded in blocks.exact_groups():
        counts = thresholded.counts([0, 1])
        # The official score: IoU of the masks at threshold +- offset (NaN when both are empty).
        stability = counts[:, 0] / counts[:, 1]
        keep = stability >= thresh if thresh > 0 else torch.ones_like(stability, dtype=torch.bool)
        funnel["stability"] += int(keep.sum())
        rows = keep.nonzero().squeeze(1)
        boxes = thresholded.boxes(2, rows)  # only for the stable ones
        inside = ~box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
        funnel["crop_edge"] += int(inside.sum())
        rows = rows[inside]
        kept.append(group[rows])
        kept_boxes.append(boxes[inside])
        kept_stability.append(stability[rows])
    rows, boxes, stability = torch.cat(kept), torch.cat(kept_boxes), torch.cat(kept_stability)
    cpu_rows = rows.cpu()
    return Survivors(low_res[rows], boxes, iou[rows], stability, points[cpu_rows], cpu_rows)
