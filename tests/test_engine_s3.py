"""The annotation service on an S3-compatible store named by --endpoint-url alone (as the
other jobs take it): with AWS_ENDPOINT_URL unset, the job lists and reads s3:// images and
commits to an s3:// dataset on a moto server, and the catalog, pre-fill and committed check
read an s3:// dataset through the service's endpoint_url setting."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from engine.annotator import EngineClient
from training.synthetic import make_scene

ROOT = Path(__file__).resolve().parents[1]


def wait_for_page(proc: subprocess.Popen, stdout: Path, stderr: Path, timeout_s: float = 540) -> str:
    """The URL the job prints once its Serve app is up."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for line in stdout.read_text().splitlines():
            if line.startswith("annotation page: "):
                return line.split()[2].rstrip("/")
        assert proc.poll() is None, f"the service exited ({proc.returncode}): {stderr.read_text()[-3000:]}"
        time.sleep(1)
    raise AssertionError(f"no annotation page after {timeout_s} s: {stderr.read_text()[-3000:]}")


def test_service_reads_and_writes_s3_through_endpoint_url(tmp_path):
    import boto3

    from dataset import read_images, storage_options
    from engine.images import ImageCatalog, committed
    from engine.semi_auto import dataset_prefill
    from engine.service import free_port
    from schemas.interactive import EngineConfig
    from tests.s3server import moto_server

    scene = make_scene(31, (160, 224))
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    data = (tmp_path / "scene.png").read_bytes()
    with moto_server("data") as endpoint:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").put_object(
            Bucket="data", Key="images/scene.png", Body=data)
        saved = os.environ.pop("AWS_ENDPOINT_URL")  # the Ray workers the job starts inherit this environment
        out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        try:
            with out.open("w") as stdout, err.open("w") as stderr:
                proc = subprocess.Popen(
                    [sys.executable, "jobs/annotate_service.py", "--images", "s3://data/images", "--output",
                     "s3://data/manual", "--endpoint-url", endpoint, "--run-id", "s3-manual", "--device", "cpu",
                     "--port", str(free_port()), "--address", "local"], cwd=ROOT, stdout=stdout, stderr=stderr)
            try:
                client = EngineClient(wait_for_page(proc, out, err))
                assert [e["uri"] for e in client.images()["images"]] == ["s3://data/images/scene.png"]
                opened = client.open(0)
                assert opened["image_id"] == hashlib.sha256(data).hexdigest() and not opened["committed"]
                ys, xs = scene.masks[0].nonzero()
                mask = client.predict(index=0, image_id=opened["image_id"], points=[[float(xs.mean()),
                                      float(ys.mean())]], labels=[1])
                accepted = {"segmentation": mask["segmentation"], "predicted_iou": mask["score"]}
                assert client.commit(0, opened["image_id"], [accepted])["masks"] == 1
                assert client.open(0)["committed"]  # the replica reads the s3:// output back
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)

            rows = read_images("s3://data/manual", options=storage_options("s3://data/manual", endpoint)).to_pylist()
            assert [(r["uri"], r["image_id"]) for r in rows] == [("s3://data/images/scene.png", opened["image_id"])]
            assert [a["segmentation"]["counts"] for a in rows[0]["annotations"]] == [mask["segmentation"]["counts"]]

            # The service's dataset reads (images_from, its pre-fill, the committed check) take it too.
            config = EngineConfig(images_from="s3://data/manual", output="s3://data/semi", stage="semi_auto",
                                  prefill="dataset", endpoint_url=endpoint)
            catalog = ImageCatalog.of(config)
            assert catalog.uris == ["s3://data/images/scene.png"] and catalog.load(0).image_id == opened["image_id"]
            prefill = dataset_prefill("s3://data/manual", min_iou=0.0, endpoint_url=endpoint)
            assert list(prefill) == [opened["image_id"]] and len(prefill[opened["image_id"]]) == 1
            assert committed("s3://data/manual", opened["image_id"], endpoint)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved
