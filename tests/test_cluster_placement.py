"""Multi-node placement: on a local Ray cluster whose nodes advertise the resources of the
node groups in ray-cluster.yaml (a fake GPU included), actors that request a GPU or a
group's custom resource land on that group's node, and nowhere else."""
from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

CONFIG = Path(__file__).resolve().parents[1] / "ray-cluster.yaml"


@ray.remote(num_cpus=0)
class Where:
    """Reports the node it runs on and the GPUs Ray assigned to it."""

    def node(self) -> tuple[str, list]:
        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), [str(g) for g in ray.get_gpu_ids()]


def group_resources(name: str) -> tuple[dict, int]:
    """Custom resources (and GPU count) of a node type in ray-cluster.yaml; CPU counts are
    kept small here so the test does not start one worker process per advertised core."""
    res = dict(yaml.safe_load(CONFIG.read_text())["available_node_types"][name]["resources"])
    res.pop("CPU", None)
    return {k: float(v) for k, v in res.items() if k != "GPU"}, int(res.get("GPU", 0))


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = {"head": c.head_node}
    for name in ("gpu_worker", "cpu_worker"):
        custom, gpus = group_resources(name)
        nodes[name] = c.add_node(num_cpus=1, num_gpus=gpus, resources=custom)
    c.wait_for_nodes()
    ray.init(address=c.address)
    try:
        yield {name: node.node_id for name, node in nodes.items()}
    finally:
        ray.shutdown()
        c.shutdown()


def place(**options) -> tuple[str, list]:
    actor = Where.options(**options).remote()
    try:
        return ray.get(actor.node.remote(), timeout=60)
    finally:
        ray.kill(actor)


def test_nodes_advertise_the_group_resources(cluster):
    by_node = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert by_node[cluster["gpu_worker"]]["GPU"] == 1
    assert by_node[cluster["gpu_worker"]]["gpu_group"] == 1000
    assert "GPU" not in by_node[cluster["cpu_worker"]]
    assert by_node[cluster["cpu_worker"]]["cpu_group"] == 1000
    assert by_node[cluster["head"]].get("CPU", 0) == 0


def test_gpu_actor_lands_on_the_gpu_group(cluster):
    node, gpus = place(num_gpus=1, resources={"gpu_group": 1})
    assert node == cluster["gpu_worker"]
    assert gpus == ["0"]
    node, gpus = place(num_gpus=1)  # a GPU alone is enough to pick the node
    assert node == cluster["gpu_worker"] and gpus == ["0"]


def test_cpu_group_actors_land_on_the_cpu_group(cluster):
    for _ in range(3):
        node, gpus = place(num_cpus=1, resources={"cpu_group": 1})
        assert node == cluster["cpu_worker"] and gpus == []


def test_group_tag_is_not_a_capacity_limit_but_gpus_are(cluster):
    # Many actors fit on the group's node by the tag (1000 units)...
    many = [Where.options(resources={"gpu_group": 1}).remote() for _ in range(4)]
    try:
        nodes = ray.get([a.node.remote() for a in many], timeout=60)
        assert {n for n, _ in nodes} == {cluster["gpu_worker"]}
    finally:
        for a in many:
            ray.kill(a)
    # ...but a second whole-GPU actor waits for a GPU node (the autoscaler would add one).
    # (The second is created only once the first holds the GPU: Ray does not place two
    # pending actors in the order they were created, so either could have taken it.)
    first = Where.options(num_gpus=1, resources={"gpu_group": 1}).remote()
    second = None
    try:
        assert ray.get(first.node.remote(), timeout=60)[0] == cluster["gpu_worker"]
        second = Where.options(num_gpus=1, resources={"gpu_group": 1}).remote()
        ready, _ = ray.wait([second.node.remote()], timeout=3)
        assert ready == []
        ray.kill(first)
        assert ray.get(second.node.remote(), timeout=60)[0] == cluster["gpu_worker"]
    finally:
        for actor in (first, second):
            if actor is not None:
                ray.kill(actor)
