"""How many model actors a run may start, and the memory each reserves.

A pool's `max` of "auto" (the default) becomes the number of its actors the cluster's live
nodes hold at the run's start: on each node that carries the pool's custom resources, as
many as its CPUs, GPUs and memory fit (an actor asks for `num_cpus`, `num_gpus` and its
memory), summed over the nodes. On CPU one CPU of the cluster is left to the reading,
post-processing and writing tasks, which run on any node.

Each actor reserves its memory with Ray (`memory_gb`, default: model.footprint's estimate
for the checkpoint's model and the actor's role), so that no node is given more model
actors than it holds. An estimate is cut to the largest eligible node's share (its memory
over the number of model pools), so that one actor of each pool can always start.

An autoscaling cluster grows only when work asks for more than it has: give such a pool an
explicit MAX (`--encoder-actors 1,32`) for the autoscaler to grow into.
"""
from __future__ import annotations

import math
from typing import Iterable

from model.config import SamConfig
from model.footprint import GIB, Role, worker_bytes
from schemas.annotate import ActorPool, AnnotateConfig


def pool_roles(config: AnnotateConfig, device: str) -> dict[str, Role]:
    """The config's model pools this run starts, by field name, with the role of their actors."""
    return {"encoder": "fused"} if config.fused(device) else {"encoder": "encoder", "decoder": "decoder"}


def size_pools(config: AnnotateConfig, device: str, nodes: Iterable[dict], model: SamConfig) -> AnnotateConfig:
    """config with its model pools' "auto" max and unset memory_gb resolved for this cluster.
    nodes: ray.nodes() (dead ones are skipped); model: the checkpoint's config."""
    nodes = _live(nodes)
    points = len(config.text) if config.text else _points(config)
    update = {}
    roles = pool_roles(config, device)
    for name, role in roles.items():
        pool: ActorPool = getattr(config, name)
        memory = pool.memory_gb
        if memory is None:
            estimate = worker_bytes(model, role, points, config.amg.points_per_batch)
            # at most the largest node's share: one actor of each pool fits on it together
            hosts = _ask(pool, device, memory=False)
            biggest = max((n.get("memory", 0.0) for n in nodes if _fits(n, hosts)), default=0.0)
            memory = round(min(estimate, biggest / len(roles) or estimate) / GIB, 2)
        pool = pool.model_copy(update={"memory_gb": memory})
        if pool.max == "auto":
            fits = capacity(pool, nodes, device)
            pool = pool.model_copy(update={"max": max(pool.min, fits)})
        update[name] = pool
    return config.model_copy(update=update)


def capacity(pool: ActorPool, nodes: list[dict], device: str) -> int:
    """How many of the pool's actors the nodes hold together (memory_gb resolved)."""
    # an actor that asks for nothing: Ray would start any number; one per CPU is the sensible most
    ask = _ask(pool, device) or {"CPU": 1.0}
    fits = sum(_fits(n, ask) for n in nodes)
    if device != "cuda" and ask.get("CPU"):
        spare = sum(n.get("CPU", 0.0) for n in nodes) - 1.0  # reads and writes run anywhere
        fits = min(fits, math.floor(spare / ask["CPU"] + 1e-9))
    return max(fits, 0)


def gpus_per_actor(pool: ActorPool, device: str) -> float:
    """A model actor's GPUs: its num_gpus, else 1 on CUDA and none on CPU."""
    return pool.num_gpus if pool.num_gpus is not None else (1.0 if device == "cuda" else 0.0)


def describe(config: AnnotateConfig, device: str) -> str:
    """The run log's line on the model pools (resolved by size_pools)."""
    parts = []
    for name, role in pool_roles(config, device).items():
        p: ActorPool = getattr(config, name)
        size = f"{p.min}" if p.min == p.max else f"{p.min} to {p.max}"
        parts.append(f"{size} {role} actor{'s' if p.max > 1 else ''} ({describe_actor(p, device)} each)")
    return "model actors: " + "; ".join(parts)


def describe_actor(pool: ActorPool, device: str) -> str:
    """What one of the pool's actors asks of its node."""
    each = [f"{pool.num_cpus:g} CPU"] + ([f"{gpus_per_actor(pool, device):g} GPU"] if device == "cuda" else [])
    each.append(f"{pool.memory_gb:g} GiB" if pool.memory_gb else "no memory reserved")
    each += [f"{v:g} {k}" for k, v in pool.resources.items()]
    return ", ".join(each)


def unplaceable(config: AnnotateConfig, device: str, nodes: Iterable[dict]) -> list[str]:
    """Warnings for the run log: model pools (sized) whose actor no live node holds, which
    wait until such a node joins (an autoscaling cluster adds one; a fixed one never does)."""
    nodes = _live(nodes)
    out = []
    for name, role in pool_roles(config, device).items():
        pool: ActorPool = getattr(config, name)
        if not any(_fits(n, _ask(pool, device)) for n in nodes):
            out.append(f"warning: no live node holds a {role} actor ({describe_actor(pool, device)}): "
                       "the run waits until such a node joins")
    return out


def _points(config: AnnotateConfig) -> int:
    amg = config.amg
    if amg.points_per_side is not None:
        return amg.points_per_side ** 2
    return max(len(g) for g in amg.point_grids)


def scaling_hint(config: AnnotateConfig, device: str, cluster: dict[str, float]) -> str | None:
    """A line for the run log when the model stages' pools, at the largest the user gave,
    leave at least half of the cluster's CPUs (GPUs on CUDA) idle ("auto" sizes a pool to the
    cluster: no line). One CPU is counted as the reading, post-processing and writing tasks'."""
    pools = [getattr(config, name) for name in pool_roles(config, device)]
    if any(p.max == "auto" for p in pools):
        return None
    if device == "cuda":
        kind, have = "GPUs", cluster.get("GPU", 0.0)
        used = sum(p.max * gpus_per_actor(p, device) for p in pools)
    else:
        kind, have = "CPUs", cluster.get("CPU", 0.0) - 1
        used = sum(p.max * p.num_cpus for p in pools)
    if not used or have < 2 * used:
        return None
    where = f"the cluster's {have:g} {kind}" + (" left after reading and writing" if kind == "CPUs" else "")
    if len(pools) == 1:
        n = int(have // (used / pools[0].max))
        return (f"note: the model stage uses at most {used:g} of {where}: --encoder-actors 1,{n} runs up to "
                f"{n} actors (each holds its own copy of the model)")
    return (f"note: the model stages use at most {used:g} of {where}: --encoder-actors MIN,MAX and "
            f"--decoder-actors MIN,MAX scale them out (each actor holds its own copy of the model)")


def _live(nodes: Iterable[dict]) -> list[dict]:
    """The resources of ray.nodes()' live nodes."""
    return [n["Resources"] for n in nodes if n.get("Alive", True)]


def _ask(pool: ActorPool, device: str, memory: bool = True) -> dict[str, float]:
    """What one of the pool's actors asks of its node (memory_gb resolved), nonzero amounts."""
    ask = {"CPU": pool.num_cpus, "GPU": gpus_per_actor(pool, device),
           "memory": (pool.memory_gb or 0.0) * GIB if memory else 0.0, **pool.resources}
    return {k: v for k, v in ask.items() if v > 0}


def _fits(node: dict, ask: dict[str, float]) -> int:
    """How many actors asking `ask` the node holds (one where they ask for nothing)."""
    return min((math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in ask.items()), default=1)
