"""The job as users submit it: a `ray start --head` cluster on 127.0.0.1 with token auth,
and `ray job submit --working-dir . -- python jobs/auto_annotate.py ...`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dataset import read_images, read_table
from tests.s3server import free_port
from tests.test_pipeline import AMG_FLAGS, make_inputs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def head_node(tmp_path):
    """A one-node cluster of its own (own ports and temp dir, so that it neither finds nor
    disturbs any other Ray on the machine), stopped by killing its process group."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    head, address = _start_head(env, tmp_path)
    try:
        yield address, env
    finally:
        _stop(head)


def _start_head(env: dict, tmp_path: Path, attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` and its dashboard address once it answers. Every port is
    picked free (Ray's fixed defaults, such as the dashboard agent's 52365 and the client
    server's 10001, may belong to another Ray on the machine), but a free port can be taken
    before the head binds it: a head that exits or does not answer is stopped and started
    again on new ports. Its output goes to a log quoted in the error if every attempt fails."""
    log = tmp_path / "ray-head.log"
    for _ in range(attempts):
        ports = {flag: free_port() for flag in (
            "--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
            "--ray-client-server-port", "--metrics-export-port", "--runtime-env-agent-port",
            "--node-manager-port", "--object-manager-port")}
        args = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
                "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
                "--temp-dir", f"/tmp/rj{ports['--port']}", "--disable-usage-stats"]
        for flag, port in ports.items():
            args += [flag, str(port)]
        with open(log, "ab") as out:
            head = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        address = f"http://127.0.0.1:{ports['--dashboard-port']}"
        if _answers(address, head, deadline=time.time() + 120):
            return head, address
        _stop(head)
    raise RuntimeError(f"ray head did not start in {attempts} attempts; its output:\n{log.read_text()[-4000:]}")


def _answers(address: str, head: subprocess.Popen, deadline: float) -> bool:
    while head.poll() is None and time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return True
        except OSError as e:
            if "401" in str(e) or "403" in str(e):  # up, and asking for the token
                return True
            time.sleep(1)
    return False


def _stop(head: subprocess.Popen) -> None:
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def test_ray_job_submit_of_auto_annotate(head_node, tmp_path):
    address, env = head_node
    expected = make_inputs(tmp_path / "in")
    out = tmp_path / "dataset"
    for attempt in range(6):
        r = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
             "python", "jobs/auto_annotate.py", "--input", str(tmp_path / "in"), "--output", str(out), *AMG_FLAGS],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=420)
        # The dashboard answers before the head's job agent has registered (seconds on a
        # loaded machine): the submission is refused, nothing runs; submit again.
        if "No available agent" not in r.stdout + r.stderr:
            break
        time.sleep(10)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout
    images = read_images(str(out), columns=["uri", "annotations"]).to_pylist()
    quarantined = read_table(str(out), "quarantine").num_rows
    duplicates = read_table(str(out), "duplicates").num_rows
    assert (len(images), duplicates, quarantined) == (5, 2, 3) and len(expected) == 10
    assert sum(len(i["annotations"]) for i in images) > 0
