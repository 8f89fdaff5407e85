"""One pipeline run writes a dataset root at a time (pipeline.lease), locally and on S3 (a
real moto server); and the run summary counts as annotated only what the run's rows hold."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from dataset import DatasetWriter, read_images
from dataset.reader import read_table
from dataset.lineage import listing_hash, new_lineage
from dataset.storage import WRITER_LEASE
from pipeline import lease as lease_module
from pipeline.lease import LeaseHeld, LeaseLost, WriterLease, read_lease
from pipeline.sources import InputError, check_output
from tests.s3server import moto_server

ROOT = Path(__file__).resolve().parents[1]
# A process that holds a lease until it is killed (or its stdin closes).
HOLDER = """
import sys
sys.path.insert(0, {root!r})
from pipeline.lease import WriterLease
lease = WriterLease({out!r}, run_id="holder-run", log=lambda *a: None).acquire()
print("held", flush=True)
sys.stdin.read()
"""


def hold_in_subprocess(out: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), out=out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def s3():
    with moto_server("leases") as endpoint:
        yield endpoint


# -- local roots --------------------------------------------------------------------------------
def test_local_second_acquire_is_refused_naming_the_holder_until_release(tmp_path):
    root = str(tmp_path / "ds")
    first = WriterLease(root, run_id="run-a").acquire()
    try:
        record = read_lease(root)
        assert (record["run_id"], record["host"], record["pid"]) == ("run-a", socket.gethostname(), os.getpid())
        assert record["started"] and record["heartbeat"]
        check_output(root)  # the hidden lease file does not make the root "not a dataset"
        with pytest.raises(LeaseHeld) as refused:
            WriterLease(root, run_id="run-b").acquire()
        assert isinstance(refused.value, InputError) and refused.value.holder["run_id"] == "run-a"
        message = str(refused.value)
        assert "\n" not in message
        for part in ("run run-a", f"host {socket.gethostname()}", f"pid {os.getpid()}",
                     f"started {record['started']}", "last heartbeat", "wait for that run", "another --output",
                     "free the moment its process exits"):
            assert part in message, (part, message)
        assert read_lease(root)["run_id"] == "run-a"  # the refused run wrote nothing
    finally:
        first.release()
    assert read_lease(root) is None and not (tmp_path / "ds" / WRITER_LEASE).exists()
    with WriterLease(root, run_id="run-b"):
        assert read_lease(root)["run_id"] == "run-b"
    assert read_lease(root) is None


def test_local_lease_of_a_sigkilled_run_is_taken_over_at_once(tmp_path):
    root = str(tmp_path / "ds")
    holder = hold_in_subprocess(root)
    try:
        with pytest.raises(LeaseHeld, match=f"run holder-run on host .*, pid {holder.pid}"):
            WriterLease(root).acquire()
    finally:
        kill(holder)
    logged = []
    with WriterLease(root, run_id="next", log=logged.append):  # no wait: the lock died with the process
        assert read_lease(root)["run_id"] == "next"
    assert logged and "took over" in logged[0] and f"pid {holder.pid}" in logged[0] and "no longer running" \
        in logged[0]


def test_local_heartbeat_and_run_name_rewrite_the_record(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "HEARTBEAT_S", 0.2)
    root = str(tmp_path / "ds")
    with WriterLease(root) as held:
        first = read_lease(root)
        assert first["run_id"] is None
        held.name_run("named-later")
        assert read_lease(root)["run_id"] == "named-later"
        deadline = time.time() + 10
        while read_lease(root)["heartbeat"] == first["heartbeat"]:  # whole seconds
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.1)
        held.check()


def race(n: int, lease) -> tuple[list, list]:
    """n threads calling lease(i).acquire() at once: the leases won, the indexes refused."""
    won, refused, start = [], [], threading.Barrier(n)

    def take(i):
        start.wait()
        try:
            won.append(lease(i).acquire())
        except LeaseHeld:
            refused.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def test_local_racing_acquirers_exactly_one_wins(tmp_path):
    root = str(tmp_path / "ds")
    won, refused = race(8, lambda i: WriterLease(root, run_id=f"r{i}"))
    assert len(won) == 1 and len(refused) == 7
    assert read_lease(root)["run_id"] == won[0].record["run_id"]
    won[0].release()


# -- S3 roots -----------------------------------------------------------------------------------
def test_s3_second_acquire_is_refused_naming_the_holder_until_release(s3):
    root = "s3://leases/refused"
    first = WriterLease(root, s3, run_id="run-a").acquire()
    try:
        with pytest.raises(LeaseHeld) as refused:
            WriterLease(root, s3, run_id="run-b").acquire()
        message = str(refused.value)
        for part in ("run run-a", f"pid {os.getpid()}", "last heartbeat", "another --output",
                     f"s3://leases/refused/{WRITER_LEASE}", f"{lease_module.STALE_S:.0f} s old"):
            assert part in message, (part, message)
        assert read_lease(root, s3)["run_id"] == "run-a"
        # A new prefix holding only the lease (its run died before making the tables) is no
        # user's data: the root is accepted, and the lease, not the root check, refuses.
        check_output(root, s3)
        with pytest.raises(InputError, match="not empty"):
            check_output("s3://leases", s3)  # ... while other objects still count
    finally:
        first.release()
    assert read_lease(root, s3) is None
    with WriterLease(root, s3, run_id="run-b"):
        assert read_lease(root, s3)["run_id"] == "run-b"
    assert read_lease(root, s3) is None


def test_s3_stale_lease_is_taken_over_by_exactly_one_and_its_holder_stops(s3, monkeypatch):
    root = "s3://leases/stale"
    stalled = WriterLease(root, s3, run_id="stalled").acquire()  # heartbeat every 20 s: none in this test
    monkeypatch.setattr(lease_module, "STALE_S", 1.0)
    time.sleep(2.2)  # the store's clock counts whole seconds
    won, refused = race(4, lambda i: WriterLease(root, s3, run_id=f"taker-{i}", log=lambda *a: None))
    assert len(won) == 1 and len(refused) == 3
    taker = won[0]
    assert read_lease(root, s3)["run_id"] == taker.record["run_id"]
    stalled.beat()  # its next heartbeat finds the lease taken (If-Match on its old ETag fails)
    with pytest.raises(LeaseLost, match=f"to run {taker.record['run_id']}"):
        stalled.check()
    stalled.release()  # does not remove the taker's lease
    assert read_lease(root, s3)["run_id"] == taker.record["run_id"]
    taker.release()
    assert read_lease(root, s3) is None


def test_s3_lease_of_a_sigkilled_run_on_this_host_is_taken_over_at_once(s3):
    root = "s3://leases/killed"
    holder = hold_in_subprocess(root)  # the moto endpoint is in its environment (AWS_ENDPOINT_URL)
    try:
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}"):
            WriterLease(root, s3).acquire()
    finally:
        kill(holder)
    logged = []
    with WriterLease(root, s3, run_id="next", log=logged.append):  # long before STALE_S
        assert read_lease(root, s3)["run_id"] == "next"
    assert logged and "took over" in logged[0] and "holder-run" in logged[0]


def test_s3_heartbeat_rewrites_the_lease(s3, monkeypatch):
    monkeypatch.setattr(lease_module, "HEARTBEAT_S", 0.3)
    root = "s3://leases/heartbeat"
    with WriterLease(root, s3, run_id="beating") as held:
        store = lease_module._S3Lease(root, s3)
        _, etag, _ = store.get()
        deadline = time.time() + 10
        while store.get()[1] == etag:
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.1)
        record, _, age = store.get()
        assert record["run_id"] == "beating" and age < lease_module.STALE_S
        held.check()
    assert read_lease(root, s3) is None


# -- the run summary ------------------------------------------------------------------------------
def _image(seed: str) -> dict:
    return {"image_id": hashlib.sha256(seed.encode()).hexdigest(), "uri": f"/in/{seed}.png", "width": 8,
            "height": 8, "phash": None, "annotations": []}


def _batch(images: list[dict], masks: list[int]) -> dict:
    def objects(values):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    n = len(images)
    return {"uri": objects([im["uri"] for im in images]), "status": objects(["ok"] * n),
            "reason": objects([""] * n), "image_id": objects([im["image_id"] for im in images]),
            "width": np.full(n, 8), "height": np.full(n, 8), "phash": objects([None] * n),
            "annotations": objects(["[]"] * n), "duplicate_of": objects([None] * n), "kind": objects([None] * n),
            "distance": np.zeros(n, np.int64), "masks": np.array(masks)}


def test_writer_counts_as_annotated_only_what_this_runs_rows_hold(tmp_path):
    from actors.writer import Writer

    root = str(tmp_path / "ds")
    a, b = _image("a"), _image("b")
    DatasetWriter(root, new_lineage(round=0, stage="auto", run_id="other-run")).commit_images([a])
    lineage = new_lineage(round=0, stage="auto", run_id="this-run").model_dump()
    out = Writer(root, lineage)(_batch([a, b], [3, 5]))
    assert list(out["status"]) == ["already_committed", "annotated"]
    assert list(out["masks"]) == [0, 5]  # masks written
    # A retry of the chunk by a restarted writer of the same run: both images are this run's.
    again = Writer(root, lineage)(_batch([a, b], [3, 5]))
    assert list(again["status"]) == ["already_committed", "annotated"]
    rows = read_images(root, columns=["image_id", "run_id"]).to_pylist()
    assert sorted((r["image_id"], r["run_id"]) for r in rows) == sorted(
        [(a["image_id"], "other-run"), (b["image_id"], "this-run")])


# -- fencing: a writer of a run that lost its lease commits nothing more ------------------------------
def _refused_batch(seeds: list[str]) -> dict:
    """A chunk of images and a quarantined input: each would be a commit."""
    batch = _batch([_image(s) for s in seeds], [1] * len(seeds))
    batch["status"][-1], batch["reason"][-1] = "quarantined", "decode: not an image"
    return batch


def test_s3_writer_of_a_run_whose_lease_was_taken_over_commits_nothing_more(s3, monkeypatch):
    from actors.writer import Writer

    root = "s3://leases/fenced"
    old = WriterLease(root, s3, run_id="old-run").acquire()  # heartbeat every 20 s: none in this test
    writer = Writer(root, new_lineage(round=0, stage="auto", run_id="old-run").model_dump(), s3,
                    lease_token=old.token)
    a = _image("a")
    assert list(writer(_batch([a], [2]))["status"]) == ["annotated"]  # its lease is its own: committed
    monkeypatch.setattr(lease_module, "STALE_S", 1.0)
    time.sleep(2.2)  # the store's clock counts whole seconds
    taker = WriterLease(root, s3, run_id="taker", log=lambda *a: None).acquire()
    try:
        with pytest.raises(LeaseLost) as refused:
            writer(_refused_batch(["b", "c"]))
        old.beat()  # the driver's heartbeat finds the lease taken too: one message for both
        with pytest.raises(LeaseLost) as driver:
            old.check()
        assert str(refused.value) == str(driver.value)
        assert "\n" not in str(refused.value) and f"lost the writer lease of {root} to run taker" in str(refused.value)
    finally:
        old.release()
        assert read_lease(root, s3)["run_id"] == "taker"
        taker.release()
    rows = read_images(root, columns=["image_id", "run_id"]).to_pylist()
    assert rows == [{"image_id": a["image_id"], "run_id": "old-run"}]  # what it committed before is kept
    assert read_table(root, "quarantine").num_rows == 0  # the refused batch is dropped, not quarantined


def test_local_writer_of_a_dead_driver_commits_nothing_once_the_next_run_took_the_lease(tmp_path):
    """The flock dies with the driver, its writer actors a moment later (when Ray reaps the
    job): a writer of the dead run that commits after the next run took the lease is refused."""
    from actors.writer import Writer

    root = str(tmp_path / "ds")
    holder = hold_in_subprocess(root)  # the driver of run holder-run
    token = read_lease(root)["token"]
    writer = Writer(root, new_lineage(round=0, stage="auto", run_id="holder-run").model_dump(),
                    lease_token=token)  # one of its writer actors
    a = _image("a")
    try:
        assert list(writer(_batch([a], [2]))["status"]) == ["annotated"]
    finally:
        kill(holder)
    with WriterLease(root, run_id="next-run", log=lambda *a: None):  # at once: the lock died with the driver
        with pytest.raises(LeaseLost) as refused:
            writer(_refused_batch(["b", "c"]))
    assert str(refused.value) == (
        f"lost the writer lease of {root} to run next-run on host {socket.gethostname()}, pid {os.getpid()}: this "
        "run's driver process ended, so that run took it over. What this run committed is kept; rerun the same "
        "command once that run has finished")
    rows = read_images(root, columns=["image_id", "run_id"]).to_pylist()
    assert rows == [{"image_id": a["image_id"], "run_id": "holder-run"}]
    assert read_table(root, "quarantine").num_rows == 0


# -- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session(s3):  # the S3 server's endpoint in the environment Ray's workers start with
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_auto_annotate_on_an_output_another_run_writes_exits_2_and_writes_nothing(ray_session, tmp_path, capsys):
    from jobs.auto_annotate import main
    from tests.test_pipeline import AMG_FLAGS, _png
    from training.synthetic import make_scene

    src, out = tmp_path / "in", tmp_path / "ds"
    src.mkdir()
    for i in range(2):
        (src / f"s{i}.png").write_bytes(_png(make_scene(seed=700 + i, size=(64, 64)).image))
    argv = ["--input", str(src), "--output", str(out), *AMG_FLAGS, "--chunk-images", "1"]
    holder = hold_in_subprocess(str(out))  # a live run holding the output's lease
    try:
        held = (out / WRITER_LEASE).read_bytes()
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"error: output {out} is being written by another pipeline run: run holder-run on "
                              f"host {socket.gethostname()}, pid {holder.pid}, started "), err
        assert "another --output" in err
        assert os.listdir(out) == [WRITER_LEASE] and (out / WRITER_LEASE).read_bytes() == held  # nothing written
    finally:
        kill(holder)
    assert main(argv) == 0  # the holder is gone: its lease is free at once
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{\n") + 1:])  # printed last
    assert (summary["annotated"], summary["already_committed"]) == (2, 0)
    assert not (out / WRITER_LEASE).exists()


def test_run_whose_lease_is_taken_over_mid_run_commits_nothing_more_and_exits_2(ray_session, s3, tmp_path,
                                                                              monkeypatch, capsys):
    """Another run takes the lease over right after this run recorded its start, long before
    its heartbeat would notice: its writer actors refuse every commit, and the run ends with
    the one-line 'lease lost' error."""
    from jobs.auto_annotate import main
    from tests.test_pipeline import AMG_FLAGS, _png
    from training.synthetic import make_scene

    src, root = tmp_path / "in", "s3://leases/taken-mid-run"
    src.mkdir()
    for i in range(2):
        (src / f"s{i}.png").write_bytes(_png(make_scene(seed=710 + i, size=(64, 64)).image))
    (src / "notes.png").write_bytes(b"not an image")  # would be quarantined
    monkeypatch.setattr(lease_module, "STALE_S", 1.0)
    takers, start_run = [], DatasetWriter.start_run

    def start_run_then_lose_the_lease(self, *args, **kwargs):
        start_run(self, *args, **kwargs)
        time.sleep(2.2)  # this run's lease is now stale by the store's clock
        takers.append(WriterLease(root, s3, run_id="taker", log=lambda *a: None).acquire())

    monkeypatch.setattr(DatasetWriter, "start_run", start_run_then_lose_the_lease)
    capsys.readouterr()
    try:
        assert main(["--input", str(src), "--output", root, "--endpoint-url", s3, *AMG_FLAGS,
                     "--chunk-images", "1"]) == 2
        assert read_lease(root, s3)["run_id"] == "taker"  # the losing run left the taker's lease alone
    finally:
        for taker in takers:
            taker.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: lost the writer lease of {root} to run taker on host "), err
    assert err[-1].endswith("What this run committed is kept; rerun the same command once that run has finished")
    assert read_images(root).num_rows == 0 and read_table(root, "quarantine").num_rows == 0
    assert read_table(root, "duplicates").num_rows == 0


def test_rebuild_on_an_output_another_run_writes_is_refused_before_anything(tmp_path):
    """A rebuild takes the lease before its deletes (and its run uses that lease, which
    tests/test_rebuild.py exercises)."""
    from jobs.auto_annotate import load_config
    from pipeline.rebuild import rebuild

    src, out = tmp_path / "in", tmp_path / "ds"
    src.mkdir()
    (src / "a.png").write_bytes(b"not read")
    holder = hold_in_subprocess(str(out))
    try:
        config = load_config(["--input", str(src), "--output", str(out)])
        with pytest.raises(LeaseHeld, match=f"run holder-run on host .*, pid {holder.pid}"):
            rebuild(config, full=True, prune_deleted=True, retention_hours=0)
        assert os.listdir(out) == [WRITER_LEASE]
    finally:
        kill(holder)


@pytest.mark.parametrize("before", ["delete", "vacuum"])
def test_rebuild_whose_lease_is_taken_over_deletes_nothing_more_and_exits_2(before, ray_session, s3, tmp_path,
                                                                          monkeypatch, capsys):
    """Another run takes a rebuild's lease over right before its deletes, or right before
    its vacuum (after its run, which had nothing to do): the rebuild deletes no row and no
    file from then on, and ends with the pipeline's one-line 'lease lost' error."""
    import pipeline.graph as graph_module
    import pipeline.rebuild as rebuild_module
    from actors.writer import Writer
    from dataset.storage import s3_filesystem
    from jobs.rebuild import main
    from pipeline.sources import list_inputs
    from tests.test_pipeline import AMG_FLAGS

    src, root = tmp_path / "in", f"s3://leases/rebuild-taken-before-{before}"
    src.mkdir()
    (src / "kept.png").write_bytes(b"not read")
    listing = list_inputs(str(src)).to_pylist()
    kept = {**_image("kept"), "uri": listing[0]["uri"]}  # recorded, unchanged since: nothing to annotate
    # An earlier run, as the pipeline records one; its inputs gone from the source since (an
    # image and a quarantined input) are pruned by the rebuild.
    lineage = new_lineage(round=0, stage="auto", run_id="earlier-run", listing_hash=listing_hash(listing))
    DatasetWriter(root, lineage, endpoint_url=s3).start_run([{**r, "listing_hash": lineage.listing_hash,
                                                              "run_id": lineage.run_id} for r in listing])
    Writer(root, lineage.model_dump(), s3)(_refused_batch(["gone", "bad"]))
    Writer(root, lineage.model_dump(), s3)(_batch([kept], [1]))
    fs = s3_filesystem(s3)
    files = set(fs.find(root)) - {f"{root.removeprefix('s3://')}/{WRITER_LEASE}"}
    monkeypatch.setattr(lease_module, "STALE_S", 1.0)
    takers = []

    def then_lose_the_lease(step):
        def wrapped(*args, **kwargs):
            out = step(*args, **kwargs)
            time.sleep(2.2)  # the rebuild's lease is now stale by the store's clock
            takers.append(WriterLease(root, s3, run_id="taker", log=lambda *a: None).acquire())
            return out
        return wrapped

    module, name = (rebuild_module, "find_changes") if before == "delete" else (graph_module, "run")
    monkeypatch.setattr(module, name, then_lose_the_lease(getattr(module, name)))
    capsys.readouterr()
    try:
        assert main(["--input", str(src), "--output", root, "--endpoint-url", s3, *AMG_FLAGS, "--prune-deleted",
                     "--retention-hours", "0"]) == 2
        assert read_lease(root, s3)["run_id"] == "taker"  # the losing rebuild left the taker's lease alone
    finally:
        for taker in takers:
            taker.release()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: lost the writer lease of {root} to run taker on host "), err
    assert err.endswith("What this run committed is kept; rerun the same command once that run has finished"), err
    fs.invalidate_cache()
    assert files <= set(fs.find(root))  # no file deleted (a vacuum would delete the deletes' old files)
    uris = sorted(read_images(root, columns=["uri"])["uri"].to_pylist())
    quarantined = read_table(root, "quarantine")["uri"].to_pylist()
    if before == "delete":
        assert (uris, quarantined) == (sorted([kept["uri"], "/in/gone.png"]), ["/in/bad.png"])  # no row deleted
    else:  # deleted while the lease was still the rebuild's
        assert (uris, quarantined) == ([kept["uri"]], [])


