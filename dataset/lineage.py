"""Building a run's lineage: stable hashes of what went into it."""
from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from schemas import LineageRecord, ListingEntry

_REPO = Path(__file__).resolve().parents[1]


def params_json(params: Any) -> str:
    """Canonical JSON of generator parameters (a pydantic model or a dict)."""
    if hasattr(params, "model_dump"):
        params = params.model_dump(mode="json")
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    """sha256 of a file (a checkpoint, an image), read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def listing_hash(entries: Iterable[ListingEntry | dict]) -> str:
    """Order-independent hash of an input listing: sha256 over sorted 'uri size etag' lines."""
    lines = []
    for e in entries:
        e = e.model_dump() if hasattr(e, "model_dump") else e
        lines.append(f"{e['uri']}\t{e.get('size')}\t{e.get('etag')}\n")
    return sha256_hex("".join(sorted(lines)))


def code_version() -> str:
    """The git commit of this checkout (with '+dirty' if it has changes), else 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def new_lineage(*, round: int, stage: str, params: Any = None, checkpoint_hash: str = "",
                listing_hash: str = "", run_id: str | None = None) -> LineageRecord:
    """A run's lineage with a fresh run id, the parameters' hash and this code's version."""
    pj = params_json(params if params is not None else {})
    return LineageRecord(
        run_id=run_id or uuid.uuid4().hex, round=round, stage=stage, checkpoint_hash=checkpoint_hash,
        params_json=pj, params_hash=sha256_hex(pj), code_version=code_version(),
        listing_hash=listing_hash, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
