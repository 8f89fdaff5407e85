"""Synthetic image records with realistic masks, for tests and size benchmarks (no model).

Masks are smooth random blobs of log-uniform size placed anywhere in the image, like the
mix of small parts and large regions the automatic generator produces.
"""
from __future__ import annotations

import hashlib

import numpy as np
from pycocotools import mask as coco_mask
from scipy import ndimage


def blob_masks(h: int, w: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n x H x W bool masks, each one smooth blob covering 10 to ~60% of the shorter side."""
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        size = int(np.exp(rng.uniform(np.log(10), np.log(0.6 * min(h, w)))))
        bh, bw = size, max(4, int(size * rng.uniform(0.5, 2.0)))
        bw = min(bw, w)
        # Coarse noise, smoothly upsampled, minus a radial falloff: one lumpy blob.
        field = ndimage.zoom(rng.normal(size=(6, 6)), (bh / 6, bw / 6), order=3)[:bh, :bw]
        yy, xx = np.mgrid[0:field.shape[0], 0:field.shape[1]]
        r = np.hypot((yy / field.shape[0] - 0.5) * 2, (xx / field.shape[1] - 0.5) * 2)
        blob = field * 0.5 + 1.0 - 1.6 * r > 0
        y0, x0 = rng.integers(0, h - blob.shape[0] + 1), rng.integers(0, w - blob.shape[1] + 1)
        masks[i, y0:y0 + blob.shape[0], x0:x0 + blob.shape[1]] = blob
        if not masks[i].any():
            masks[i, y0, x0] = True
    return masks


def encode_masks(masks: np.ndarray) -> list[dict]:
    """N x H x W bool -> compressed COCO RLE dicts with str counts (as the generator emits)."""
    rles = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def image_record(index: int, n_masks: int, h: int, w: int, rng: np.random.Generator) -> dict:
    """A generator-style image record (no ids, stage or round: the writer fills them)."""
    image_id = hashlib.sha256(f"synthetic image {index}".encode()).hexdigest()
    rles = encode_masks(blob_masks(h, w, n_masks, rng))
    encoded = [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]
    areas = coco_mask.area(encoded)
    boxes = coco_mask.toBbox(encoded)
    annotations = []
    for rle, area, box in zip(rles, areas, boxes):
        annotations.append({
            "segmentation": rle, "area": int(area), "bbox": [int(v) for v in box],
            "predicted_iou": float(rng.uniform(0.88, 1.0)),
            "point_coords": [[float(rng.uniform(0, w)), float(rng.uniform(0, h))]],
            "stability_score": float(rng.uniform(0.95, 1.0)), "crop_box": [0, 0, w, h],
        })
    return {"image_id": image_id, "uri": f"images/img_{index:05d}.jpg", "width": w, "height": h,
            "phash": f"{int(rng.integers(0, 2**63)):016x}", "annotations": annotations}


def image_records(n_images: int, n_masks: int, h: int = 120, w: int = 160, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [image_record(i, n_masks, h, w, rng) for i in range(n_images)]
