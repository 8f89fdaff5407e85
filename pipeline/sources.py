"""Where images come from: list an input spec and read one object's bytes, on local disk or
any S3-compatible store (s3fs; endpoint from the config or AWS_ENDPOINT_URL).

Input specs:
    /data/images            a folder, walked recursively (symlinked folders too), image suffixes only
    /data/img.jpg           one file
    /data/**/*.png          a glob (everything it matches); an existing folder or file is
                            taken as named, even if its name holds * ? or [
    s3://bucket/prefix      every image object under the prefix
    /data/list.txt          a manifest: one URI (local path, file:// or s3://) per line, '#' comments

A spec that lists nothing is an InputError. A local input's URI is its absolute path as
listed, symlinks not resolved; one whose name is not valid UTF-8 gets a percent-encoded
file:// URI of its bytes instead (local_uri), which read_bytes opens.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

import pyarrow as pa

from dataset.storage import (
    OTHER_ROOT_ENTRIES, TABLE_NAMES, WRITER_LEASE, is_s3, root_name_problem, s3_filesystem,
)

# Suffixes a folder or prefix listing takes: the formats pipeline.images decodes, then image
# formats it recognises but does not decode, listed so that they are quarantined as
# unsupported_format instead of being left out without a word.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".avif",
                  ".heic", ".heif", ".jp2", ".j2k", ".jxl", ".psd", ".qoi", ".ppm", ".ico")
MANIFEST_SUFFIXES = (".txt", ".lst")
LISTING = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string())])


class InputError(ValueError):
    """An argument of the run itself is unusable: an input spec with nothing to list or an
    unreadable manifest, a checkpoint that cannot be read, an output it cannot write to."""


def check_output(root: str, endpoint_url: str | None = None) -> None:
    """InputError when a dataset root cannot be written, checked before any work starts:
    an empty name; a name delta-rs misreads (dataset.storage.root_name_problem); a local
    path that is (or lies under) a file or a folder without write permission; an S3 bucket
    that does not exist or cannot be reached; a folder or prefix that holds something
    other than a dataset (_check_local_dataset_root)."""
    if not str(root).strip():
        raise InputError("output is empty: name a local folder or s3://bucket/prefix")
    problem = root_name_problem(root)
    if problem:
        raise InputError(f"output {problem}")
    if is_s3(root):
        _check_bucket(root, endpoint_url, "output")
        _check_s3_dataset_root(root, endpoint_url)
        return
    path = os.path.abspath(str(root).removeprefix("file://"))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"output {root}: {existing} is a file; the output is a dataset folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"output {root}: no permission to write in {existing}")
    if existing == path:
        _check_local_dataset_root(root, path)


# A dataset root is new, empty, or a dataset: the job writes its tables only where no files of
# the user's can end up among them, since a vacuum deletes every file of a table's folder
# that the table does not name.
def _not_a_table(root: str, folder: str) -> InputError:
    return InputError(f"output {root}: {folder} holds files but no _delta_log, so it is not a table of a "
                      "dataset; name a new or empty folder, or an existing dataset")


def _not_a_dataset(root: str, folder: str) -> InputError:
    return InputError(f"output {root}: {folder} is not empty and holds none of the dataset's tables "
                      f"({', '.join(TABLE_NAMES)}); name a new or empty folder, or an existing dataset")


def _check_local_dataset_root(root: str, path: str) -> None:
    """InputError when the existing folder path holds a table's folder that is neither empty
    nor a Delta table, or holds no Delta table but other things than the engine writes beside
    its tables (OTHER_ROOT_ENTRIES): a home folder, a folder of images. Hidden names
    (.DS_Store) do not count; vacuum leaves them alone too."""
    entries = _visible(os.listdir(path))
    for name in TABLE_NAMES:
        folder = os.path.join(path, name)
        if name in entries and not (os.path.isdir(folder) and _empty_or_delta(os.listdir(folder))):
            raise _not_a_table(root, folder)
    is_dataset = any(os.path.isdir(os.path.join(path, name, "_delta_log")) for name in TABLE_NAMES)
    if not is_dataset and set(entries) - set(TABLE_NAMES) - set(OTHER_ROOT_ENTRIES):
        raise _not_a_dataset(root, path)


def _empty_or_delta(names: list[str]) -> bool:
    """Whether a table's folder holding these names may take the table: one holding nothing
    (hidden names aside), or a _delta_log (its writer is ours, even if a crash left it empty)."""
    return "_delta_log" in names or not _visible(names)


def _visible(names: list[str]) -> list[str]:
    return [n for n in names if not n.startswith(".")]


def _check_s3_dataset_root(root: str, endpoint_url: str | None) -> None:
    """_check_local_dataset_root's rule for an s3:// prefix, in at most 11 one-key listings (never
    a listing of what the prefix holds): a table prefix with objects but no _delta_log, or
    a prefix with objects and none of the tables (nothing the engine writes there comes
    before its tables), is refused."""
    fs = s3_filesystem(endpoint_url)
    base = _s3_path(root).rstrip("/")
    tables = [name for name in TABLE_NAMES if _s3_holds_objects(fs, f"{base}/{name}")]
    for name in tables:
        if not _s3_holds_objects(fs, f"{base}/{name}/_delta_log"):
            raise _not_a_table(root, f"{root.rstrip('/')}/{name}")
    # The writer lease of a run that died before it made the tables is no user's object.
    if not tables and _s3_holds_objects(fs, base, ignore=WRITER_LEASE):
        raise _not_a_dataset(root, root)


def _s3_holds_objects(fs, path: str, ignore: str | None = None) -> bool:
    """Whether any object lies under the folder path ("bucket/key"), not counting the one
    named `ignore` (a name inside the folder): one listing of one or two keys."""
    bucket, _, key = path.partition("/")
    prefix = f"{key}/" if key else ""
    listed = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1 if ignore is None else 2)
    skip = None if ignore is None else prefix + ignore
    return any(o["Key"] != skip for o in listed.get("Contents", ()))


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
    """The objects an input spec names, as a table (uri, size, etag), sorted by uri, one row
    per object however often it is named. size/etag are None where the source does not give
    them cheaply (manifests). InputError when it lists nothing: an empty folder, prefix or
    manifest or a glob that matches nothing is a wrong path or an unmounted volume, not a
    run with nothing to do (a rerun lists its inputs again and skips those done)."""
    # An existing folder or file is taken as named, even when its name holds * ? or [
    # (odd/what?[x]); only a spec naming nothing that exists is a glob.
    if is_s3(spec):
        rows = _list_s3(spec, endpoint_url)
    elif os.path.isdir(spec):
        rows = [_local_row(p) for p in _image_files(spec)]
    elif os.path.isfile(spec) and spec.lower().endswith(MANIFEST_SUFFIXES):
        rows = _read_manifest(spec, endpoint_url)
    elif os.path.isfile(spec):
        rows = [_local_row(spec)]
    elif any(c in spec for c in "*?["):
        rows = [_local_row(p) for p in sorted(Path("/").glob(os.path.abspath(spec).lstrip("/"))) if p.is_file()]
    else:
        raise InputError(f"input {spec!r} is not a folder, file, glob, manifest or s3:// prefix")
    if not rows:
        raise InputError(f"input {spec!r} lists no inputs (folders and s3:// prefixes take the suffixes "
                         f"{' '.join(IMAGE_SUFFIXES)})")
    rows = sorted({r["uri"]: r for r in rows}.values(), key=lambda r: r["uri"])
    return pa.Table.from_pylist(rows, schema=LISTING)


def _image_files(folder: str) -> list[str]:
    """Files with an image suffix under folder. Symlinked folders are walked too, as by
    `find -L`, except one that leads back to a folder it lies in, which would never end."""
    found = []
    outer = {folder: frozenset()}  # a folder to walk -> the real paths of the folders around it
    for top, dirs, files in os.walk(folder, followlinks=True):
        around = outer.pop(top) | {os.path.realpath(top)}
        dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(top, d)) not in around]
        outer.update((os.path.join(top, d), around) for d in dirs)
        for name in files:
            path = os.path.join(top, name)
            if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(path):
                found.append(path)
    return found


def _local_row(path: str | Path) -> dict:
    """The listing row of a local file. Its URI is its absolute path as listed: a symlink
    keeps the name it was given (cat.png -> /store/5f2a9c0e1b in DVC, git-annex or a Hugging
    Face cache) and is read through; size and mtime are those of the file it leads to."""
    st = os.stat(path)
    return {"uri": local_uri(os.path.abspath(path)), "size": st.st_size, "etag": f"mtime:{st.st_mtime_ns}"}


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
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"manifest {path} is not UTF-8 text: {e}") from None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rows.append({"uri": _manifest_uri(line, base), "size": None, "etag": None})
    # A manifest none of whose local entries exists (and that names no s3:// object) is not
    # a list of images that went missing one by one but a wrong file (notes, a list for
    # another machine): refused like an input that lists nothing, not quarantined entry by entry.
    if rows and not any(is_s3(r["uri"]) or os.path.exists(_local_path(r["uri"])) for r in rows):
        raise InputError(f"manifest {path}: none of its {len(rows)} entries names an existing file (the first: "
                         f"{rows[0]['uri']}); a manifest holds one image path or URI per line")
    return rows


def _manifest_uri(entry: str, base: str) -> str:
    """The URI of a manifest entry: an s3:// URI as written; a local path (relative to the
    manifest's folder base) or file:// URI as the listing of its folder names it, so that a
    file named both ways is one input."""
    if is_s3(entry):
        return entry
    path = os.fsdecode(_local_path(entry))
    return local_uri(os.path.abspath(os.path.join(base, path)))


# -- reading ------------------------------------------------------------------------------
class ReadError(OSError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_bytes(uri: str, *, max_bytes: int, size: int | None = None, endpoint_url: str | None = None,
               retries: int = 4, backoff_s: float = 0.5) -> bytes:
    """The object's bytes. Transient errors are retried with exponential backoff; a missing,
    forbidden or oversize object (by its listed size, else by what arrives) or a folder
    raises ReadError at once with its reason, which a rerun does not try again."""
    if size is not None and size > max_bytes:
        raise ReadError("too_large_file", f"{size} bytes > limit {max_bytes}")
    for attempt in range(retries + 1):
        try:
            return _read_once(uri, max_bytes, size, endpoint_url)
        except ReadError:
            raise
        except (FileNotFoundError, NotADirectoryError) as e:
            raise ReadError("missing", str(e) or uri) from e
        except IsADirectoryError as e:  # a folder named in a manifest
            raise ReadError("not_a_file", str(e) or uri) from e
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
