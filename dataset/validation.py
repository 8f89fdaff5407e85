"""Checks of a dataset version: every fault found, by kind, with the rows it is in.

Masks are checked a batch of images at a time over the table's columns: the counts strings
are parsed, re-encoded and measured in one compiled pass (dataset.rle_check), the other
fields with numpy, and only masks not proven clean that way are checked one by one (which
also words their faults), so a clean table costs microseconds per mask, not a Python dict
and a dozen calls each. decode=True checks every mask one by one.

Kinds (each has a test that plants it):
  missing_file       a data file the version names is absent from the store (its rows
                     cannot be checked; jobs/maintain.py ROOT repair drops it)
  schema             a column is missing, extra, or of a type that does not cast to ours
  image_id           not a sha256 hex string
  duplicate_image    the same image_id in two rows
  duplicate_key      two images share an integer image_key
  duplicate_id       two masks share an annotation id
  rle                the counts string is not a valid COCO RLE of the image's size
                     (malformed, runs that do not sum to height x width, or not the
                     canonical string pycocotools writes for those runs)
  annotation_id      a mask's id is not image_key << 15 | its index in the image
                     (schemas.ids); an id already reported as duplicate_id, or of an image
                     whose key is a duplicate_key, is not reported again
  stage              a mask's stage is not one of schemas.Stage, or its round is negative
  score              predicted_iou or stability_score is infinite or NaN, or the stability
                     score lies outside [0, 1] (an IoU of two masks). Null is fine (manual
                     masks), so are a predicted IoU slightly outside [0, 1] (the model's IoU
                     head is not bounded) and a NaN stability score of an empty mask (the
                     official score is 0 / 0 there; empty masks are kept with filters off)
  rle_size           segmentation size is not [height, width]
  area               area differs from the mask's pixel count
  bbox               bbox differs from pycocotools.mask.toBbox of the mask
  decode             (decode=True) pycocotools' decoded mask disagrees with the runs
  duplicate_of       a duplicates record names as its kept image (duplicate_of) no image of
                     the version: the input was skipped for an image the dataset does not
                     hold (older rebuilds could leave these). The records are those the
                     duplicates table held when the version was committed; not checked
                     when data files are missing (their images are unknown)
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from deltalake import DeltaTable
from pycocotools import mask as coco_mask

from schemas import IMAGES, Stage, annotation_id, conform
from schemas.ids import INDEX_BITS, KEY_BITS, MAX_MASKS_PER_IMAGE
from schemas.records import SHA256_HEX

from .reader import history, open_dataset, resolve_version
from .storage import arrow_dataset, is_delta_table, storage_options, table_uri


# Examples kept per kind of fault: a badly damaged table has a fault per mask (millions);
# the report counts them all and keeps this many to show.
EXAMPLES_KEPT = 1000


@dataclass
class Report:
    """faults: per kind, where the first EXAMPLES_KEPT of them are; counts: how many in all."""

    version: int
    images: int = 0
    masks: int = 0
    faults: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    counts: Counter = field(default_factory=Counter)

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] += 1
        if len(self.faults[kind]) < EXAMPLES_KEPT:
            self.faults[kind].append(where)

    @property
    def ok(self) -> bool:
        return not self.counts

    def text(self, examples: int = 5) -> str:
        lines = [f"version {self.version}: {self.images} images, {self.masks} masks: "
                 + ("OK" if self.ok else f"{sum(self.counts.values())} faults")]
        for kind, where in sorted(self.faults.items()):
            lines.append(f"  {kind}: {self.counts[kind]}")
            lines += [f"    {w}" for w in where[:examples]]
        return "\n".join(lines)


def validate(root: str, *, decode: bool = False, batch_rows: int = 256, **pin: Any) -> Report:
    """Check a version (pinned as in dataset.reader) and report every fault found."""
    options = pin.pop("options", None)
    version = resolve_version(root, options=options, **pin)
    report = Report(version=version)
    ds = _present_files(open_dataset(root, version=version, options=options), report)
    if not _check_schema(ds.schema, report):
        return report  # rows of an unknown shape cannot be checked further
    image_ids: Counter = Counter()
    image_keys: Counter = Counter()
    ann_ids: list[np.ndarray] = []
    off_scheme: list[tuple[int, int, str]] = []  # (image_key, id, where) of ids not key << 15 | index
    for batch in ds.to_batches(batch_size=batch_rows):
        try:
            table = conform(pa.Table.from_batches([batch], schema=ds.schema))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:  # a type that casts, values that do not
            report.add("schema", f"values do not cast to the schema: {e}")
            return report
        fast = None if decode else _fast_checks(table)
        if fast is None:  # every mask as a dict (decode=True, or nulls where the schema has none)
            for image in table.to_pylist():
                report.images += 1
                image_ids[image["image_id"]] += 1
                image_keys[image["image_key"]] += 1
                ann_ids.append(np.array([a["id"] for a in image["annotations"]], np.int64))
                _check_image_id(image, report)
                for index, ann in enumerate(image["annotations"]):
                    _check_mask(image, index, ann, report, decode, off_scheme)
            continue
        masks, offsets, ids, clean = fast
        for i, image in enumerate(table.select(["image_id", "image_key", "height", "width"]).to_pylist()):
            report.images += 1
            image_ids[image["image_id"]] += 1
            image_keys[image["image_key"]] += 1
            first, end = int(offsets[i]), int(offsets[i + 1])
            ann_ids.append(ids[first:end])
            _check_image_id(image, report)
            for index in np.flatnonzero(~clean[first:end]).tolist():  # the masks not proven clean
                _check_mask(image, index, masks[first + index].as_py(), report, decode, off_scheme)
            report.masks += int(clean[first:end].sum())
    for kind, counter in (("duplicate_image", image_ids), ("duplicate_key", image_keys)):
        for value, n in counter.items():
            if n > 1:
                report.add(kind, f"{value} in {n} rows")
    ids, counts = np.unique(np.concatenate(ann_ids or [np.zeros(0, np.int64)]), return_counts=True)
    for value, n in zip(ids[counts > 1], counts[counts > 1]):
        report.add("duplicate_id", f"annotation id {value} used {n} times")
    duplicate_ids = set(ids[counts > 1].tolist())
    for key, ann_id, where in off_scheme:
        if ann_id not in duplicate_ids and image_keys[key] == 1:
            report.add("annotation_id", where)
    if "missing_file" not in report.faults:
        _check_duplicates(root, options if options is not None else storage_options(root), image_ids, report)
    return report


def _check_duplicates(root: str, options: dict[str, str], image_ids: Counter, report: Report) -> None:
    """Each duplicates record of the version must name one of its images as the one kept.
    The duplicates table is read as it was when the version was committed (the last of its
    versions no later than that commit), so a record a later run added is not held against
    an earlier version."""
    uri = table_uri(root, "duplicates")
    if not is_delta_table(uri, options):
        return  # an imported dataset, or one older than the table
    commits = history(root, options=options)
    table = DeltaTable(uri, storage_options=options)
    if commits and report.version != commits[-1]["version"]:  # no history: nothing to pin by
        stamp = next((c["timestamp"] for c in commits if c["version"] == report.version), None)
        older = [c["version"] for c in table.history() if stamp is not None and c["timestamp"] <= stamp]
        if not older:
            return
        table.load_as_version(max(older))
    try:
        rows = arrow_dataset(table, uri, options).to_table(columns=["uri", "duplicate_of"])
    except FileNotFoundError as e:
        report.add("missing_file", f"duplicates table: {e}")
        return
    for row_uri, kept in zip(rows["uri"].to_pylist(), rows["duplicate_of"].to_pylist()):
        if kept not in image_ids:
            report.add("duplicate_of", f"{row_uri}: skipped as a duplicate of {kept[:16]}..., which is no image "
                                       f"of version {report.version}")


def _present_files(ds: pads.FileSystemDataset, report: Report) -> pads.FileSystemDataset:
    """The dataset without the files its store lacks (one listing), each reported."""
    selector = pafs.FileSelector("", recursive=True, allow_not_found=True)
    stored = {info.path for info in ds.filesystem.get_file_info(selector)}
    fragments = list(ds.get_fragments())
    missing = [f.path for f in fragments if f.path not in stored]
    for path in missing:
        report.add("missing_file", f"{path}: named by version {report.version}, absent from the store")
    if not missing:
        return ds
    return pads.FileSystemDataset([f for f in fragments if f.path in stored], ds.schema, ds.format, ds.filesystem)


def _check_schema(schema: pa.Schema, report: Report) -> bool:
    missing = [n for n in IMAGES.names if n not in schema.names]
    extra = [n for n in schema.names if n not in IMAGES.names]
    for n in missing:
        report.add("schema", f"missing column {n}")
    for n in extra:
        report.add("schema", f"unexpected column {n}")
    for f in IMAGES:
        if f.name in schema.names:
            try:
                pa.array([], schema.field(f.name).type).cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                report.add("schema", f"column {f.name}: {schema.field(f.name).type} does not cast to {f.type}: {e}")
    return "schema" not in report.faults


_STAGES = set(get_args(Stage))


def _fast_checks(table: pa.Table) -> tuple[pa.StructArray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The per-mask checks over a batch's columns at once (dataset.rle_check parses, re-encodes
    and measures every counts string in one compiled pass): (masks, offsets per image, ids,
    clean), where clean marks the masks proven free of every per-mask fault. The others are
    checked one by one (_check_mask), which also words their faults. None where a column the
    checks read holds nulls (the schema has none there): the batch is checked mask by mask."""
    from .rle_check import check_counts

    lists = table.column("annotations").combine_chunks()
    keys, heights, widths = (table.column(c) for c in ("image_key", "height", "width"))
    if lists.null_count or any(c.null_count for c in (keys, heights, widths)):
        return None
    bounds = np.asarray(lists.offsets, np.int64)
    masks = lists.values.slice(bounds[0], bounds[-1] - bounds[0])
    offsets = bounds - bounds[0]
    field = dict(zip((f.name for f in masks.type), masks.flatten()))
    seg = dict(zip((f.name for f in field["segmentation"].type), field["segmentation"].flatten()))
    needed = [masks, field["id"], field["stage"], field["round"], field["area"], field["bbox"], seg["size"],
              seg["counts"], field["bbox"].flatten(), seg["size"].flatten()]
    if any(a.null_count for a in needed):
        return None
    n = len(masks)
    if n == 0:
        return masks, offsets, np.zeros(0, np.int64), np.zeros(0, bool)
    per_image = np.diff(offsets)
    image_of = np.repeat(np.arange(len(per_image)), per_image)
    index = np.arange(n) - np.repeat(offsets[:-1], per_image)
    key = keys.to_numpy()[image_of]
    h, w = heights.to_numpy().astype(np.int64)[image_of], widths.to_numpy().astype(np.int64)[image_of]
    ids = field["id"].to_numpy()
    clean = (index < MAX_MASKS_PER_IMAGE) & (key >= 0) & (key < 1 << KEY_BITS) & (ids == ((key << INDEX_BITS) | index))
    clean &= pc.is_in(field["stage"], value_set=pa.array(sorted(_STAGES))).to_numpy(zero_copy_only=False)
    clean &= field["round"].to_numpy() >= 0
    iou = pc.fill_null(field["predicted_iou"], 0.0).to_numpy()
    stability = pc.fill_null(field["stability_score"], 0.5).to_numpy()
    area = field["area"].to_numpy()
    clean &= np.isfinite(iou)
    clean &= ((stability >= 0) & (stability <= 1)) | (np.isnan(stability) & (area == 0))
    size = _fixed_lists(seg["size"], 2)
    clean &= (size[:, 0] == h) & (size[:, 1] == w)
    counts = seg["counts"]
    buffers = counts.buffers()
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    starts = np.frombuffer(buffers[1], np.int32)[counts.offset: counts.offset + n + 1].astype(np.int64)
    computed_area, computed_bbox = np.zeros(n, np.int64), np.zeros((n, 4), np.int64)
    clean &= check_counts(data, starts, h, w, computed_area, computed_bbox, MAX_GROUPS, MAX_RUN)
    clean &= (area == computed_area) & (_fixed_lists(field["bbox"], 4) == computed_bbox).all(1)
    return masks, offsets, ids, clean


