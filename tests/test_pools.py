"""Sizing the model actor pools to the cluster (pipeline.pools) and the memory estimate each
actor reserves (model.footprint)."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from segment_anything import sam_model_registry

from jobs.auto_annotate import load_config
from model.config import CONFIGS
from model.footprint import GIB, parameter_bytes, worker_bytes
from pipeline.pools import capacity, describe, size_pools, unplaceable

TINY, VIT_B, VIT_H = CONFIGS["vit_tiny256"], CONFIGS["vit_b"], CONFIGS["vit_h"]


def node(cpus=0.0, gpus=0.0, memory_gb=0.0, alive=True, **custom) -> dict:
    res = {"CPU": cpus, "memory": memory_gb * GIB, **custom}
    if gpus:
        res["GPU"] = gpus
    return {"Alive": alive, "Resources": res}


def test_the_estimate_follows_the_model_and_its_role():
    fused = [worker_bytes(c) for c in (TINY, VIT_B, VIT_H)]
    assert fused == sorted(fused) and len(set(fused)) == 3
    # measured peaks (one 768 x 1024 photo, thresholds 0 / 0, 32 x 32 points): the estimate
    # lies at or above them, and within 1.5x
    assert 1.06 * GIB <= worker_bytes(TINY) <= 1.5 * 1.06 * GIB
    assert 5.75 * GIB <= worker_bytes(VIT_H, "encoder") <= 1.5 * 5.75 * GIB
    # a decoder worker drops the image encoder: ViT-H's decoder needs what ViT-B's does
    assert worker_bytes(VIT_H, "decoder") == worker_bytes(VIT_B, "decoder") < worker_bytes(VIT_H, "encoder")
    with torch.device("meta"):  # the official ViT-H's parameters, counted without memory
        official = sam_model_registry["vit_h"]()
    assert parameter_bytes(VIT_H) == 4 * sum(p.numel() for p in official.parameters())
    # more prompts kept per crop, and more decoded together, need more
    assert worker_bytes(VIT_B, "decoder", points=64 * 64) > worker_bytes(VIT_B, "decoder")
    assert worker_bytes(VIT_B, "decoder", points_per_batch=256) > worker_bytes(VIT_B, "decoder")


def test_auto_counts_what_each_node_holds():
    config = load_config([])  # fused on CPU, 1 CPU per actor, max auto
    laptop = [node(cpus=2, memory_gb=16)]
    assert size_pools(config, "cpu", laptop, TINY).encoder.max == 1  # one CPU is left to I/O
    big = [node(cpus=16, memory_gb=40)]
    sized = size_pools(config, "cpu", big, TINY)
    assert sized.encoder.max == 15 and sized.encoder.min == 1
    assert sized.encoder.memory_gb == round(worker_bytes(TINY) / GIB, 2)
    # ViT-H workers: memory binds before CPUs do
    vit_h = size_pools(config, "cpu", big, VIT_H).encoder
    assert vit_h.max == int(40 // vit_h.memory_gb) < 15
    # per node, not pooled: two nodes of 3 GiB hold no 4 GiB actor between them
    small = [node(cpus=8, memory_gb=3), node(cpus=8, memory_gb=3)]
    assert capacity(config.encoder.model_copy(update={"memory_gb": 4.0}), small, "cpu") == 0
    # dead nodes do not count
    assert size_pools(config, "cpu", [node(cpus=16, memory_gb=40, alive=False)] + laptop, TINY).encoder.max == 1


def test_a_gpu_cluster_runs_one_model_actor_per_gpu():
    config = load_config([])  # split stages on CUDA, 1 GPU per actor
    cluster = [node(cpus=4, memory_gb=8)] + [node(cpus=48, gpus=8, memory_gb=400)] * 2
    sized = size_pools(config, "cuda", cluster, VIT_H)
    assert (sized.encoder.max, sized.decoder.max) == (16, 16)
    line = describe(sized, "cuda")
    assert line.startswith("model actors: 1 to 16 encoder actors (1 CPU, 1 GPU, ")
    assert "; 1 to 16 decoder actors (1 CPU, 1 GPU, " in line
    half = size_pools(load_config(["--gpus-per-actor", "0.5"]), "cuda", cluster, VIT_H)
    assert half.encoder.max == 32
    # no GPU node yet (an autoscaling cluster before its first GPU node): the pool's min
    assert size_pools(config, "cuda", cluster[:1], VIT_H).encoder.max == 1


def test_custom_resources_pick_the_nodes_that_count():
    config = load_config([])
    config = config.model_copy(update={"encoder": config.encoder.model_copy(update={"resources": {"cpu_group": 1}})})
    cluster = [node(cpus=64, memory_gb=200), node(cpus=8, memory_gb=30, cpu_group=1000)]
    assert size_pools(config, "cpu", cluster, TINY).encoder.max == 8  # the tagged node's; I/O runs on the other
    assert size_pools(config, "cpu", cluster[1:], TINY).encoder.max == 7  # one node: one CPU left to I/O


def test_pools_no_node_can_hold_are_named_in_the_run_log():
    big = load_config(["--actor-memory-gb", "64"])
    cluster = [node(cpus=16, memory_gb=40)]
    assert unplaceable(size_pools(big, "cpu", cluster, TINY), "cpu", cluster) == [
        "warning: no live node holds a fused actor (1 CPU, 64 GiB): the run waits until such a node joins"]
    tagged = load_config([])
    tagged = tagged.model_copy(update={"encoder": tagged.encoder.model_copy(update={"resources": {"gpu_group": 1}})})
    split = size_pools(tagged.model_copy(update={"fuse_stages": False}), "cuda", cluster, TINY)
    warnings = unplaceable(split, "cuda", cluster)  # no GPU at all: neither pool's actor fits
    assert len(warnings) == 2 and "encoder actor (1 CPU, 1 GPU, 0.86 GiB, 1 gpu_group)" in warnings[0]
    assert unplaceable(size_pools(load_config([]), "cpu", cluster, TINY), "cpu", cluster) == []
    assert unplaceable(size_pools(load_config([]), "cpu", [node(cpus=1, memory_gb=4)], TINY), "cpu",
                       [node(cpus=1, memory_gb=4)]) == []  # one CPU: the actor fits (I/O shares it)


def test_given_bounds_and_memory_are_kept():
    config = load_config(["--encoder-actors", "2,3", "--actor-memory-gb", "0"])
    sized = size_pools(config, "cpu", [node(cpus=64, memory_gb=200)], VIT_H).encoder
    assert (sized.min, sized.max, sized.memory_gb) == (2, 3, 0.0)
    assert "no memory reserved" in describe(size_pools(config, "cpu", [node(cpus=64)], VIT_H), "cpu")
    # a min above what the cluster holds stays the min: Ray starts what fits and waits
    assert size_pools(load_config(["--encoder-actors", "4,auto"]), "cpu", [node(cpus=2, memory_gb=16)],
                      TINY).encoder.max == 4
    # an estimate larger than every node that could host the actor is cut to the largest of
    # them: the pool can start (the CPU-only node's memory does not count for a GPU actor)
    gpu = size_pools(load_config([]), "cuda", [node(cpus=8, gpus=1, memory_gb=3), node(cpus=64, memory_gb=500)],
                     VIT_H)
    assert gpu.encoder.memory_gb == gpu.decoder.memory_gb == 1.5 and gpu.encoder.max == 1  # 2 pools share 3 GiB
    # a laptop of 8 GiB (Ray offers ~5) with ViT-H in split stages: both actors start beside each other
    split = size_pools(load_config(["--split-stages"]), "cpu", [node(cpus=4, memory_gb=5)], VIT_H)
    assert split.encoder.memory_gb + split.decoder.memory_gb <= 5
    sized = size_pools(load_config([]), "cpu", [node(cpus=4, memory_gb=2)], VIT_H).encoder
    assert sized.memory_gb == 2.0 and sized.max == 1


@pytest.mark.parametrize("text, bounds", [("auto", (1, "auto")), ("2,auto", (2, "auto")), ("3", (3, 3)),
                                          ("1,4", (1, 4))])
def test_actor_bounds_on_the_command_line(text, bounds):
    pool = load_config(["--encoder-actors", text]).encoder
    assert (pool.min, pool.max) == bounds


@pytest.mark.parametrize("argv", [["--encoder-actors", "auto,3"], ["--decoder-actors", "x"]])
def test_bad_actor_bounds_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        load_config(argv)
    assert "expected N, MIN,MAX, auto or MIN,auto" in capsys.readouterr().err


def test_negative_memory_names_its_field():
    with pytest.raises(ValidationError) as e:
        load_config(["--actor-memory-gb", "-1"])
    assert "encoder.memory_gb" in str(e.value)


def test_the_footprint_benchmark_measures_a_worker_beside_its_estimate(capsys):
    from benchmarks.footprint import main

    assert main(["--models", "bundled", "--size", "256x192", "--points-per-side", "4"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()[-2:]
    assert header.split() == ["model", "masks", "measured", "GiB", "estimate", "GiB", "ratio"]
    name, masks, measured, estimate, ratio = row.split()
    assert name == "bundled" and int(masks) >= 1
    assert 0.5 < float(measured) < 4  # a process with torch and the bundled model
    assert float(estimate) == round(worker_bytes(TINY, points=16) / GIB, 2)
    assert float(ratio) == pytest.approx(float(estimate) / float(measured), abs=0.02)


def test_a_node_with_less_memory_than_the_estimate_still_runs_the_model(tmp_path):
    """A real Ray node that offers 1 GiB of memory, less than the bundled model's estimate:
    the reservation is cut to what the node offers, so the run completes (an actor asking
    for more than any node has would wait forever)."""
    import threading

    import ray

    from pipeline.graph import run
    from tests.test_pipeline import AMG_FLAGS, _png
    from training.synthetic import make_scene

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        (src / f"s{i}.png").write_bytes(_png(make_scene(seed=40 + i, size=(96, 128)).image))
    assert worker_bytes(TINY) > GIB
    ray.init(address="local", num_cpus=2, _memory=GIB, include_dashboard=False, log_to_driver=False)
    log, result = [], {}
    try:
        config = load_config(["--input", str(src), "--output", str(tmp_path / "ds"), *AMG_FLAGS])
        thread = threading.Thread(target=lambda: result.update(run(config, log=log.append)), daemon=True)
        thread.start()
        thread.join(timeout=600)
        assert not thread.is_alive(), f"the run is still waiting: {log}"
    finally:
        ray.shutdown()
    assert result["annotated"] == 2 and result["masks"] > 0
    assert "model actors: 1 fused actor (1 CPU, 1 GiB each)" in log
    assert result["model_pools"]["encoder"]["memory_gb"] == 1.0
