"""Joining a Ray cluster, or starting the embedded one a laptop run uses.

A job submitted with `ray job submit` (RAY_ADDRESS is set), given --address, or run on a
machine where `ray start` left a cluster joins that cluster. Otherwise it starts an
embedded local Ray with its dashboard (and job API) on 127.0.0.1 only and Ray's token
authentication on (the default in Ray 2.60), so every RPC and HTTP call needs the token.
Ray resolves a loopback node address to the machine's own IP, so its internal ports listen
on that address: the token, not the address, is what keeps them closed.

Ray itself retries an address that does not answer for about a quarter of an hour before
a traceback, so the address is checked first: a cluster named by --address or RAY_ADDRESS
that does not answer is an InputError within seconds. The address file a `ray start` leaves
(<temp dir>/ray/ray_current_cluster) outlives a cluster that died without `ray stop`; when
no address was given and the cluster it names does not answer, the run says so and starts
the embedded Ray, as if there were no file.

`ray job submit --working-dir DIR` runs the entrypoint in a copy of DIR that Ray unpacks
under its session folder and deletes once no job needs it: a relative --input or --output
(or a default under the code's folder) would name that copy, not the user's folder, so the
jobs refuse them (refuse_job_copy_paths).
"""
from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from .sources import InputError

PROBE_TIMEOUT_S = 5.0  # how long a GCS port may take to answer a TCP connect (milliseconds when up)


def connect(address: str | None = None, *, log_to_driver: bool = False) -> str:
    """Connect (or start the embedded cluster); returns "joined" or "embedded". InputError
    when the cluster named by `address` or RAY_ADDRESS does not answer."""
    import ray
    from ray._private.utils import get_ray_address_file, read_ray_address  # what ray.init() consults

    if ray.is_initialized():
        return "joined"
    given = address or os.environ.get("RAY_ADDRESS")
    if given and given != "local":
        problem = gcs_problem(given)
        if problem:
            named_by, fix = (("--address", "leave --address out") if address else
                             ("RAY_ADDRESS", "unset RAY_ADDRESS"))
            raise InputError(f"{named_by}={given}: {problem}; start that cluster (ray start --head), name a "
                             f"running one, or {fix} to run on an embedded local Ray")
        ray.init(address=given, log_to_driver=log_to_driver)
        return "joined"
    recorded = None if given else read_ray_address()
    if recorded:
        problem = gcs_problem(recorded)
        if not problem:
            ray.init(log_to_driver=log_to_driver)
            return "joined"
        print(f"note: {get_ray_address_file(None)} names {recorded}, but {problem} (a cluster stopped without "
              "`ray stop`?); starting an embedded local Ray instead. Remove the file to drop this note.",
              file=sys.stderr, flush=True)
    ray.init(address="local", dashboard_host="127.0.0.1", log_to_driver=log_to_driver)
    return "embedded"


def gcs_problem(address: str) -> str | None:
    """Why no Ray cluster can be joined at `address` (a GCS host:port, "auto", or a
    ray://host:port client server), or None when it answers: TCP connects for up to
    PROBE_TIMEOUT_S, then for a GCS one handshake, which Ray bounds at about 40 s (a port
    that answers but is not a GCS)."""
    from ray._common.network_utils import parse_address
    from ray._private.services import canonicalize_bootstrap_address

    client = address.startswith("ray://")
    try:
        # The host:port ray.init() itself would dial (it resolves a loopback host to this
        # machine's IP, and "auto" to a cluster found here).
        target = address[len("ray://"):] if client else canonicalize_bootstrap_address(address)
    except (ValueError, ConnectionError) as e:
        return str(e).splitlines()[0]
    host, port = parse_address(target or "") or (None, "")
    if not port.isdigit():
        return "not a Ray address (host:port of the head's GCS, or ray://host:port)"
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    while True:  # a head that is still starting gets the few seconds
        try:
            socket.create_connection((host, int(port)), timeout=max(deadline - time.monotonic(), 0.1)).close()
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                return f"nothing answers at {target} ({e.strerror or 'no answer'} for {PROBE_TIMEOUT_S:g} s)"
            time.sleep(0.5)
    if client:
        return None
    from ray._raylet import GcsClient

    try:
        GcsClient(address=target)
    except Exception as e:  # noqa: BLE001  Ray's RpcError (and whatever its binding raises)
        return f"{target} answers, but not as a Ray cluster's GCS ({str(e).splitlines()[0]})"
    return None


def check_device(device: str, mode: str) -> None:
    """InputError when a CUDA device is asked of the embedded local Ray (mode, from connect)
    and this machine has no GPU for it: its GPU workers would wait forever. A joined
    cluster may still gain GPU nodes (an autoscaler), so there graph.run only warns."""
    import ray

    if device.startswith("cuda") and mode == "embedded" and not ray.cluster_resources().get("GPU", 0):
        raise InputError(f"--device {device}: this machine has no GPU that Ray can use; "
                         "use --device cpu, or auto to take a GPU when there is one")


# Where Ray's working_dir plugin unpacks a job's --working-dir on each node:
# <session>/runtime_resources/working_dir_files/<package>/. A local:// working dir is used
# in place, not copied, and does not lie there.
JOB_COPY_PARENTS = ("runtime_resources", "working_dir_files")


def job_working_dir_copy(*places: str | Path) -> str | None:
    """The temporary copy of a submitted job's working dir that one of the places (the
    current folder when none is given; a job also passes its code's folder) lies in, else None."""
    for place in places or (os.getcwd(),):
        parts = Path(os.path.realpath(place)).parts
        for i in range(len(parts) - 2):
            if parts[i:i + 2] == JOB_COPY_PARENTS:
                return str(Path(*parts[:i + 3]))
    return None


def refuse_job_copy_paths(paths: Iterable[tuple[str, str | None]], code_root: str | Path, s3: bool = True) -> None:
    """InputError when this job runs in a working dir copy (job_working_dir_copy of the
    current folder or code_root) and one of the local paths, given as (flag, path) pairs,
    resolves inside that copy: what a job writes there is lost, and URIs it stores there
    name files the user never sees. Absolute paths elsewhere and s3:// URIs pass. Every
    job calls it before it starts anything and prints the error as its one line, exit 2.
    s3=False for paths that must be local (a report file, an export): the error then does
    not suggest an s3:// URI."""
    try:
        here = os.getcwd()
    except FileNotFoundError:  # run from a folder since deleted: only the code's place tells
        here = code_root
    copy = job_working_dir_copy(here, code_root)
    if copy is None:
        return
    for flag, path in paths:
        if not path or "://" in str(path) and not str(path).startswith("file://"):
            continue
        full = os.path.realpath(str(path).removeprefix("file://"))
        if full == copy or full.startswith(copy + os.sep):
            raise InputError(f"{flag} {path} resolves to {full}, inside Ray's temporary copy of this job's "
                             "--working-dir, which Ray deletes later: give an absolute path on storage the "
                             "cluster's nodes share" + (", or an s3:// URI" if s3 else ""))