def test_rebuild_vacuums_a_root_that_lacks_some_tables(ray_session, tmp_path, capsys):
    """A root an import made holds no listing, duplicates or quarantine table, and a
    rebuild whose run has nothing to do makes none: its vacuum skips them (was a ValueError
    traceback: not a Delta table)."""
    from jobs.rebuild import main
    from pipeline.sources import list_inputs
    from tests.test_pipeline import AMG_FLAGS

    src, root = tmp_path / "in", str(tmp_path / "ds")
    src.mkdir()
    (src / "a.png").write_bytes(b"imported")
    uri = list_inputs(str(src))["uri"][0].as_py()
    DatasetWriter(root, new_lineage(round=0, stage="auto", run_id="import")).commit_images([{**_image("a"), "uri": uri}])
    assert not os.path.exists(os.path.join(root, "duplicates"))
    capsys.readouterr()
    assert main(["--input", str(src), "--output", root, *AMG_FLAGS, "--retention-hours", "0"]) == 0
    assert "1 already done, 0 to go" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(root, "duplicates")) and read_images(root).num_rows == 1


# -- the jobs' check before Ray (pipeline.lease.check_free) ---------------------------------------
def test_check_free_local_refuses_only_a_live_holder_and_writes_nothing(tmp_path):
    root = str(tmp_path / "ds")
    lease_module.check_free(root)  # no root yet: nothing to refuse
    assert not (tmp_path / "ds").exists()
    holder = hold_in_subprocess(root)
    try:
        held = (tmp_path / "ds" / WRITER_LEASE).read_bytes()
        with pytest.raises(LeaseHeld) as checked:
            lease_module.check_free(root)
        with pytest.raises(LeaseHeld) as acquired:
            WriterLease(root).acquire()
        assert str(checked.value) == str(acquired.value)  # one refusal, one message
        assert checked.value.holder["pid"] == holder.pid
    finally:
        kill(holder)
    assert (tmp_path / "ds" / WRITER_LEASE).read_bytes() == held  # the dead run's file, untouched
    lease_module.check_free(root)  # its lock died with it
    assert (tmp_path / "ds" / WRITER_LEASE).read_bytes() == held


