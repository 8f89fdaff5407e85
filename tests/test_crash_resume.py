"""Crash and resume, exactly once: the job (driver + its embedded Ray) is SIGKILLed early
(while reading), then mid-run (some chunks committed), a chunk's data files are left in
the table without their Delta commit (what a kill between the two leaves), a run is
interrupted with Ctrl-C, and the same command is rerun until it completes. Every input
ends in exactly one table, once."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
from deltalake import DeltaTable

from dataset import read_images, read_table
from schemas import to_table
from tests.test_pipeline import AMG_FLAGS, _png
from training.synthetic import make_scene

ROOT = Path(__file__).resolve().parents[1]


def _commits(table: Path) -> int:
    log = table / "_delta_log"
    return len(list(log.glob("*.json"))) if log.is_dir() else -1


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "jobs/auto_annotate.py", *args], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(proc: subprocess.Popen, ready, timeout: float) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the job ended before the point to stop it"
        assert time.time() < deadline, "the point to stop the job was not reached"
        time.sleep(0.05)


def _kill_group(proc: subprocess.Popen) -> None:
    """Whatever of the job's embedded cluster outlives the driver."""
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL the driver once ready() holds, then whatever of its embedded cluster is left."""
    _wait_for(proc, ready, timeout)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _kill_group(proc)


def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 300) -> int:
    """SIGINT the job's process group once ready() holds (a terminal's Ctrl-C); its exit code."""
    _wait_for(proc, ready, timeout)
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=120)
    _kill_group(proc)
    return code


def test_sigkill_at_several_points_then_rerun_exactly_once(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    n = 12
    for i in range(n):
        (folder / f"scene{i:02d}.png").write_bytes(_png(make_scene(seed=100 + i, size=(96, 128)).image))
    (folder / "copy.png").write_bytes((folder / "scene00.png").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "ds"
    args = ["--input", str(folder), "--output", str(out), *AMG_FLAGS, "--chunk-images", "1"]
    images = out / "annotations"

    # 1. Early: the run has created its tables and is reading; nothing committed yet.
    _kill_when(_start(args, tmp_path / "run1.log"), lambda: _commits(images) >= 1)
    # 2. Mid-run: a few chunks committed, the rest in flight.
    _kill_when(_start(args, tmp_path / "run2.log"), lambda: _commits(images) >= 4)
    committed = set(read_images(str(out), columns=["image_id"])["image_id"].to_pylist())
    assert 1 <= len(committed) < n

    # 3. A chunk's data files written, its commit never made: an orphan Parquet file in the
    # table holding rows for images that are not committed.
    pending = [p for p in sorted(folder.glob("scene*.png"))
               if hashlib.sha256(p.read_bytes()).hexdigest() not in committed]
    orphan_rows = [{"image_id": hashlib.sha256(p.read_bytes()).hexdigest(), "image_key": 7 + i,
                    "uri": str(p), "width": 128, "height": 96, "phash": None, "annotations": []}
                   for i, p in enumerate(pending[:2])]
    pq.write_table(to_table(orphan_rows), images / f"part-00000-{uuid.uuid4()}-c000.zstd.parquet")
    version_before = DeltaTable(str(images)).version()

    # 4. Ctrl-C (SIGINT to the job's process group, as a terminal sends it) once one more
    # chunk is committed: a one-line "interrupted ... resume" and exit code 130, no traceback.
    interrupted = _interrupt_when(_start(args, tmp_path / "run4.log"),
                                  lambda: DeltaTable(str(images)).version() > version_before)
    log = (tmp_path / "run4.log").read_text()
    assert interrupted == 130 and "run the same command again to resume" in log, log[-3000:]
    assert "Traceback" not in log

    # 5. The same command again, to the end.
    done = subprocess.run([sys.executable, "jobs/auto_annotate.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert DeltaTable(str(images)).version() > version_before

    rows = read_images(str(out), columns=["image_id", "image_key", "uri"]).to_pylist()
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)) == n  # 0 lost, 0 duplicated
    assert committed <= set(ids)
    assert not {r["image_key"] for r in rows} & {r["image_key"] for r in orphan_rows}  # orphans never read
    dups = read_table(str(out), "duplicates")["uri"].to_pylist()
    bad = read_table(str(out), "quarantine")["uri"].to_pylist()
    names = sorted(Path(u).name for u in [r["uri"] for r in rows] + dups + bad)
    assert names == sorted(p.name for p in folder.iterdir())  # each input in exactly one table, once
