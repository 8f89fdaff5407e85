"""The validator finds each kind of fault it claims to, and the job exits non-zero on them."""
import copy
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from pycocotools import mask as coco_mask

from dataset import DatasetWriter, read_images
from dataset.lineage import new_lineage
from dataset.synthetic import image_records
from dataset.validation import validate
from schemas import DUPLICATES, IMAGES, annotation_id, to_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Rows of a valid dataset (writer-completed) to corrupt, one fault at a time."""
    root = str(tmp_path_factory.mktemp("good"))
    DatasetWriter(root, new_lineage(round=0, stage="auto")).commit_images(image_records(3, 4))
    assert validate(root, decode=True).ok
    return read_images(root).to_pylist()


def _mask(rows):
    return rows[1]["annotations"][2]


def _flip_char(s):
    return s[:3] + ("1" if s[3] != "1" else "2") + s[4:]


CORRUPTIONS = {
    "image_id": lambda rows: rows[0].update(image_id="not-a-sha"),
    "duplicate_image": lambda rows: rows.append({**copy.deepcopy(rows[0]), "image_key": 1,
                                                 "annotations": []}),
    "duplicate_key": lambda rows: rows[1].update(image_key=rows[0]["image_key"]),
    "duplicate_id": lambda rows: _mask(rows).update(id=rows[0]["annotations"][0]["id"]),
    "stage": lambda rows: _mask(rows).update(stage="guessed"),
    "stage (negative round)": lambda rows: _mask(rows).update(round=-1),
    "rle_size": lambda rows: _mask(rows)["segmentation"].update(size=[7, 9]),
    "area": lambda rows: _mask(rows).update(area=_mask(rows)["area"] + 1),
    "bbox": lambda rows: _mask(rows).update(bbox=[0, 0, 1, 1]),
    "score": lambda rows: _mask(rows).update(predicted_iou=float("nan")),
    "score (infinite predicted IoU)": lambda rows: _mask(rows).update(predicted_iou=float("-inf")),
    "score (stability above 1)": lambda rows: _mask(rows).update(stability_score=1.5),
    "score (NaN stability of a non-empty mask)": lambda rows: _mask(rows).update(stability_score=float("nan")),
    # unique ids, but each names the other's index
    "annotation_id": lambda rows: _swap_ids(rows[1]["annotations"][2], rows[1]["annotations"][3]),
    "annotation_id (another image's key)": lambda rows: _mask(rows).update(
        id=annotation_id(rows[0]["image_key"], 100)),
}


def _swap_ids(a, b):
    a["id"], b["id"] = b["id"], a["id"]
RLE_CORRUPTIONS = {
    "truncated": lambda c: c[:-3],
    "bad character": lambda c: c[:2] + "~" + c[3:],
    "changed run": _flip_char,
    "not canonical": lambda c: c[:-1] + chr(ord(c[-1]) + 32) + "0" if ord(c[-1]) < 64 + 16 else None,
}


def _write(tmp_path, rows, schema=IMAGES):
    root = str(tmp_path)
    table = to_table(rows) if schema is IMAGES else pa.Table.from_pylist(rows, schema=schema)
    write_deltalake(f"{root}/annotations", table, mode="append")
    return root


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_each_corruption_is_reported_under_its_kind(tmp_path, good, kind):
    rows = copy.deepcopy(good)
    CORRUPTIONS[kind](rows)
    report = validate(_write(tmp_path, rows))
    assert set(report.faults) == {kind.split(" (")[0]}, report.text()


@pytest.mark.parametrize("how", sorted(RLE_CORRUPTIONS))
def test_bad_rle_strings_are_reported_before_pycocotools_sees_them(tmp_path, good, how):
    rows = copy.deepcopy(good)
    seg = _mask(rows)["segmentation"]
    bad = RLE_CORRUPTIONS[how](seg["counts"])
    if bad is None:
        pytest.skip("last char cannot carry a redundant continuation")
    seg["counts"] = bad
    report = validate(_write(tmp_path, rows), decode=True)
    assert "rle" in report.faults, report.text()
    assert set(report.faults) <= {"rle", "area", "bbox"}  # a changed run may leave a valid but other mask


def test_what_the_automatic_stage_legitimately_writes_is_no_fault(tmp_path):
    """With its filters off the automatic stage keeps empty masks, whose official stability
    score is 0 / 0 (NaN); the IoU head is unbounded, so a predicted IoU may lie a little
    outside [0, 1]; manual masks have no scores."""
    root = str(tmp_path)
    image = image_records(1, 3)[0]
    h, w = image["height"], image["width"]
    empty = coco_mask.encode(np.asfortranarray(np.zeros((h, w), np.uint8)))
    a, b, c = image["annotations"]
    a.update(segmentation={"size": [h, w], "counts": empty["counts"].decode("ascii")}, area=0, bbox=[0, 0, 0, 0],
             stability_score=float("nan"), predicted_iou=-0.0021)
    b.update(predicted_iou=1.013)
    c.update(predicted_iou=None, stability_score=None)
    DatasetWriter(root, new_lineage(round=0, stage="auto")).commit_images([image])
    report = validate(root, decode=True)
    assert report.ok and report.masks == 3, report.text()


def test_schema_faults(tmp_path, good):
    schema = pa.schema([f for f in IMAGES if f.name != "phash"] + [pa.field("extra", pa.int8())])
    rows = [{**{k: v for k, v in r.items() if k != "phash"}, "extra": 1} for r in good]
    report = validate(_write(tmp_path, rows, schema))
    assert set(report.faults) == {"schema"}
    assert any("missing column phash" in f for f in report.faults["schema"])
    assert any("unexpected column extra" in f for f in report.faults["schema"])


def test_job_exit_codes_and_report(tmp_path, good):
    ok_root = _write(tmp_path / "ok", copy.deepcopy(good))
    rows = copy.deepcopy(good)
    CORRUPTIONS["area"](rows)
    bad_root = _write(tmp_path / "bad", rows)
    job = [sys.executable, str(ROOT / "jobs" / "validate.py")]
    ok = subprocess.run(job + [ok_root, "--version", "0"], capture_output=True, text=True, timeout=60)
    bad = subprocess.run(job + [bad_root, "--decode"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr
    assert bad.returncode == 1 and "area: 1" in bad.stdout, bad.stdout + bad.stderr
    # No such dataset, version or run: a one-line error and status 2, not a delta-rs traceback.
    for args, message in (([str(tmp_path / "none")], f"no dataset at {tmp_path / 'none'}: it has no annotations table"),
                          ([ok_root, "--version", "5"], "the annotations table has no version 5"),
                          ([ok_root, "--run-id", "nope"], "no commit of run_id='nope'")):
        r = subprocess.run(job + args, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_rle_runs_not_summing_to_the_image_size(tmp_path, good):
    """A well-formed, canonical counts string of another image size (one column short): the
    runs sum to h x (w - 1), so it is reported as rle before area or bbox are looked at."""
    rows = copy.deepcopy(good)
    image, mask = rows[1], _mask(rows)
    h, w = image["height"], image["width"]
    short = coco_mask.encode(np.asfortranarray(np.ones((h, w - 1), np.uint8)))
    mask["segmentation"]["counts"] = short["counts"].decode("ascii")
    report = validate(_write(tmp_path, rows), decode=True)
    assert set(report.faults) == {"rle"}, report.text()
    assert f"not summing to {h}x{w}" in report.faults["rle"][0]


def test_column_of_a_type_that_does_not_cast(tmp_path, good):
    """annotations stored as a plain string column: no cast to list<struct> exists."""
    schema = pa.schema([pa.field("annotations", pa.string()) if f.name == "annotations" else f for f in IMAGES])
    rows = [{**r, "annotations": "[]"} for r in good]
    report = validate(_write(tmp_path, rows, schema))
    assert set(report.faults) == {"schema"}, report.text()
    assert report.faults["schema"][0].startswith("column annotations: string does not cast to list<"), report.text()
    assert report.images == 0  # rows of an unknown shape are not checked further


def test_column_whose_values_do_not_cast(tmp_path, good):
    schema = pa.schema([pa.field("width", pa.string()) if f.name == "width" else f for f in IMAGES])
    rows = [{**r, "width": "wide"} for r in good]
    report = validate(_write(tmp_path, rows, schema))
    assert set(report.faults) == {"schema"}, report.text()


def test_decode_disagreement_is_reported(tmp_path, good, monkeypatch):
    """decode: pycocotools' decoded mask is compared with the runs. A mask that passes the
    run checks decodes to the same pixels, so the disagreement is planted in the decoder:
    one pixel fewer for a single mask."""
    from dataset import validation

    root = _write(tmp_path, copy.deepcopy(good))
    assert validate(root, decode=True).ok
    target = _mask(good)["segmentation"]["counts"].encode("ascii")
    real_decode = validation.coco_mask.decode

    def lossy_decode(rle):
        m = real_decode(rle)
        if rle["counts"] == target:
            m = m.copy()
            m[np.nonzero(m)[0][0], np.nonzero(m)[1][0]] = 0
        return m

    monkeypatch.setattr(validation.coco_mask, "decode", lossy_decode)
    assert validate(root).ok  # without decode=True the decoder is not consulted
    report = validate(root, decode=True)
    assert set(report.faults) == {"decode"}, report.text()
    assert len(report.faults["decode"]) == 1 and str(_mask(good)["id"]) in report.faults["decode"][0]


def test_a_missing_data_file_is_reported_and_the_others_still_checked(tmp_path, good):
    rows = copy.deepcopy(good)
    CORRUPTIONS["area"](rows)  # in the second image
    root = _write(tmp_path, rows[:1])
    _write(tmp_path, rows[1:])  # a second file, kept
    lost = sorted((tmp_path / "annotations").glob("*.parquet"), key=lambda p: p.stat().st_mtime_ns)[0]
    lost.unlink()
    report = validate(root)
    assert report.faults["missing_file"] == [f"{lost.name}: named by version 1, absent from the store"]
    assert report.images == len(rows) - 1 and len(report.faults["area"]) == 1


def _write_duplicates(root, kept_ids):
    """One duplicates record per kept image_id (exact copies under new names)."""
    rows = [{"uri": f"copy_{i}.png", "image_id": hashlib.sha256(b"%d" % i).hexdigest(), "duplicate_of": kept,
             "kind": "exact", "distance": 0, "run_id": "r"} for i, kept in enumerate(kept_ids)]
    write_deltalake(f"{root}/duplicates", to_table(rows, DUPLICATES), mode="append")


def test_a_duplicate_of_no_image_is_reported(tmp_path, good):
    """A duplicates record whose kept image (duplicate_of) is in no row: its input was
    skipped for an image the dataset does not hold."""
    root = _write(tmp_path, copy.deepcopy(good))
    gone = "f" * 64
    _write_duplicates(root, [good[0]["image_id"], gone])
    report = validate(root)
    assert set(report.faults) == {"duplicate_of"}, report.text()
    assert report.faults["duplicate_of"] == [f"copy_1.png: skipped as a duplicate of {gone[:16]}..., which is no "
                                             "image of version 0"]
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "validate.py"), root], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "duplicate_of: 1" in r.stdout and "copy_1.png" in r.stdout, r.stdout + r.stderr


def test_duplicates_are_checked_as_of_the_version(tmp_path, good):
    """A pinned version is checked with the duplicates table as it was when the version was
    committed: a record added later (its kept image committed later too) is not held
    against it."""
    def later(write, *args):
        time.sleep(0.01)  # commit timestamps are in milliseconds
        write(*args)

    root = _write(tmp_path, copy.deepcopy(good[:1]))  # version 0
    later(_write_duplicates, root, [good[0]["image_id"], "d" * 64])
    later(_write, tmp_path, copy.deepcopy(good[1:2]))  # version 1
    later(_write_duplicates, root, [good[2]["image_id"]])  # kept image in version 2
    later(_write, tmp_path, copy.deepcopy(good[2:]))  # version 2
    later(_write_duplicates, root, ["e" * 64])
    assert validate(root, version=0).ok
    assert [f.split(":")[0] for f in validate(root, version=1).faults["duplicate_of"]] == ["copy_1.png"]
    assert sorted(validate(root, version=1).faults) == ["duplicate_of"]
    latest = validate(root).faults["duplicate_of"]
    assert sorted(f.split(" of ")[1][:4] for f in latest) == ["dddd", "eeee"]


def test_duplicates_checked_when_the_history_is_empty(tmp_path, good, monkeypatch):
    """Without commit history (delta-rs returns none for some root names) the duplicates
    check reads the latest records instead of failing."""
    import dataset.validation as validation

    root = _write(tmp_path, copy.deepcopy(good))
    _write_duplicates(root, [good[0]["image_id"], "f" * 64])
    monkeypatch.setattr(validation, "history", lambda *a, **k: [])
    assert list(validate(root).faults) == ["duplicate_of"]


def test_a_fault_in_every_mask_is_counted_in_full_but_kept_as_few_examples(tmp_path, good, monkeypatch):
    """A badly damaged table has a fault per mask (millions): the report counts every one and
    keeps EXAMPLES_KEPT of each kind, not a string per fault."""
    import dataset.validation as validation

    monkeypatch.setattr(validation, "EXAMPLES_KEPT", 3)
    rows = copy.deepcopy(good)
    for row in rows:
        for ann in row["annotations"]:
            ann["area"] += 1
    report = validate(_write(tmp_path, rows))
    n = sum(len(r["annotations"]) for r in rows)
    assert n > 3 and set(report.faults) == {"area"} and report.counts["area"] == n, report.text()
    assert len(report.faults["area"]) == 3 and not report.ok
    assert f"{n} faults" in report.text() and f"  area: {n}" in report.text(examples=2)


def test_rle_counts_loop_and_vectorized_parsers_agree_on_good_and_corrupt_strings(monkeypatch):
    """rle_counts parses short strings in a loop and long ones with numpy: both give the
    runs pycocotools encoded, and refuse the same corrupt strings."""
    import random

    import dataset.validation as validation

    rng, pick = np.random.default_rng(1), random.Random(1)
    strings = []
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(2, 200, 2))
        mask = np.zeros((h, w), np.uint8, order="F")
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        mask[y:y + int(rng.integers(1, h)), x:x + int(rng.integers(1, w))] = 1
        if rng.random() < 0.3:
            mask ^= (rng.random((h, w)) < 0.2).astype(np.uint8)
        rle = coco_mask.encode(np.asfortranarray(mask))
        runs = validation.rle_counts(rle["counts"].decode())
        assert runs is not None and runs.sum() == h * w and runs[1::2].sum() == mask.sum()
        strings.append(rle["counts"].decode())
    chars = [chr(c) for c in range(40, 120)] + ["é"]
    for s in list(strings):
        for _ in range(8):
            t = list(s)
            t[pick.randrange(len(t))] = pick.choice(chars)
            strings += ["".join(t), s[:pick.randrange(len(s))]]
    strings += ["", "o" * 11 + "0", "o" * 12 + "0", "o" * 12 + "8", "1" * 500, "P", "o" * 8 + "Q"]
    parsed = {}
    for start in (0, 10**9):  # numpy for every string, then the loop for every string
        monkeypatch.setattr(validation, "VECTORIZED_FROM", start)
        parsed[start] = [validation.rle_counts(s) for s in strings]
    for s, a, b in zip(strings, *parsed.values()):
        assert (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b)), s
    assert sum(a is None for a in parsed[0]) > 50 and sum(a is not None for a in parsed[0]) > 60
    assert validation.rle_counts("o" * 12 + "0") is None  # a count of 13 groups: past MAX_GROUPS
    assert validation.rle_counts("o" * 12 + "8") is None  # 2^63 and more: was an OverflowError, not a fault


def _random_counts_strings(seed: int) -> list[tuple[str, int, int]]:
    """(counts string, height, width): pycocotools' strings of random masks, many corrupted."""
    import random

    rng, pick = np.random.default_rng(seed), random.Random(seed)
    out = []
    for _ in range(80):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        mask = np.zeros((h, w), np.uint8, order="F")
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        mask[y:y + int(rng.integers(1, h + 1)), x:x + int(rng.integers(1, w + 1))] = 1
        if rng.random() < 0.4:
            mask ^= (rng.random((h, w)) < 0.2).astype(np.uint8)
        if rng.random() < 0.1:
            mask[:] = rng.integers(0, 2)
        s = coco_mask.encode(np.asfortranarray(mask))["counts"].decode()
        out.append((s, h, w))
        t = list(s)
        t[pick.randrange(len(t))] = pick.choice([chr(c) for c in range(40, 120)] + ["é"])
        out += [("".join(t), h, w), (s[:pick.randrange(len(s) + 1)], h, w), (s, h + 1, w), (s, h, w - 1)]
    out += [("", 0, 5), ("", 1, 1), ("o" * 12 + "0", 4, 4), ("1" * 500, 3, 3), (s[:-1] + chr(ord(s[-1]) + 32) + "0", h, w)]
    return out


