"""The automatic stage's filter thresholds, chosen per checkpoint from the round's own
human masks.

Fixed thresholds mean different things for different checkpoints: a fine-tuned model's
logits and IoU scores are scaled differently from its parent's, so the same
`pred_iou_thresh` / `stability_score_thresh` may keep many masks of one and almost none of
the next (measured on the engine experiment: the stability filter kept 28 candidates per
image for the seed checkpoint and 3-7 for its successors). What a data team fixes is the
quality of what goes into the dataset. So, before the automatic stage of round r, the
checkpoint runs the generator with its filters off on the images that people annotated in
this round (stages manual and semi_auto), and each (pred_iou_thresh,
stability_score_thresh) pair of a grid is scored by what it would have kept there (after
the generator's box NMS): precision = the share of kept masks that match a human mask at
mask IoU >= match_iou. The pair that keeps the most masks at precision >= the target wins
(ties: the higher thresholds); if no pair reaches the target, the most precise one does.

The human masks of a round are its calibration set only: they never decide promotion (the
held-out set does). Calibration runs the whole image (no crop layers) and without
small-region cleanup."""
from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as coco_mask

from amg import AmgParams, AutomaticMaskGenerator
from amg.masks import box_nms
from amg.rle import to_coco_rle

PRED_IOU_GRID = tuple(np.round(np.arange(0.0, 0.951, 0.05), 2))
STABILITY_GRID = tuple(np.round(np.arange(0.0, 0.951, 0.05), 2))


def candidates(model, images: list[np.ndarray], params: AmgParams) -> list[list[dict]]:
    """Every candidate of each image that the generator could keep at some threshold: its
    filters and NMS off, whole image only."""
    loose = params.model_copy(update=dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
                                          crop_n_layers=0, min_mask_region_area=0, output_mode="coco_rle"))
    generator = AutomaticMaskGenerator(model, loose)
    return [generator.generate(image) for image in images]


def choose_thresholds(per_image: list[list[dict]], truths: list[list[dict]], target_precision: float,
                      box_nms_thresh: float, match_iou: float = 0.5) -> dict:
    """per_image: candidate records (COCO RLE, predicted_iou, stability_score, bbox XYWH);
    truths: the human masks' COCO RLEs of the same images. Returns the chosen thresholds
    with what they keep on these images (masks per image, precision, recall of the human
    masks) and whether the target was reached."""
    scored = []  # per image: (iou, stability, boxes XYXY, matched-a-human-mask, which human mask)
    n_truth = sum(len(t) for t in truths)
    for records, truth in zip(per_image, truths):
        iou = torch.tensor([r["predicted_iou"] for r in records], dtype=torch.float32)
        stability = torch.tensor([r["stability_score"] for r in records], dtype=torch.float32)
        boxes = torch.tensor([[x, y, x + w - 1, y + h - 1] for x, y, w, h in (r["bbox"] for r in records)],
                             dtype=torch.float32).reshape(-1, 4)
        overlap = np.zeros((len(records), len(truth)))
        if records and truth:
            overlap = np.asarray(coco_mask.iou([to_coco_rle(r["segmentation"]) for r in records],
                                               [to_coco_rle(t) for t in truth],
                                               [0] * len(truth)))
        best = overlap.argmax(1) if len(truth) else np.zeros(len(records), dtype=np.int64)
        hit = (overlap.max(1) >= match_iou) if len(truth) else np.zeros(len(records), dtype=bool)
        scored.append((iou, stability, boxes, hit, best))
    results = []
    for p in PRED_IOU_GRID:
        for s in STABILITY_GRID:
            kept = hits = found = 0
            for iou, stability, boxes, hit, best in scored:
                index = ((iou > p) & (stability >= s)).nonzero().squeeze(1)
                index = index[box_nms(boxes[index], iou[index], box_nms_thresh)].numpy()
                kept += len(index)
                hits += int(hit[index].sum())
                found += len(set(best[index][hit[index]].tolist()))
            precision = hits / kept if kept else 0.0
            results.append(dict(pred_iou_thresh=float(p), stability_score_thresh=float(s), kept=kept,
                                precision=precision, recall=found / n_truth if n_truth else 0.0))
    reaching = [r for r in results if r["precision"] >= target_precision and r["kept"]]
    if reaching:
        best = max(reaching, key=lambda r: (r["kept"], r["pred_iou_thresh"], r["stability_score_thresh"]))
    else:
        best = max(results, key=lambda r: (r["precision"], r["kept"]))
    images = max(len(per_image), 1)
    return dict(pred_iou_thresh=best["pred_iou_thresh"], stability_score_thresh=best["stability_score_thresh"],
                target_precision=target_precision, reached=bool(reaching), precision=best["precision"],
                recall=best["recall"], masks_per_image=best["kept"] / images, images=len(per_image),
                human_masks=n_truth)


def calibrate_on_scenes(model, scenes, params: AmgParams, target_precision: float) -> dict:
    """The same choice on images with ground truth (objects with .image, H x W x 3 uint8,
    and .masks, N x H x W bool), e.g. synthetic scenes: what jobs/calibrate_checkpoint.py
    records in a checkpoint."""
    scenes = list(scenes)
    return choose_thresholds(candidates(model, [s.image for s in scenes], params), [list(s.masks) for s in scenes],
                             target_precision, params.box_nms_thresh)


def human_masks(root: str, r: int, stages: tuple[str, ...] = ("manual", "semi_auto")) -> list[tuple[str, list[dict]]]:
    """(uri, COCO RLEs) of the images with masks that people made in round r."""
    from dataset import iter_images

    out = []
    for row in iter_images(root):
        masks = [a["segmentation"] for a in row["annotations"] or ()
                 if a.get("stage") in stages and a.get("round") == r]
        if masks:
            out.append((row["uri"], [to_coco_rle(m) for m in masks]))
    return out


def calibrate(checkpoint: str, root: str, r: int, params: AmgParams, target_precision: float) -> dict | None:
    """Thresholds for round r's automatic stage (see the module docstring); None when the
    round has no human masks to calibrate on."""
    from model import load_checkpoint
    from training.data import parquet_example

    labelled = human_masks(root, r)
    if not labelled:
        return None
    model, _ = load_checkpoint(checkpoint)
    images = [parquet_example(uri, []).image for uri, _ in labelled]
    return choose_thresholds(candidates(model, images, params), [m for _, m in labelled], target_precision,
                             params.box_nms_thresh)