def test_acquire_is_not_refused_for_a_check_free_in_progress(tmp_path):
    """check_free holds a shared lock for moments: an acquire meeting it waits it out instead
    of refusing a run that no one holds the lease against."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / WRITER_LEASE).write_text("{}")  # a dead run's lease
    fd = os.open(root / WRITER_LEASE, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # what check_free takes
    threading.Timer(0.1, os.close, args=(fd,)).start()
    with WriterLease(str(root), run_id="after-check", log=lambda *a: None):
        assert read_lease(str(root))["run_id"] == "after-check"


def test_check_free_s3_refuses_only_a_live_holder(s3, monkeypatch):
    lease_module.check_free("s3://leases/none-yet", s3)
    lease_module.check_free("s3://no-such-bucket/ds", s3)
    root = "s3://leases/check"
    live = WriterLease(root, s3, run_id="live").acquire()
    try:
        with pytest.raises(LeaseHeld, match=f"run live on host .*, pid {os.getpid()}.*"
                                            f"{lease_module.STALE_S:.0f} s old"):
            lease_module.check_free(root, s3)
        monkeypatch.setattr(lease_module, "STALE_S", 1.0)
        time.sleep(2.2)  # not renewed (heartbeat every 20 s): stale by the store's clock
        lease_module.check_free(root, s3)
        assert read_lease(root, s3)["run_id"] == "live"  # read only
    finally:
        live.release()
    monkeypatch.undo()
    holder = hold_in_subprocess("s3://leases/check-killed")  # fresh, but its pid on this host is gone
    kill(holder)
    lease_module.check_free("s3://leases/check-killed", s3)
    assert read_lease("s3://leases/check-killed", s3)["run_id"] == "holder-run"


# The job's main with ray.init replaced by an exit: starting (or joining) Ray at all fails it.
JOB = """
import sys
sys.path.insert(0, {root!r})
import ray
def no_ray(*args, **kwargs):
    sys.exit("ray.init called")
ray.init = no_ray
from jobs.{job} import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("job", ["auto_annotate", "rebuild"])
def test_job_on_an_output_another_run_writes_is_refused_before_ray_starts(job, tmp_path):
    src, out = tmp_path / "in", tmp_path / "ds"
    src.mkdir()
    (src / "a.png").write_bytes(b"not read")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # would start the embedded Ray
    holder = hold_in_subprocess(str(out))
    try:
        argv = ["--input", str(src), "--output", str(out)]
        done = subprocess.run([sys.executable, "-c", JOB.format(root=str(ROOT), job=job, argv=argv)], env=env,
                              capture_output=True, text=True, timeout=300)
        err = done.stderr.strip()
        assert done.returncode == 2, err
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"error: output {out} is being written by another pipeline run: run holder-run on "
                              f"host {socket.gethostname()}, pid {holder.pid}, started "), err
        assert os.listdir(out) == [WRITER_LEASE] and read_lease(str(out))["run_id"] == "holder-run"
    finally:
        kill(holder)