def test_compiled_counts_check_agrees_with_the_parser_and_pycocotools():
    """dataset.rle_check passes exactly the strings the per-mask checks pass (they parse, sum
    to the size with positive runs, and are canonical), with pycocotools' area and bbox."""
    from dataset.rle_check import check_counts
    from dataset.validation import MAX_GROUPS, MAX_RUN, rle_counts

    cases = _random_counts_strings(3)
    data = np.frombuffer("".join(s for s, _, _ in cases).encode("utf-8"), np.uint8)
    offsets = np.concatenate([[0], np.cumsum([len(s.encode("utf-8")) for s, _, _ in cases])]).astype(np.int64)
    heights, widths = (np.array(v, np.int64) for v in zip(*[(h, w) for _, h, w in cases]))
    area, bbox = np.zeros(len(cases), np.int64), np.zeros((len(cases), 4), np.int64)
    ok = check_counts(data, offsets, heights, widths, area, bbox, MAX_GROUPS, MAX_RUN)
    for k, (s, h, w) in enumerate(cases):
        runs = rle_counts(s)
        valid = (runs is not None and runs.sum() == h * w and not np.any(runs[1:] <= 0) and (len(runs) == 0 or runs[0] >= 0)
                 and coco_mask.frPyObjects({"size": [h, w], "counts": runs.astype(np.uint32)}, h, w)["counts"]
                 == s.encode("ascii"))
        assert ok[k] == valid, (s, h, w)
        if valid:
            rle = {"size": [h, w], "counts": s.encode("ascii")}
            assert area[k] == int(coco_mask.area(rle)) and list(bbox[k]) == [int(v) for v in coco_mask.toBbox(rle)]
    assert 60 < ok.sum() < len(cases) - 100


