"""Evaluation: single-point mIoU of prompted segmentation, and class-agnostic COCO metrics
of automatically generated masks.

Single-point mIoU follows the SAM paper's protocol: one foreground click per ground-truth
instance at the point farthest from its boundary, multimask output, and the candidate the
model itself ranks first (the "oracle" instead takes the best of the candidates).
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.ndimage import distance_transform_edt

from amg.rle import to_coco_rle
from model import Sam
from model.transforms import input_shape, resize_image, scale_coords

from .losses import mask_iou

# COCOeval.stats, in order, with maxDets = [1, 100, 1000]: AP and its variants use the
# largest maxDets (1000), as COCOeval.summarize does.
COCO_STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR100", "AR1000", "AR_small", "AR_medium", "AR_large",
)
MAX_DETS = [1, 100, 1000]


def interior_points(masks: np.ndarray) -> np.ndarray:
    """N x H x W bool masks (none empty) -> N x 2 (x, y): the pixel of each mask farthest
    from its boundary. The image border counts as boundary."""
    points = np.zeros((len(masks), 2), np.int64)
    for i, mask in enumerate(masks):
        distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(distance.argmax()), distance.shape)
        points[i] = x, y
    return points


MULTIMASK = slice(1, None)  # the decoder's three multimask tokens (token 0: the single-mask output)


@torch.inference_mode()
def point_batches(
    model: Sam, image: np.ndarray, points: np.ndarray, tokens: slice = MULTIMASK, batch_size: int = 64
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One foreground click per prompt on an H x W x 3 uint8 image, decoded batch_size
    prompts at a time. points: N x 2 (x, y) in image pixels. Yields, per batch, the masks
    n x T x H x W bool and predicted IoUs n x T (on the CPU) of the mask tokens `tokens`."""
    h, w = image.shape[:2]
    resized = resize_image(image, model.image_size) if max(h, w) != model.image_size else image
    x = torch.as_tensor(np.ascontiguousarray(resized), device=model.device).permute(2, 0, 1)[None].float()
    embedding = model.encode(x)
    image_pe = model.prompt_encoder.get_dense_pe()
    coords = scale_coords(torch.as_tensor(points, dtype=torch.float32), (h, w), model.image_size).to(model.device)
    for start in range(0, len(points), batch_size):
        chunk = coords[start : start + batch_size, None]  # n x 1 x 2
        labels = torch.ones(chunk.shape[:2], dtype=torch.long, device=model.device)
        sparse, dense = model.prompt_encoder((chunk, labels), None, None)
        low_res, iou = model.mask_decoder.predict_masks(embedding, image_pe, sparse, dense)
        logits = model.postprocess_masks(low_res[:, tokens].float(), input_shape(h, w, model.image_size), (h, w))
        yield (logits > model.mask_threshold).cpu(), iou[:, tokens].float().cpu()


def predict_from_points(
    model: Sam, image: np.ndarray, points: np.ndarray, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """point_batches of the multimask output, concatenated: masks N x 3 x H x W bool and
    predicted IoUs N x 3."""
    masks, ious = zip(*point_batches(model, image, points, batch_size=batch_size))
    return torch.cat(masks), torch.cat(ious)


def single_point_miou(model: Sam, examples: Iterable[Any]) -> dict[str, float]:
    """Single-point mIoU over all instances of some examples (anything with .image H x W
    x 3 uint8 and .masks N x H x W bool: synthetic Scenes, training Examples).

    Returns miou (candidate with the highest predicted IoU), oracle_miou (best candidate),
    and instances (how many were prompted)."""
    was_training = model.training
    model.eval()
    chosen, oracle = [], []
    for example in examples:
        gt = np.asarray(example.masks, bool)
        gt = gt[gt.reshape(len(gt), -1).any(1)]
        if not len(gt):
            continue
        masks, predicted_iou = predict_from_points(model, example.image, interior_points(gt))
        ious = mask_iou(masks, torch.from_numpy(gt)[:, None])  # N x 3
        chosen.append(ious[torch.arange(len(ious)), predicted_iou.argmax(1)])
        oracle.append(ious.max(1).values)
    model.train(was_training)
    if not chosen:
        return {"miou": float("nan"), "oracle_miou": float("nan"), "instances": 0}
    chosen, oracle = torch.cat(chosen), torch.cat(oracle)
    return {"miou": float(chosen.mean()), "oracle_miou": float(oracle.mean()), "instances": len(chosen)}


def coco_metrics(
    images: Sequence[Any], gts: Sequence[np.ndarray], predictions: Sequence[Sequence[dict]]
) -> dict[str, float]:
    """Class-agnostic COCO mask AP/AR of predicted masks against ground truth.

    images: one id per image (any values; only their order matters for the report);
    gts: per image an N x H x W bool array of instance masks; predictions: per image a list
    of records with "segmentation" (COCO RLE {"size", "counts"}) and "predicted_iou", which
    is the detection score. Returns COCO_STAT_NAMES -> value, with maxDets [1, 100, 1000]
    (AP over IoU 0.5:0.95 at 1000 detections); -1 where COCO leaves a value undefined
    (e.g. no ground truth of that size).
    """
    if not len(images) == len(gts) == len(predictions):
        raise ValueError(f"got {len(images)} images, {len(gts)} ground truths, {len(predictions)} prediction lists")
    coco_images, annotations, detections = [], [], []
    for image_id, (gt, records) in enumerate(zip(gts, predictions), start=1):
        gt = np.asarray(gt, bool)
        h, w = gt.shape[-2:]
        coco_images.append({"id": image_id, "height": h, "width": w, "file_name": str(images[image_id - 1])})
        for mask in gt:
            rle = to_coco_rle(mask)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": rle, "area": float(coco_mask.area(rle)), "bbox": coco_mask.toBbox(rle).tolist(),
            })
        for record in records:
            detections.append({
                "image_id": image_id, "category_id": 1, "segmentation": to_coco_rle(record["segmentation"]),
                "score": float(record["predicted_iou"]),
            })

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground_truth = COCO()
        ground_truth.dataset = {"images": coco_images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}
        ground_truth.createIndex()
        results = ground_truth.loadRes(detections) if detections else _empty_results(ground_truth)
        evaluation = COCOeval(ground_truth, results, iouType="segm")
        evaluation.params.useCats = 0
        evaluation.params.maxDets = MAX_DETS
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(value) for name, value in zip(COCO_STAT_NAMES, evaluation.stats)}


def _empty_results(ground_truth: COCO) -> COCO:
    """A result set with no detections (COCO.loadRes refuses an empty list)."""
    results = COCO()
    results.dataset = {"images": ground_truth.dataset["images"], "annotations": [], "categories": ground_truth.dataset["categories"]}
    results.createIndex()
    return results
