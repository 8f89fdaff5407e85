"""Where images come from: list an input spec and read one object's bytes, on local disk or
any S3-compatible store (s3fs; endpoint from the config or AWS_ENDPOINT_URL).

Input specs:
    /data/images            a folder, walked recursively, image suffixes only
    /data/img.jpg           one file
    /data/**/*.png          a glob (everything it matches)
    s3://bucket/prefix      every image object under the prefix
    /data/list.txt          a manifest: one URI (local path, file:// or s3://) per line, '#' comments

A local input's URI is its absolute path; one whose name is not valid UTF-8 gets a
percent-encoded file:// URI of its bytes instead (local_uri), which read_bytes opens.
"""
from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

import pyarrow as pa

from dataset.storage import is_s3

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
MANIFEST_SUFFIXES = (".txt", ".lst")
LISTING = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string())])


class InputError(ValueError):
    """An argument of the run itself is unusable: an input spec with nothing to list or an
    unreadable manifest, a checkpoint that cannot be read, an output it cannot write to."""


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


def check_output(root: str, endpoint_url: str | None = None) -> None:
    """InputError when a dataset root cannot be written, checked before any work starts:
    a local path that is (or lies under) a file or a folder without write permission; an
    S3 bucket that does not exist or cannot be reached."""
    if is_s3(root):
        _check_bucket(root, endpoint_url, "output")
        return
    path = os.path.abspath(str(root).removeprefix("file://"))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"output {root}: {existing} is a file; the output is a dataset folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"output {root}: no permission to write in {existing}")


def _check_bucket(uri: str, endpoint_url: str | None, role: str) -> None:
    """InputError naming the cause when uri's bucket is missing, forbidden or unreachable."""
    from botocore.exceptions import BotoCoreError

    bucket = _s3_path(uri).split("/", 1)[0]
    try:
        s3_filesystem(endpoint_url).info(bucket)
    except FileNotFoundError:
        raise InputError(f"{role} {uri}: bucket {bucket!r} does not exist") from None
    except PermissionError as e:
        raise InputError(f"{role} {uri}: access to bucket {bucket!r} denied: {e}") from e
    except (BotoCoreError, OSError) as e:  # unreachable endpoint, bad credentials
        raise InputError(f"{role} {uri}: cannot reach bucket {bucket!r}: {e}") from e


def _s3_path(uri: str) -> str:
    return uri.split("://", 1)[1]


def list_inputs(spec: str, endpoint_url: str | None = None) -> pa.Table:
    """The objects an input spec names, as a table (uri, size, etag), sorted by uri.
    size/etag are None where the source does not give them cheaply (manifests)."""
    if is_s3(spec):
        rows = _list_s3(spec, endpoint_url)
    elif any(c in spec for c in "*?["):
        rows = [_local_row(p) for p in sorted(Path("/").glob(os.path.abspath(spec).lstrip("/"))) if p.is_file()]
    elif os.path.isdir(spec):
        rows = [_local_row(p) for p in sorted(Path(spec).rglob("*"))
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    elif os.path.isfile(spec) and spec.lower().endswith(MANIFEST_SUFFIXES):
        rows = _read_manifest(spec, endpoint_url)
    elif os.path.isfile(spec):
        rows = [_local_row(Path(spec))]
    else:
        raise InputError(f"input {spec!r} is not a folder, file, glob, manifest or s3:// prefix")
    rows = sorted({r["uri"]: r for r in rows}.values(), key=lambda r: r["uri"])
    return pa.Table.from_pylist(rows, schema=LISTING)


def _local_row(path: Path) -> dict:
    st = path.stat()
    return {"uri": local_uri(path.resolve()), "size": st.st_size, "etag": f"mtime:{st.st_mtime_ns}"}


def local_uri(path: str | Path) -> str:
    """The URI of an absolute local path: the path itself, or, when its name is not valid
    UTF-8 (a byte string no Arrow column holds), a percent-encoded file:// URI of its bytes."""
    path = str(path)
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "file://" + quote(os.fsencode(path), safe="/")


def _local_path(uri: str) -> str | bytes:
    """The path to open for a local URI: a plain path, or the bytes of a file:// URI."""
    return unquote_to_bytes(uri.removeprefix("file://")) if uri.startswith("file://") else uri


def _list_s3(spec: str, endpoint_url: str | None) -> list[dict]:
    """Image objects under an s3:// prefix; InputError when its bucket is missing or cannot
    be reached (an empty prefix of a bucket that exists lists nothing)."""
    _check_bucket(spec, endpoint_url, "input")
    fs = s3_filesystem(endpoint_url)
    scheme = spec.split("://", 1)[0]
    try:
        found = fs.find(_s3_path(spec), detail=True)
    except FileNotFoundError:
        found = {}
    rows = []
    for path, info in found.items():
        if info.get("type") == "directory" or not path.lower().endswith(IMAGE_SUFFIXES):
            continue
        etag = info.get("ETag") or info.get("etag")
        rows.append({"uri": f"{scheme}://{path}", "size": info.get("size"),
                     "etag": etag.strip('"') if isinstance(etag, str) else None})
    return rows


def _read_manifest(path: str, endpoint_url: str | None) -> list[dict]:
    base = Path(path).resolve().parent
    rows = []
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"manifest {path} is not UTF-8 text: {e}") from None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        uri = line if is_s3(line) or line.startswith("file://") else local_uri((base / line).resolve())
        rows.append({"uri": uri, "size": None, "etag": None})
    return rows


# -- reading ------------------------------------------------------------------------------
class ReadError(OSError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_bytes(uri: str, *, max_bytes: int, size: int | None = None, endpoint_url: str | None = None,
               retries: int = 4, backoff_s: float = 0.5) -> bytes:
    """The object's bytes. Transient errors are retried with exponential backoff; a missing,
    forbidden or oversize object (by its listed size, else by what arrives) raises ReadError
    at once with its reason."""
    if size is not None and size > max_bytes:
        raise ReadError("too_large_file", f"{size} bytes > limit {max_bytes}")
    for attempt in range(retries + 1):
        try:
            return _read_once(uri, max_bytes, size, endpoint_url)
        except ReadError:
            raise
        except FileNotFoundError as e:
            raise ReadError("missing", str(e) or uri) from e
        except PermissionError as e:
            raise ReadError("forbidden", str(e) or uri) from e
        except Exception as e:  # network / server errors: try again
            if attempt == retries:
                raise ReadError("read_error", f"{type(e).__name__}: {e}") from e
            time.sleep(backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")


def _read_once(uri: str, max_bytes: int, size: int | None, endpoint_url: str | None) -> bytes:
    if is_s3(uri):
        fs = s3_filesystem(endpoint_url)
        if size is None:  # not listed (a manifest): ask before fetching
            size = fs.size(_s3_path(uri))
            if size > max_bytes:
                raise ReadError("too_large_file", f"{size} bytes > limit {max_bytes}")
        data = fs.cat_file(_s3_path(uri)) if size else b""
    else:
        path = _local_path(uri)
        size = os.path.getsize(path)
        if size > max_bytes:
            raise ReadError("too_large_file", f"{size} bytes > limit {max_bytes}")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ReadError("too_large_file", f"more than {max_bytes} bytes")
    return data