def _fixed_lists(lists: pa.ListArray, length: int) -> np.ndarray:
    """N x length int64 values of a list array; rows of another length are -1 (never equal to
    a size, or to a bbox of a mask that parses)."""
    lengths = pc.list_value_length(lists).to_numpy()
    values = lists.flatten().to_numpy().astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    out = np.full((len(lengths), length), -1, np.int64)
    whole = lengths == length
    out[whole] = values[starts[whole, None] + np.arange(length)]
    return out


def _check_image_id(image: dict, report: Report) -> None:
    if not SHA256_HEX.match(image["image_id"]):
        report.add("image_id", f"{image['image_id']!r}")


def _check_mask(image: dict, index: int, ann: dict, report: Report, decode: bool,
                off_scheme: list[tuple[int, int, str]]) -> None:
    """Every per-mask check of the index-th mask of an image (ann: the mask as a dict)."""
    image_id, h, w = image["image_id"], image["height"], image["width"]
    report.masks += 1
    where = f"image {image_id[:16]} mask {ann['id']}"
    if index >= MAX_MASKS_PER_IMAGE or ann["id"] != annotation_id(image["image_key"], index):
        off_scheme.append((image["image_key"], ann["id"], f"{where}: not image_key {image['image_key']} << 15 | "
                                                          f"index {index}"))
    if ann["stage"] not in _STAGES or ann["round"] < 0:
        report.add("stage", f"{where}: stage {ann['stage']!r}, round {ann['round']}")
    bad = _bad_scores(ann)
    if bad:
        report.add("score", f"{where}: {bad}")
    seg = ann["segmentation"]
    if list(seg["size"]) != [h, w]:
        report.add("rle_size", f"{where}: size {seg['size']} != [{h}, {w}]")
        return
    counts = rle_counts(seg["counts"])
    if counts is None or counts.sum() != h * w or np.any(counts[1:] <= 0) or counts[0] < 0:
        report.add("rle", f"{where}: malformed counts or runs not summing to {h}x{w}")
        return
    rle = {"size": [h, w], "counts": seg["counts"].encode("ascii")}
    canonical = coco_mask.frPyObjects({"size": [h, w], "counts": counts.astype(np.uint32)}, h, w)
    if canonical["counts"] != rle["counts"]:
        report.add("rle", f"{where}: not the canonical pycocotools string for its runs")
        return
    area = int(counts[1::2].sum())
    if ann["area"] != area:
        report.add("area", f"{where}: area {ann['area']} != {area}")
    bbox = [int(v) for v in coco_mask.toBbox(rle)]
    if list(ann["bbox"]) != bbox:
        report.add("bbox", f"{where}: bbox {ann['bbox']} != {bbox}")
    if decode and int(coco_mask.decode(rle).sum()) != area:
        report.add("decode", f"{where}: decoded mask has {int(coco_mask.decode(rle).sum())} pixels")


