"""Each stage runs where it is placed: on a ray.cluster_utils.Cluster with a (fake) GPU node
group and a CPU node group, tagged with the custom resources of ray-cluster.yaml."""
from __future__ import annotations

import ray
from ray.cluster_utils import Cluster

from jobs.auto_annotate import load_config
from pipeline.graph import run
from tests.test_pipeline import AMG_FLAGS, _png
from training.synthetic import make_scene

SETTINGS = """
device: cpu            # the GPU below is fake; placement is what is tested
fuse_stages: false
encoder: {num_cpus: 0.5, num_gpus: 0.5, resources: {gpu_group: 1}}
decoder: {num_cpus: 0.5, num_gpus: 0.5, resources: {gpu_group: 1}}
read_resources: {cpu_group: 1}
postprocess_resources: {cpu_group: 1}
"""


def test_stages_run_on_their_node_groups(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"s{i}.png").write_bytes(_png(make_scene(seed=400 + i, size=(96, 128)).image))
    (tmp_path / "settings.yaml").write_text(SETTINGS)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    gpu = cluster.add_node(num_cpus=2, num_gpus=1, resources={"gpu_group": 1000})
    cpu = cluster.add_node(num_cpus=2, resources={"cpu_group": 1000})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        summary = run(load_config(["--config", str(tmp_path / "settings.yaml"), "--input", str(src),
                                   "--output", str(tmp_path / "ds"), *AMG_FLAGS]), log=lambda *a: None)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert summary["annotated"] == 4 and not summary["fused_stages"]
    nodes = summary["stage_nodes"]
    assert nodes["encode"] == nodes["decode"] == [gpu.node_id]
    assert nodes["read"] == nodes["postprocess"] == [cpu.node_id]
