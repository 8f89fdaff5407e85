"""The embedded cluster of a laptop run: dashboard on 127.0.0.1 only, token auth on, and
a CUDA device asked of it without a GPU refused instead of waiting forever."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, urllib.request, urllib.error, ray
from pipeline.cluster import check_device, connect
from pipeline.sources import InputError
how = connect(None)
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
                  "gpus": ray.cluster_resources().get("GPU", 0), "refused": refused}))
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
    if got["gpus"] == 0:
        assert got["refused"].startswith("--device cuda:0: this machine has no GPU that Ray can use")
    else:
        assert got["refused"] is None
