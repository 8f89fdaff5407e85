"""Where the dataset's tables live, and the delta-rs storage options to reach them.

Layout of a dataset root (a local folder or an s3:// prefix):

    <root>/annotations/   one row per image, masks as list<struct> with COCO RLE
    <root>/quarantine/    inputs that could not be read
    <root>/duplicates/    inputs skipped as exact / near duplicates
    <root>/listing/       the input listing of each run (uri, size, etag)
    <root>/lineage/       one row per run: checkpoint, parameters, code version, ...

Beside the tables lie the job's run summaries (runs/) and reports (reports/), and in a data
engine's root its rounds, checkpoints, inputs and training data (engine/): OTHER_ROOT_ENTRIES,
named once here for the places that write them. A folder that holds something else and none
of the tables is not a dataset root.

    <root>/.writer-lease.json   the pipeline run writing the root now, if any (pipeline.lease):
                                one pipeline run per root at a time

Safe commits on S3: delta-rs commits version N by creating `_delta_log/N.json` only if it
does not exist yet. On S3 that needs a conditional PUT (If-None-Match), which we ask for
with `conditional_put=etag`. AWS S3 (since 2024), MinIO, Cloudflare R2, Ceph RGW (recent
releases) and the moto server honour it; a store that ignores the header would let two
writers overwrite each other's commit, so run a single writer against such a store.
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.dataset as pads
import pyarrow.fs as pafs

TABLE_NAMES = ("annotations", "quarantine", "duplicates", "listing", "lineage")
# Folders beside the tables: the annotation job's run summaries, the data-quality reports,
# and a data engine's round records, checkpoints, synthetic inputs, training snapshots and
# Ray Train runs.
RUNS_DIR, REPORTS_DIR = "runs", "reports"
ROUNDS_DIR, CHECKPOINTS_DIR, INPUTS_DIR, TRAIN_DATA_DIR, TRAIN_RUNS_DIR = (
    "rounds", "checkpoints", "inputs", "train_data", "train_runs")
OTHER_ROOT_ENTRIES = (RUNS_DIR, REPORTS_DIR, ROUNDS_DIR, CHECKPOINTS_DIR, INPUTS_DIR, TRAIN_DATA_DIR, TRAIN_RUNS_DIR)
# The writer lease of a running pipeline run (pipeline.lease), removed when the run ends: a
# hidden name, which the output check of a local root passes over.
WRITER_LEASE = ".writer-lease.json"

# Environment variables passed on to delta-rs (object_store reads the same names).
_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL")


# Characters that delta-rs 1.6 misreads in a table's local path or s3:// URI (measured on
# both): it percent-decodes (p%41 -> pA, so the tables land beside another folder than
# runs/), takes '#' and '?' as the start of a URL fragment or query (the table is written
# to a cut name, or its history reads as empty), panics on '[', ']', '|', '^' and '\\', and
# drops tabs and newlines. Percent-encoding them does not help: delta-rs writes the encoded
# name literally and reads it decoded. So a dataset root holding one is refused up front.
ROOT_NAME_CHARS = "%#?[]|^\\"


def root_name_problem(root: str) -> str | None:
    """Why delta-rs cannot hold the dataset's tables under root (ROOT_NAME_CHARS in it, or in
    the absolute path of a local root), or None. Input images may have such names; only
    dataset roots are affected."""
    text = str(root)
    if "://" not in text or text.startswith("file://"):
        text = os.path.abspath(text.removeprefix("file://"))
    bad = sorted({c for c in text if c in ROOT_NAME_CHARS or ord(c) < 32 or ord(c) == 127})
    if not bad:
        return None
    shown = " ".join(c if c.isprintable() else repr(c) for c in bad)
    return (f"{root}: the dataset root's path holds {shown}, which delta-rs (the Delta Lake library) misreads "
            "in a table's path; name a root without % # ? [ ] | ^ \\ or control characters")


def table_uri(root: str, name: str) -> str:
    """URI of one of the dataset's tables under root. An empty root (an unset variable) is a
    ValueError: its tables would lie at the top of the filesystem; so is a root that
    delta-rs misreads (root_name_problem)."""
    if not str(root).strip():
        raise ValueError(f"the dataset root is empty; cannot place its {name!r} table")
    problem = root_name_problem(root)
    if problem:
        raise ValueError(problem)
    if name not in TABLE_NAMES:
        raise ValueError(f"unknown table {name!r}; expected one of {TABLE_NAMES}")
    return f"{str(root).rstrip('/')}/{name}"


def is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def s3_filesystem(endpoint_url: str | None = None):
    """An s3fs filesystem for the current AWS environment (credentials, region; the endpoint
    from the argument or AWS_ENDPOINT_URL). Instances are shared per process and per
    environment; listings are not cached: a listing cached by an earlier reader would hide
    objects written since."""
    env = os.environ
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    return _s3_filesystem(endpoint_url or env.get("AWS_ENDPOINT_URL"), region, env.get("AWS_ACCESS_KEY_ID"))


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, key_id: str | None):
    import s3fs

    client = {"endpoint_url": endpoint} if endpoint else {}
    if region:
        client["region_name"] = region
    return s3fs.S3FileSystem(client_kwargs=client, use_listings_cache=False)


def store_error(error: Exception) -> str:
    """One line for an object-store error of delta-rs, whose message nests its causes over many
    lines: the S3 error code and message where the server sent one (NoSuchBucket: ...), else
    the innermost cause (Connection refused, ...)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    code = re.search(r"<Code>([^<]+)</Code>(?:<Message>([^<]+)</Message>)?", text)
    if code:
        return f"{code.group(1)}: {code.group(2)}" if code.group(2) else code.group(1)
    lines = [line.strip(" ↳") for line in text.splitlines() if line.strip(" ↳")]
    return lines[-1] if lines else type(error).__name__