def test_the_batch_checks_and_the_per_mask_checks_report_the_same(tmp_path, good, monkeypatch):
    """Faults of every per-mask kind planted across a table: the batch path (compiled counts
    checks, masks not proven clean checked one by one) reports exactly what checking every
    mask one by one reports, in the same order."""
    import random

    import dataset.validation as validation

    pick = random.Random(5)
    rows = []
    for r in range(12):
        for row in copy.deepcopy(good):
            row["image_id"] = hashlib.sha256(f"{r} {row['image_id']}".encode()).hexdigest()
            row["image_key"] = int(row["image_id"][:12], 16)
            for index, ann in enumerate(row["annotations"]):
                ann["id"] = annotation_id(row["image_key"], index)
            rows.append(row)
    planted = [k for k in CORRUPTIONS if k not in ("image_id", "duplicate_image", "duplicate_key")]
    for row in rows[1:]:
        if pick.random() < 0.6:
            CORRUPTIONS[pick.choice(planted)]([rows[0], row])  # _mask(rows) is the second row's
        if pick.random() < 0.3:
            seg = pick.choice(row["annotations"])["segmentation"]
            seg["counts"] = RLE_CORRUPTIONS[pick.choice(["truncated", "bad character", "changed run"])](seg["counts"])
    root = _write(tmp_path, rows)
    fast_checks, proven = validation._fast_checks, []

    def counted(table):
        out = fast_checks(table)
        proven.append(None if out is None else int(out[3].sum()))
        return out

    monkeypatch.setattr(validation, "_fast_checks", counted)
    batch = validate(root, batch_rows=5)
    assert None not in proven and sum(proven) > 0.5 * batch.masks  # the batch path ran, and proved most
    monkeypatch.setattr(validation, "_fast_checks", lambda table: None)
    one_by_one = validate(root, batch_rows=5)
    assert batch.counts == one_by_one.counts and dict(batch.faults) == dict(one_by_one.faults)
    assert (batch.images, batch.masks) == (one_by_one.images, one_by_one.masks)
    assert len(batch.counts) >= 6 and sum(batch.counts.values()) > 20, batch.text()
