"""Joining a Ray cluster, or starting the embedded one a laptop run uses.

A job submitted with `ray job submit` (RAY_ADDRESS is set), given --address, or run on a
machine where `ray start` left a cluster joins that cluster. Otherwise it starts an
embedded local Ray with its dashboard (and job API) on 127.0.0.1 only and Ray's token
authentication on (the default in Ray 2.60), so every RPC and HTTP call needs the token.
Ray resolves a loopback node address to the machine's own IP, so its internal ports listen
on that address: the token, not the address, is what keeps them closed.
"""
from __future__ import annotations

import os


def connect(address: str | None = None) -> str:
    """Connect (or start the embedded cluster); returns "joined" or "embedded"."""
    import ray
    from ray._private.utils import read_ray_address  # what ray.init() itself consults

    if ray.is_initialized():
        return "joined"
    if address or os.environ.get("RAY_ADDRESS") or read_ray_address():
        ray.init(address=address, log_to_driver=False)
        return "joined"
    ray.init(address="local", dashboard_host="127.0.0.1", log_to_driver=False)
    return "embedded"


def check_device(device: str, mode: str) -> None:
    """InputError when a CUDA device is asked of the embedded local Ray (mode, from connect)
    and this machine has no GPU for it: its GPU workers would wait forever. A joined
    cluster may still gain GPU nodes (an autoscaler), so there graph.run only warns."""
    import ray

    from .sources import InputError

    if device.startswith("cuda") and mode == "embedded" and not ray.cluster_resources().get("GPU", 0):
        raise InputError(f"--device {device}: this machine has no GPU that Ray can use; "
                         "use --device cpu, or auto to take a GPU when there is one")
