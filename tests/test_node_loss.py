"""Losing a worker node mid-run: Ray restarts the node's actors and retries its tasks on a
replacement node, and every input still ends up in the dataset exactly once."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import ray
from deltalake import DeltaTable
from ray.cluster_utils import Cluster

from dataset import read_images
from jobs.auto_annotate import load_config
from pipeline.graph import run
from tests.test_pipeline import AMG_FLAGS, _png
from training.synthetic import make_scene

WORKER = {"num_cpus": 2, "resources": {"annotator_node": 4}}


def test_worker_node_killed_mid_run(tmp_path):
    src, out = tmp_path / "in", tmp_path / "ds"
    src.mkdir()
    n = 10
    for i in range(n):
        (src / f"s{i}.png").write_bytes(_png(make_scene(seed=300 + i, size=(96, 128)).image))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(**WORKER)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        config = load_config(["--input", str(src), "--output", str(out), *AMG_FLAGS, "--chunk-images", "1",
                              "--config", str(_settings(tmp_path))])
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(run(config, log=lambda *a: None)))
        thread.start()
        log = out / "annotations" / "_delta_log"
        deadline = time.time() + 300
        while len(list(log.glob("*.json"))) < 3:  # table created + 2 chunks committed
            assert thread.is_alive() and time.time() < deadline, "no progress before the kill"
            time.sleep(0.1)
        cluster.remove_node(worker)  # the annotator actors' node dies mid-run
        cluster.add_node(**WORKER)
        thread.join(timeout=600)
        assert not thread.is_alive()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert result["processed"] == result["annotated"] == n
    ids = read_images(str(out), columns=["image_id"])["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == n
    assert DeltaTable(str(out / "annotations")).version() >= 3


def _settings(tmp_path: Path) -> Path:
    """Annotator actors only on worker nodes (a custom resource), as on a real cluster."""
    f = tmp_path / "settings.yaml"
    f.write_text("encoder: {num_cpus: 1, resources: {annotator_node: 1}}\n")
    return f
