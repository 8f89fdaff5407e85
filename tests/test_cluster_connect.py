"""The embedded cluster of a laptop run: dashboard on 127.0.0.1 only, token auth on, and
a CUDA device asked of it without a GPU refused instead of waiting forever. A cluster
address that does not answer is refused in seconds, and a stale `ray start` address file
falls back to the embedded Ray."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.cluster import connect
from pipeline.sources import InputError

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, urllib.request, urllib.error, ray
from pipeline.cluster import check_device, connect, gcs_problem
from pipeline.sources import InputError
how = connect(None)
problem = gcs_problem(ray.get_runtime_context().gcs_address)  # what a joining run checks first
check_device("cpu", how)
check_device("cuda", "joined")  # a cluster may gain GPU nodes: no error there
try:
    check_device("cuda:0", how)
    refused = None
except InputError as e:
    refused = str(e)
ctx = ray.get_runtime_context()
nodes = [n["NodeManagerAddress"] for n in ray.nodes()]
url = "http://" + ray.worker.get_dashboard_url() if hasattr(ray.worker, "get_dashboard_url") else None
try:
    urllib.request.urlopen(url + "/api/version", timeout=10)
    status = 200
except urllib.error.HTTPError as e:
    status = e.code
print(json.dumps({"how": how, "gcs": ctx.gcs_address, "nodes": nodes, "dashboard": url, "status": status,
                  "gpus": ray.cluster_resources().get("GPU", 0), "refused": refused, "problem": problem}))
"""


def test_embedded_cluster_dashboard_is_loopback_only_with_token_auth():
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as tmp:  # short: Ray's socket paths
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(ROOT))
        r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["how"] == "embedded"
    assert len(got["nodes"]) == 1 and got["gcs"].split(":")[0] == got["nodes"][0]
    assert got["dashboard"].startswith("http://127.0.0.1:")
    assert got["status"] == 401  # the dashboard wants Ray's auth token
    assert got["problem"] is None  # a live GCS passes the check that joining runs make
    if got["gpus"] == 0:
        assert got["refused"].startswith("--device cuda:0: this machine has no GPU that Ray can use")
    else:
        assert got["refused"] is None


def closed_address() -> str:
    """host:port where nothing listens (a port just freed)."""
    from tests.s3server import free_port

    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize("job, args, named_by", [
    ("auto_annotate.py", [], "RAY_ADDRESS"),
    ("data_engine.py", ["--synthetic-inputs", "2", "--rounds", "1"], "--address"),
    ("train.py", ["--steps", "1"], "RAY_ADDRESS"),
])
def test_a_cluster_address_that_does_not_answer_fails_in_seconds(tmp_path, job, args, named_by):
    """Ray alone retries a dead GCS for a quarter of an hour before a traceback; the jobs
    check the address first and exit 2 with one line naming it and what to do."""
    address = closed_address()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    argv = [sys.executable, str(ROOT / "jobs" / job), *args]
    if named_by == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = address
        argv += ["--output", str(tmp_path / "out.pt" if job == "train.py" else tmp_path / "out")]
    else:
        argv += ["--address", address, "--root", str(tmp_path / "out")]
    start = time.monotonic()
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    elapsed = time.monotonic() - start
    assert r.returncode == 2, r.stderr[-3000:]
    assert elapsed < 60, elapsed
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert errors[0].startswith(f"error: {named_by}={address}: nothing answers at ")
    assert "Connection refused" in errors[0] and "ray start --head" in errors[0]
    fix = "unset RAY_ADDRESS" if named_by == "RAY_ADDRESS" else "leave --address out"
    assert fix in errors[0]


@pytest.fixture
def fake_ray_init(monkeypatch, tmp_path):
    """connect() with ray.init recorded instead of run, RAY_ADDRESS unset and Ray's temp dir
    (where `ray start` leaves ray_current_cluster) under tmp_path."""
    import ray

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append(kw))
    return calls


def test_a_stale_cluster_file_starts_the_embedded_ray(fake_ray_init, tmp_path, capsys):
    """A `ray start` cluster that died without `ray stop` leaves its address file: a run
    given no address notes it and starts the embedded Ray instead of retrying it."""
    address = closed_address()
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(address)
    assert connect(None) == "embedded"
    assert [c.get("address") for c in fake_ray_init] == ["local"]
    assert fake_ray_init[0]["dashboard_host"] == "127.0.0.1"
    note = capsys.readouterr().err.strip()
    assert note.startswith(f"note: {tmp_path / 'ray' / 'ray_current_cluster'} names {address}, but nothing answers")
    assert len(note.splitlines()) == 1


def test_an_explicit_address_is_checked_and_never_replaced(fake_ray_init, monkeypatch):
    """--address or RAY_ADDRESS that does not answer (or is no Ray address) is an error, not
    an embedded Ray in its place; "local" is the embedded one."""
    for given in (closed_address(), "http://127.0.0.1:8265", "head:port"):
        with pytest.raises(InputError, match=f"^--address={re.escape(given)}: "):
            connect(given)
    monkeypatch.setenv("RAY_ADDRESS", closed_address())
    with pytest.raises(InputError, match="^RAY_ADDRESS=.* unset RAY_ADDRESS to run on an embedded local Ray$"):
        connect(None)
    assert connect("local") == "embedded"
    assert [c.get("address") for c in fake_ray_init] == ["local"]