def _bad_scores(ann: dict) -> str | None:
    """What is wrong with a mask's predicted_iou / stability_score (see "score" above)."""
    faults = []
    iou, stability = ann["predicted_iou"], ann["stability_score"]
    if iou is not None and not math.isfinite(iou):
        faults.append(f"predicted_iou {iou}")
    if stability is not None and not (0.0 <= stability <= 1.0 or (math.isnan(stability) and ann["area"] == 0)):
        faults.append(f"stability_score {stability}")
    return ", ".join(faults) or None


# Bounds of a well-formed counts string: 12 groups of 5 bits per count, runs below 2^40 pixels
# (exact in int64 however many are summed).
MAX_GROUPS = 12
MAX_RUN = 2**40
VECTORIZED_FROM = 200  # characters


def rle_counts(s: str) -> np.ndarray | None:
    """Run lengths of a compressed COCO counts string, or None if it is malformed.

    Written out here because pycocotools parses these strings without bounds checks: a
    corrupt string could make it write past its buffer, so runs are checked before any
    pycocotools call sees the string. Format: each count is a little-endian sequence of
    5-bit groups in chars offset by 48, 0x20 = more groups follow, 0x10 in the last group =
    negative; from the third count on, each is stored as the difference to the count two
    places before it. Validation reads every mask of a table: short strings are parsed in a
    loop, longer ones with numpy (~65 us of fixed cost, 10x faster at 3000 chars); both
    apply the same bounds (MAX_GROUPS, MAX_RUN).
    """
    if len(s) < VECTORIZED_FROM:
        return _rle_counts_loop(s)
    try:
        c = np.frombuffer(s.encode("ascii"), np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError:
        return None
    if len(c) == 0:
        return np.zeros(0, np.int64)
    if c.min() < 0 or c.max() >= 64:
        return None
    last = np.flatnonzero((c & 0x20) == 0)  # the last group of each count
    if len(last) == 0 or last[-1] != len(c) - 1:
        return None  # the last count was cut off mid-way
    first = np.concatenate([[0], last[:-1] + 1])
    groups = last - first + 1
    if groups.max() > MAX_GROUPS:
        return None
    shift = 5 * (np.arange(len(c)) - np.repeat(first, groups))
    values = np.add.reduceat((c & 0x1F) << shift, first)  # the groups' bits do not overlap: a sum is an OR
    values -= ((c[last] & 0x10) != 0).astype(np.int64) << (5 * groups)  # negative: the sign bit extended
    if np.abs(values).max() > MAX_RUN:
        return None
    counts = values.copy()  # from the third on, differences to the count two places before:
    counts[1::2] = np.cumsum(values[1::2])  # odd positions accumulate from the second count,
    counts[2::2] = np.cumsum(values[2::2])  # even ones from the third
    return counts


def _rle_counts_loop(s: str) -> np.ndarray | None:
    """rle_counts, a character at a time (faster below VECTORIZED_FROM characters)."""
    counts: list[int] = []
    value, groups = 0, 0
    for ch in s:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            return None
        value |= (c & 0x1F) << (5 * groups)
        groups += 1
        if c & 0x20:
            if groups == MAX_GROUPS:
                return None
            continue
        if c & 0x10:
            value -= 1 << (5 * groups)
        if abs(value) > MAX_RUN:
            return None
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
        value, groups = 0, 0
    if groups:
        return None  # the last count was cut off mid-way
    return np.array(counts, np.int64)
