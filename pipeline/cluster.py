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
