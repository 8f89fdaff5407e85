"""Stage 3 of automatic mask generation: NMS across crops (the decode stage suppressed
within each crop), small-region cleanup, and the output records. Runs on CPU from the compact decode payload."""
from __future__ import annotations

import torch
from torchvision.ops import box_area

from .decode import Candidates
from .masks import box_nms, uncrop_boxes, uncrop_points
from .params import AmgParams
from .regions import clean_small_regions
from .rle import counts_to_crop, rle_area, rle_bbox, rle_to_coco


def postprocess(crops: list[Candidates], orig_size: tuple[int, int], params: AmgParams) -> list[dict]:
    """Candidates of every crop of one image -> the generator's output records:
    segmentation (per params.output_mode), area, bbox (XYWH, as pycocotools' toBbox),
    predicted_iou, point_coords, stability_score, crop_box (XYWH).

    Candidates of phrases (amg.text: one mask per phrase, whole image) are not suppressed
    by NMS: two phrases may well name the same object, and each asked for its mask. Their
    records carry text_prompt and an empty point list."""
    by_text = crops[0].texts is not None
    merged = _merge_crops([_uncrop(c) for c in crops], params)
    if params.min_mask_region_area > 0 and merged["counts"]:
        merged = _clean_small_regions(merged, orig_size, params, suppress=not by_text)
    return _records(merged, orig_size, params.output_mode)


def _uncrop(c: Candidates) -> dict:
    """A crop's candidates (already suppressed within the crop by the decode stage) in
    image coordinates."""
    out = dict(
        counts=list(c.rle_counts),
        boxes=uncrop_boxes(c.boxes, c.crop_box),
        iou=c.iou_preds,
        stability=c.stability,
        points=uncrop_points(c.points, c.crop_box),
        crop_boxes=torch.tensor([c.crop_box], dtype=torch.int64).expand(len(c.boxes), 4),
    )
    if c.texts is not None:
        out["texts"] = list(c.texts)
    return out


def _merge_crops(parts: list[dict], params: AmgParams) -> dict:
    merged = {k: [c for p in parts for c in p[k]] if isinstance(parts[0][k], list) else torch.cat([p[k] for p in parts])
              for k in parts[0]}
    if len(parts) > 1:
        # Prefer masks from smaller crops: they saw the object at a higher resolution.
        scores = 1.0 / box_area(merged["crop_boxes"].double()).float()
        merged = _select(merged, box_nms(merged["boxes"], scores, params.crop_nms_thresh))
    return merged


def _clean_small_regions(data: dict, orig_size: tuple[int, int], params: AmgParams, suppress: bool = True) -> dict:
    """Fill small holes and drop small islands of every mask, then NMS again preferring
    masks that needed no change (unless suppress is off); re-encode the changed masks
    that survive. Each mask is worked inside its box (amg.regions): no full-size masks."""
    cleaned = [clean_small_regions(c, orig_size, params.min_mask_region_area) for c in data["counts"]]
    changed = [i for i, c in enumerate(cleaned) if c is not None]
    boxes = data["boxes"].clone()  # the decode stage's tight boxes of the unchanged masks
    if changed:
        boxes[changed] = torch.tensor([cleaned[i].box() for i in changed], dtype=boxes.dtype)
    scores = torch.tensor([c is None for c in cleaned], dtype=torch.float32)
    keep = box_nms(boxes, scores, max(params.box_nms_thresh, params.crop_nms_thresh)) if suppress \
        else torch.arange(len(cleaned))
    counts = list(data["counts"])
    for i in keep.tolist():
        if cleaned[i] is not None:
            counts[i] = cleaned[i].counts(orig_size)
    return _select({**data, "counts": counts, "boxes": boxes}, keep)


def _records(data: dict, orig_size: tuple[int, int], output_mode: str) -> list[dict]:
    counts = data["counts"]
    if output_mode == "coco_rle":
        segmentations = rle_to_coco(counts, orig_size)
    elif output_mode == "uncompressed_rle":
        segmentations = [{"size": list(orig_size), "counts": c.tolist()} for c in counts]
    else:
        segmentations = [counts_to_crop(c, orig_size, (0, orig_size[0]), (0, orig_size[1])) for c in counts]
    texts = data.get("texts")
    records = []
    for i, seg in enumerate(segmentations):
        x0, y0, x1, y1 = data["crop_boxes"][i].tolist()
        records.append(dict(
            segmentation=seg,
            area=rle_area(counts[i]),
            bbox=rle_bbox(counts[i], orig_size),
            predicted_iou=float(data["iou"][i]),
            point_coords=[] if texts is not None else [data["points"][i].tolist()],
            stability_score=float(data["stability"][i]),
            crop_box=[x0, y0, x1 - x0, y1 - y0],
        ))
        if texts is not None:
            records[-1]["text_prompt"] = texts[i]
    return records


def _select(data: dict, keep: torch.Tensor) -> dict:
    idx = keep.tolist()
    return {k: [v[i] for i in idx] if isinstance(v, list) else v[keep] for k, v in data.items()}
