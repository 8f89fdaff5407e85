"""The numbers behind the report, computed from one dataset version with pyarrow.

Two passes over the version's Parquet files, one row group at a time:

1. every image, reading only the small mask columns (area, bbox, scores, stage, round;
   never the RLE strings): exact histograms with fixed bins, accumulated as it streams, and
   a uniform random sample of images, the `sample_images` with the smallest sha256 of their
   image_id (so the same version always gives the same sample);
2. only the row groups that hold the sampled images, with their RLE: mask concavity on
   decoded masks, and the masks of the gallery.

Memory is bounded by one row group plus the sample, whatever the size of the version.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

# Fixed bins so that histograms add up across row groups (and tests can recompute them).
UNIT_BINS = np.linspace(0.0, 1.0, 41)          # relative size, scores, concavity
CENTRE_BINS = 24                               # per axis, over the unit square
MASK_FIELDS = ("area", "bbox", "predicted_iou", "stability_score", "stage", "round")


def unit_histogram(values: np.ndarray) -> np.ndarray:
    """Counts of values in UNIT_BINS; values outside [0, 1] land in the end bins."""
    return np.histogram(np.clip(values, 0.0, 1.0), bins=UNIT_BINS)[0]


@dataclass
class Sampled:
    key: int            # first 8 bytes of sha256(image_id): the random order
    image_id: str
    file: str
    row_group: int
    row: int            # within the row group


@dataclass
class VersionStats:
    images: int = 0
    masks: int = 0
    empty_masks: int = 0                                            # area 0: no centre, no shape
    masks_per_image: Counter = field(default_factory=Counter)       # masks in an image -> images
    relative_size: np.ndarray = field(default_factory=lambda: np.zeros(len(UNIT_BINS) - 1, np.int64))
    relative_size_sum: float = 0.0
    centres: np.ndarray = field(default_factory=lambda: np.zeros((CENTRE_BINS, CENTRE_BINS), np.int64))
    predicted_iou: np.ndarray = field(default_factory=lambda: np.zeros(len(UNIT_BINS) - 1, np.int64))
    stability: np.ndarray = field(default_factory=lambda: np.zeros(len(UNIT_BINS) - 1, np.int64))
    scores_missing: Counter = field(default_factory=Counter)         # field -> masks without it
    masks_by_round_stage: Counter = field(default_factory=Counter)   # (round, stage) -> masks
    images_by_round: Counter = field(default_factory=Counter)        # round -> images with a mask of it
    # By the run that wrote each row (the run_id column; None where a row has none):
    images_by_run: Counter = field(default_factory=Counter)          # run -> images
    masks_by_run: Counter = field(default_factory=Counter)           # run -> masks
    maskless_by_run: Counter = field(default_factory=Counter)        # run -> images without a mask
    sample: list[Sampled] = field(default_factory=list)
    concavity: np.ndarray = field(default_factory=lambda: np.zeros(len(UNIT_BINS) - 1, np.int64))
    concavity_mask_ids: list[int] = field(default_factory=list)
    concavity_images: int = 0
    gallery: list[dict] = field(default_factory=list)              # sampled rows with their masks


def version_files(dataset: pads.FileSystemDataset) -> Iterator[tuple[str, pq.ParquetFile]]:
    for path in dataset.files:
        yield path, pq.ParquetFile(dataset.filesystem.open_input_file(path))


def _leaf_columns(pf: pq.ParquetFile, names: tuple[str, ...]) -> list[str]:
    """Parquet paths of the named mask fields (annotations.list.element.<name>, whatever the
    writer called the list levels): reading them alone leaves the RLE strings on disk."""
    paths = {}
    for i in range(pf.metadata.num_columns):
        parts = pf.schema.column(i).path.split(".")
        if parts[0] == "annotations" and len(parts) >= 4 and parts[3] in names:
            paths.setdefault(parts[3], ".".join(parts[:4]))
    return [paths[n] for n in names if n in paths]


def _key(image_id: str) -> int:
    return int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")


def scan(dataset: pads.FileSystemDataset, stats: VersionStats, sample_images: int) -> None:
    """Pass 1: every image, the small columns only."""
    for path, pf in version_files(dataset):
        columns = ["image_id", "width", "height", *_leaf_columns(pf, MASK_FIELDS)]
        if "run_id" in pf.schema_arrow.names:  # older files have no run_id column
            columns.append("run_id")
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=columns)
            _add_images(stats, table)
            keys = [_key(i) for i in table["image_id"].to_pylist()]
            candidates = [Sampled(k, i, path, rg, row) for row, (k, i) in
                          enumerate(zip(keys, table["image_id"].to_pylist()))]
            stats.sample = sorted(stats.sample + candidates, key=lambda s: s.key)[:sample_images]


def _add_images(stats: VersionStats, table: pa.Table) -> None:
    ann = table["annotations"].combine_chunks()
    lengths = pc.list_value_length(ann).to_numpy(zero_copy_only=False)
    stats.images += len(lengths)
    values, counts = np.unique(lengths, return_counts=True)
    stats.masks_per_image.update(dict(zip(values.tolist(), counts.tolist())))
    _add_runs(stats, table, lengths)
    masks = pc.list_flatten(ann)
    if len(masks) == 0:
        return
    stats.masks += len(masks)
    parent = pc.list_parent_indices(ann).to_numpy()
    width = table["width"].to_numpy().astype(np.float64)[parent]
    height = table["height"].to_numpy().astype(np.float64)[parent]

    area = masks.field("area").to_numpy(zero_copy_only=False).astype(np.float64)
    rel = np.sqrt(area / (width * height))
    stats.relative_size += unit_histogram(rel)
    stats.relative_size_sum += float(rel.sum())

    # Centre of each non-empty mask's box (x, y, w, h), relative to its image.
    full = area > 0
    stats.empty_masks += int((~full).sum())
    box = pc.list_flatten(masks.field("bbox")).to_numpy(zero_copy_only=False).reshape(-1, 4).astype(np.float64)[full]
    cx = np.clip((box[:, 0] + box[:, 2] / 2) / width[full], 0, 1 - 1e-9)
    cy = np.clip((box[:, 1] + box[:, 3] / 2) / height[full], 0, 1 - 1e-9)
    stats.centres += np.histogram2d(cy, cx, bins=CENTRE_BINS, range=[[0, 1], [0, 1]])[0].astype(np.int64)

    for name, hist in (("predicted_iou", stats.predicted_iou), ("stability_score", stats.stability)):
        values = masks.field(name).to_numpy(zero_copy_only=False).astype(np.float64)
        known = ~np.isnan(values)
        hist += unit_histogram(values[known])
        stats.scores_missing[name] += int((~known).sum())

    groups = pa.table({"round": masks.field("round"), "stage": masks.field("stage")}) \
        .group_by(["round", "stage"]).aggregate([([], "count_all")])
    stats.masks_by_round_stage.update({(r, st): n for r, st, n in zip(
        groups["round"].to_pylist(), groups["stage"].to_pylist(), groups["count_all"].to_pylist())})
    rounds = masks.field("round").to_numpy(zero_copy_only=False).astype(np.int64)
    pairs = np.unique(np.stack([rounds, parent]), axis=1)  # (round, image) with a mask of that round
    values, counts = np.unique(pairs[0], return_counts=True)
    stats.images_by_round.update(dict(zip(values.tolist(), counts.tolist())))


def _add_runs(stats: VersionStats, table: pa.Table, lengths: np.ndarray) -> None:
    runs = table["run_id"] if "run_id" in table.column_names else pa.nulls(len(lengths), pa.string())
    groups = pa.table({"run_id": runs, "masks": lengths, "maskless": lengths == 0}).group_by("run_id").aggregate(
        [([], "count_all"), ("masks", "sum"), ("maskless", "sum")])
    for run, images, masks, maskless in zip(*(groups[c].to_pylist() for c in (
            "run_id", "count_all", "masks_sum", "maskless_sum"))):
        stats.images_by_run[run] += images
        stats.masks_by_run[run] += masks
        stats.maskless_by_run[run] += maskless


def read_sample(dataset: pads.FileSystemDataset, stats: VersionStats) -> Iterator[dict]:
    """Pass 2: the sampled image rows (all columns), in sample order."""
    by_group: dict[tuple[str, int], list[Sampled]] = {}
    for s in stats.sample:
        by_group.setdefault((s.file, s.row_group), []).append(s)
    rows: dict[str, dict] = {}
    files = {}
    for (path, rg), sampled in by_group.items():
        pf = files.get(path) or pq.ParquetFile(dataset.filesystem.open_input_file(path))
        files[path] = pf
        table = pf.read_row_group(rg, columns=["image_id", "uri", "width", "height", "annotations"])
        for s in sampled:
            rows[s.image_id] = table.slice(s.row, 1).to_pylist()[0]
    for s in stats.sample:
        yield rows[s.image_id]


def solidity(mask: np.ndarray) -> float:
    """Mask area / area of its convex hull, the hull taken around whole pixel squares (so
    the ratio is at most 1). The hull of the squares is the hull of the outer corners of
    the first and last pixel of each row: 4 points a row instead of 4 a pixel."""
    from scipy.spatial import ConvexHull

    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return float("nan")
    sub = mask[rows]
    first = sub.argmax(axis=1)
    last = sub.shape[1] - 1 - sub[:, ::-1].argmax(axis=1)
    y = rows.astype(np.float64)
    points = np.concatenate([np.stack([x, yy], 1) for x in (first, last + 1) for yy in (y, y + 1)])
    return float(mask.sum()) / ConvexHull(points).volume  # 2-D "volume" is the area


def measure_concavity(stats: VersionStats, rows: list[dict], max_masks: int) -> None:
    """Concavity (1 - solidity) of the masks of the sampled images, in sample order, up to
    max_masks masks."""
    from amg.rle import coco_to_mask

    values = []
    for row in rows:
        if len(values) >= max_masks:
            break
        stats.concavity_images += 1
        for m in row["annotations"][: max_masks - len(values)]:
            s = solidity(coco_to_mask(m["segmentation"]))
            if not np.isnan(s):
                values.append(1.0 - s)
                stats.concavity_mask_ids.append(int(m["id"]))
    stats.concavity = unit_histogram(np.asarray(values, np.float64))
