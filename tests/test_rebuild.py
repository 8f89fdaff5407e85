"""Scheduled rebuilds: incremental (new, changed, touched, deleted objects) and full (new
parameters), both idempotent, with old versions still readable."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import ray
from deltalake import DeltaTable

from dataset import read_images, read_table
from jobs.auto_annotate import load_config
from pipeline.graph import run
from pipeline.rebuild import rebuild
from tests.test_pipeline import AMG_FLAGS, _png
from training.synthetic import make_scene


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _versions(root):
    return {t: DeltaTable(str(root / t)).version() for t in ("annotations", "duplicates", "quarantine", "listing",
                                                            "lineage") if (root / t).exists()}


def _rows(root):
    return {os.path.basename(r["uri"]): r for r in read_images(str(root), columns=["uri", "image_id", "run_id",
                                                                                   "annotations"]).to_pylist()}


def test_incremental_then_full_rebuild(ray_session, tmp_path):
    src, out = tmp_path / "src", tmp_path / "ds"
    src.mkdir()
    for i in range(4):
        (src / f"s{i}.png").write_bytes(_png(make_scene(seed=200 + i, size=(96, 128)).image))
    (src / "bad.jpg").write_bytes(b"not an image")
    args = ["--input", str(src), "--output", str(out), *AMG_FLAGS]
    first = run(load_config(args))
    assert (first["annotated"], first["quarantined"]) == (4, 1)
    before = _rows(out)

    # Nothing changed at the source: nothing to do, nothing written.
    v0 = _versions(out)
    r = rebuild(load_config(args))
    assert (r["new"], r["changed"], r["touched"], r["deleted"], r["run"]["processed"]) == (0, 0, 0, 0, 0)
    assert _versions(out) == v0

    # The source moves on: one new object, one rewritten with other content, one touched
    # (same bytes, new mtime), one deleted, and the broken one fixed.
    (src / "s4.png").write_bytes(_png(make_scene(seed=204, size=(96, 128)).image))
    (src / "s1.png").write_bytes(_png(make_scene(seed=999, size=(96, 128)).image))
    time.sleep(0.01)
    os.utime(src / "s2.png")
    (src / "s3.png").unlink()
    shutil.copy(src / "s0.png", src / "bad.jpg")  # now the same bytes as s0: a duplicate
    r = rebuild(load_config(args), prune_deleted=True)
    assert (r["new"], r["changed"], r["touched"], r["deleted"]) == (1, 2, 1, 1)
    assert (r["run"]["processed"], r["run"]["annotated"], r["run"]["duplicate"]) == (3, 2, 1)
    after = _rows(out)
    assert sorted(after) == ["s0.png", "s1.png", "s2.png", "s4.png"]
    assert after["s1.png"]["image_id"] != before["s1.png"]["image_id"]  # re-annotated
    for name in ("s0.png", "s2.png"):  # untouched rows, same run (as JSON: NaN scores of empty masks)
        assert json.dumps(after[name], sort_keys=True) == json.dumps(before[name], sort_keys=True)
    assert read_table(str(out), "quarantine").num_rows == 0  # bad.jpg is a duplicate now, recorded once
    assert [os.path.basename(u) for u in read_table(str(out), "duplicates")["uri"].to_pylist()] == ["bad.jpg"]
    # The incremental version holds what a fresh build of the same inputs holds.
    fresh = tmp_path / "fresh"
    run(load_config(["--input", str(src), "--output", str(fresh), *AMG_FLAGS]))
    # As JSON text: NaN stability scores (empty masks) compare equal there.
    by_id = lambda root: {r["image_id"]: json.dumps(r["annotations"]) for r in _rows(root).values()}  # noqa: E731
    assert by_id(out) == by_id(fresh)
    assert read_table(str(fresh), "duplicates").num_rows == 1 and read_table(str(fresh), "quarantine").num_rows == 0
    # And again: idempotent.
    v1 = _versions(out)
    r = rebuild(load_config(args), prune_deleted=True)
    assert (r["new"], r["changed"], r["touched"], r["deleted"], r["run"]["processed"]) == (0, 0, 0, 0, 0)
    assert _versions(out) == v1

    # Full rebuild with other parameters: every image re-annotated, each still once; a
    # reader pinned to the old version sees the old annotations.
    pinned = DeltaTable(str(out / "annotations")).version()
    full_args = [*args, "--points-per-side", "3"]
    r = rebuild(load_config(full_args), full=True)
    assert (r["run"]["processed"], r["run"]["annotated"], r["run"]["duplicate"]) == (5, 4, 1)
    rows = _rows(out)
    kept = "s0.png" if "s0.png" in rows else "bad.jpg"  # same bytes: whichever copy came first
    other = "bad.jpg" if kept == "s0.png" else "s0.png"
    assert sorted(rows) == sorted(["s1.png", "s2.png", "s4.png", kept])
    assert len({x["run_id"] for x in rows.values()}) == 1
    assert rows[kept]["run_id"].startswith("full-") and rows[kept]["image_id"] == after["s0.png"]["image_id"]
    assert all(len(a["point_coords"]) == 1 for x in rows.values() for a in x["annotations"])
    grid3 = {round(a["point_coords"][0][0] / 128 * 6) for x in rows.values() for a in x["annotations"]}
    assert grid3 <= {1, 3, 5}  # 3x3 grid points sit at 1/6, 3/6, 5/6 of the width
    old = read_images(str(out), version=pinned).to_pylist()
    assert {os.path.basename(x["uri"]): x["run_id"] for x in old} == \
        {k: v["run_id"] for k, v in after.items()}
    dups = read_table(str(out), "duplicates").to_pylist()
    assert len(dups) == 1 and dups[0]["run_id"] == rows[kept]["run_id"]  # the old record superseded
    assert os.path.basename(dups[0]["uri"]) == other
    # The same full rebuild again: it resumes to nothing.
    v2 = _versions(out)
    r = rebuild(load_config(full_args), full=True)
    assert r["run"]["processed"] == 0 and r["superseded_rows"] == 0 and _versions(out) == v2

    # The kept copy changes at the source: the other copy (the old bytes) loses its original,
    # so it is examined again and annotated, not left as a duplicate of rows that are gone.
    (src / kept).write_bytes(_png(make_scene(seed=555, size=(96, 128)).image))
    r = rebuild(load_config(full_args), prune_deleted=True)
    assert (r["changed"], r["requeued_duplicates"], r["run"]["annotated"]) == (1, 1, 2)
    assert sorted(_rows(out)) == ["bad.jpg", "s0.png", "s1.png", "s2.png", "s4.png"]
    assert read_table(str(out), "duplicates").num_rows == 0


def test_an_object_changed_during_a_rebuild_is_left_to_the_next_one(ray_session, tmp_path, monkeypatch):
    """The run of a rebuild records the listing the rebuild decided by: an object rewritten
    after that listing is seen as changed by the next rebuild (with its own listing, the
    run recorded the new etag beside the old annotations, and no rebuild looked again)."""
    import pipeline.rebuild as rebuild_module

    src, out = tmp_path / "src", tmp_path / "ds"
    src.mkdir()
    for i in range(2):
        (src / f"s{i}.png").write_bytes(_png(make_scene(seed=300 + i, size=(96, 128)).image))
    args = ["--input", str(src), "--output", str(out), *AMG_FLAGS]
    run(load_config(args))
    before = _rows(out)["s1.png"]["image_id"]

    decide = rebuild_module.find_changes

    def changes_then_rewrite(*a, **k):
        changes = decide(*a, **k)
        (src / "s1.png").write_bytes(_png(make_scene(seed=777, size=(96, 128)).image))  # after the listing
        return changes

    monkeypatch.setattr(rebuild_module, "find_changes", changes_then_rewrite)
    r = rebuild(load_config(args))
    assert (r["changed"], r["run"]["processed"]) == (0, 0)
    monkeypatch.setattr(rebuild_module, "find_changes", decide)
    r = rebuild(load_config(args))
    assert (r["changed"], r["run"]["annotated"]) == (1, 1)
    assert _rows(out)["s1.png"]["image_id"] != before