def is_delta_table(uri: str, options: dict[str, str] | None = None) -> bool:
    """Whether uri is a Delta table. A local path that is a file (a Parquet file, say) is
    not one; delta-rs raises on such paths instead of answering."""
    from deltalake import DeltaTable

    if not is_s3(uri) and not os.path.isdir(str(uri).removeprefix("file://")):
        return False
    return DeltaTable.is_deltatable(str(uri), storage_options=options or None)


def storage_options(uri: str, endpoint_url: str | None = None, **overrides: str) -> dict[str, str]:
    """delta-rs storage options for uri: empty for local paths; for S3 the standard AWS
    environment, an optional explicit endpoint (MinIO, Ceph, moto), plain HTTP allowed
    when the endpoint is http://, and conditional-put commits."""
    if not is_s3(uri):
        return dict(overrides)
    opts = {k: os.environ[k] for k in _AWS_ENV if os.environ.get(k)}
    if endpoint_url:
        opts["AWS_ENDPOINT_URL"] = endpoint_url
    opts.setdefault("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    if opts.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        opts["AWS_ALLOW_HTTP"] = "true"
    opts["conditional_put"] = "etag"
    opts.update(overrides)
    return opts


def arrow_filesystem(uri: str, options: dict[str, str]) -> pafs.FileSystem:
    """A native pyarrow filesystem rooted at a table's folder.

    Reading through it rather than through delta-rs's default Python file handler keeps
    Python callbacks out of Arrow's I/O threads; with the handler, a process that has read
    a table sometimes aborts at exit ("terminate called without an active exception",
    delta-io/delta-rs#2184).
    """
    if not is_s3(uri):
        return pafs.SubTreeFileSystem(os.path.abspath(uri), pafs.LocalFileSystem())
    s3 = arrow_s3_filesystem(
        options.get("AWS_ENDPOINT_URL"), access_key=options.get("AWS_ACCESS_KEY_ID"),
        secret_key=options.get("AWS_SECRET_ACCESS_KEY"), session_token=options.get("AWS_SESSION_TOKEN"),
        region=options.get("AWS_REGION"),
    )
    parsed = urlparse(uri)
    return pafs.SubTreeFileSystem(f"{parsed.netloc}{parsed.path}".rstrip("/"), s3)


def arrow_s3_filesystem(endpoint_url: str | None, **credentials: str | None) -> pafs.S3FileSystem:
    """A native pyarrow S3 filesystem at endpoint_url (None: AWS). Credentials and region not
    given come from the AWS environment of the process that uses it, so one handed to other
    processes (Ray Train's storage) carries no secret."""
    return pafs.S3FileSystem(
        endpoint_override=urlparse(endpoint_url).netloc if endpoint_url else None,
        scheme=urlparse(endpoint_url).scheme if endpoint_url else "https", **credentials,
    )


def arrow_dataset(table, uri: str, options: dict[str, str]) -> pads.Dataset:
    """The pyarrow dataset of a DeltaTable (at its loaded version), read natively."""
    return table.to_pyarrow_dataset(filesystem=arrow_filesystem(uri, options))
