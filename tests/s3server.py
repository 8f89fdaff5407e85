"""A real S3 protocol server for tests: moto_server in its own process on 127.0.0.1 (a moto
thread beside Ray Data and delta-rs in one process can stall), with the standard AWS
environment pointing at it while it runs."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

MOTO = Path(sys.executable).parent / "moto_server"
# A secret no output should ever contain (tests look for it in what runs write).
SECRET = "s3cr3t-samengine-never-written"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(*buckets: str):
    """Yields the endpoint URL of a fresh server holding the named (empty) buckets."""
    if not MOTO.exists():
        pytest.skip("moto_server not installed")
    boto3 = pytest.importorskip("boto3")
    server, endpoint = _start(boto3)
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start(boto3, attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """A moto_server process answering S3 requests, and its endpoint. The free port may be
    taken by another process before the server binds it (busy machines): the server then
    exits, or another listener answers; either way a new port is tried."""
    from botocore.config import Config

    for _ in range(attempts):
        port = free_port()
        server = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing",
                              config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 0}))
        deadline = time.time() + 30
        while server.poll() is None and time.time() < deadline:
            try:
                client.list_buckets()  # an S3 answer, not merely an open port
                if server.poll() is None:
                    return server, endpoint
            except Exception:
                time.sleep(0.2)
        server.terminate()
        server.wait(timeout=10)
    raise RuntimeError("moto_server did not start")
