"""Compare two sets of mask records (e.g. ours against the official generator's):
one-to-one matching by mask IoU, for tests and benchmarks."""
from __future__ import annotations

from pycocotools import mask as coco_mask

from .rle import to_coco_rle


def match_records(ours: list[dict], theirs: list[dict]) -> dict:
    """Records with COCO RLE segmentations of the same image. Each of theirs is matched
    to the unused one of ours with the highest mask IoU (greedy, best pairs first).
    Returns counts, the matched IoUs, the matched pairs (index in ours, index in theirs, in
    the order of the IoUs) and how many of them have equal RLE."""
    a = [to_coco_rle(r["segmentation"]) for r in ours]
    b = [to_coco_rle(r["segmentation"]) for r in theirs]
    if not a or not b:
        return dict(ours=len(a), theirs=len(b), matched=0, min_iou=float("nan"), equal_rle=0, ious=[], pairs=[])
    iou = coco_mask.iou(a, b, [0] * len(b))  # len(a) x len(b)
    pairs = sorted(((iou[i, j], i, j) for i in range(len(a)) for j in range(len(b)) if iou[i, j] > 0),
                   reverse=True)
    used_a, used_b, matched = set(), set(), []
    for v, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(i), used_b.add(j), matched.append((v, i, j))
    ious = [float(v) for v, _, _ in matched]
    equal = sum(a[i]["counts"] == b[j]["counts"] for _, i, j in matched)
    return dict(ours=len(a), theirs=len(b), matched=len(matched),
                min_iou=min(ious) if ious else float("nan"), equal_rle=equal, ious=ious,
                pairs=[(i, j) for _, i, j in matched])

