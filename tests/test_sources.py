"""Listing inputs (folder, glob, manifest, file) and reading them with retries."""
from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from actors.reader import read_images
from pipeline import sources
from pipeline.progress import RETRIED_REASON
from pipeline.sources import InputError, ReadError, check_output, list_inputs, read_bytes

ROOT = Path(__file__).resolve().parents[1]
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"  # the signature of an iPhone photo


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "deep").mkdir()
    for rel in ("x.jpg", "a/y.PNG", "a/deep/z.webp", "a/notes.txt", "a/deep/data.json"):
        (tmp_path / rel).write_bytes(b"0123456789"[: len(rel)])
    return tmp_path


def _read(listing) -> dict:
    """The pipeline's reader (actors.reader) on a listing: uri, status, reason, image_id, ..."""
    return read_images({k: np.array(v, dtype=object) for k, v in listing.to_pydict().items()}, limits={})


def _reasons(listing) -> dict[str, str]:
    """uri -> quarantine reason ("" when the file was read and decoded)."""
    out = _read(listing)
    return dict(zip(out["uri"], out["reason"]))


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_folder_is_walked_for_image_suffixes(tree):
    t = list_inputs(str(tree))
    assert [u.split(str(tree))[1] for u in t["uri"].to_pylist()] == ["/a/deep/z.webp", "/a/y.PNG", "/x.jpg"]
    assert t["size"].to_pylist() == [10, 7, 5]  # bytes written: the name's length, at most 10
    assert all(e.startswith("mtime:") for e in t["etag"].to_pylist())


def test_glob_file_and_manifest(tree):
    assert [u.rsplit("/", 1)[1] for u in list_inputs(str(tree / "a" / "*")).column("uri").to_pylist()] == \
        ["notes.txt", "y.PNG"]  # a glob takes what it matches (files only)
    assert list_inputs(str(tree / "x.jpg"))["uri"].to_pylist() == [str(tree / "x.jpg")]
    manifest = tree / "list.txt"
    manifest.write_text("# inputs\nx.jpg\n\na/y.PNG\ns3://bucket/key.jpg\nx.jpg\n")
    t = list_inputs(str(manifest))
    assert t["uri"].to_pylist() == [str(tree / "a" / "y.PNG"), str(tree / "x.jpg"), "s3://bucket/key.jpg"]
    assert t["size"].null_count == 3  # a manifest does not stat millions of objects


def test_an_existing_folder_or_file_with_glob_characters_is_taken_literally(tmp_path):
    odd = tmp_path / "odd" / "what?[x]"
    odd.mkdir(parents=True)
    (odd / "in.png").write_bytes(b"a")
    (tmp_path / "odd" / "whatA").mkdir()  # what the pattern what?[x] would match: not x
    (tmp_path / "odd" / "whatAx").mkdir()  # what it matches, a folder: a glob lists files only
    (tmp_path / "odd" / "whatAx" / "other.png").write_bytes(b"b")
    assert list_inputs(str(odd))["uri"].to_pylist() == [str(odd / "in.png")]
    star = tmp_path / "odd" / "*.png"
    star.write_bytes(b"c")
    assert list_inputs(str(star))["uri"].to_pylist() == [str(star)]  # the file, not every .png
    manifest = tmp_path / "odd" / "list[1].txt"
    manifest.write_text(f"{odd / 'in.png'}\n")
    assert list_inputs(str(manifest))["uri"].to_pylist() == [str(odd / "in.png")]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert list_inputs("odd/what?[x]")["uri"].to_pylist() == [str(odd / "in.png")]
    finally:
        os.chdir(cwd)
    # A spec naming nothing that exists is still a glob.
    assert list_inputs(str(tmp_path / "odd" / "what?x" / "*.png"))["uri"].to_pylist() == \
        [str(tmp_path / "odd" / "whatAx" / "other.png")]


def test_a_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="not a folder, file, glob, manifest or s3"):
        list_inputs(str(tmp_path / "nope"))


def test_reads_retry_transient_errors_and_not_permanent_ones(tree, monkeypatch):
    calls = []
    real = sources._read_once

    def flaky(uri, max_bytes, size, endpoint):
        calls.append(uri)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return real(uri, max_bytes, size, endpoint)

    monkeypatch.setattr(sources, "_read_once", flaky)
    assert read_bytes(str(tree / "x.jpg"), max_bytes=100, backoff_s=0.01) == b"01234"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(ReadError) as e:
        read_bytes(str(tree / "x.jpg"), max_bytes=100, retries=1, backoff_s=0.01)
    assert e.value.reason == "read_error" and len(calls) == 2
    monkeypatch.setattr(sources, "_read_once", real)
    with pytest.raises(ReadError) as e:
        read_bytes(str(tree / "missing.jpg"), max_bytes=100)
    assert e.value.reason == "missing"
    with pytest.raises(ReadError) as e:
        read_bytes(str(tree / "a" / "deep" / "z.webp"), max_bytes=5)
    assert e.value.reason == "too_large_file"


def test_s3_reads_follow_the_environment_and_see_new_objects():
    """Without an explicit endpoint, reads go to the AWS_ENDPOINT_URL of the moment (not the
    one of the first call in this process), and an object written after a listing is read."""
    import boto3

    from tests.s3server import moto_server

    for name in ("first.png", "second.png"):  # two servers, one after the other
        with moto_server("data") as endpoint:
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            s3.put_object(Bucket="data", Key="images/old.png", Body=b"old")
            assert list_inputs("s3://data/images")["uri"].to_pylist() == ["s3://data/images/old.png"]
            s3.put_object(Bucket="data", Key=f"images/{name}", Body=name.encode())
            assert read_bytes(f"s3://data/images/{name}", max_bytes=100) == name.encode()
            assert sources.s3_filesystem().info(f"data/images/{name}")["size"] == len(name)


def test_an_output_that_cannot_be_written_is_a_clear_error(tmp_path):
    check_output(str(tmp_path / "new" / "dataset"))  # missing folders are created by the writer
    check_output(f"file://{tmp_path}")
    (tmp_path / "taken").write_bytes(b"x")
    with pytest.raises(InputError, match="taken is a file; the output is a dataset folder"):
        check_output(str(tmp_path / "taken"))
    with pytest.raises(InputError, match="taken is a file"):
        check_output(str(tmp_path / "taken" / "dataset"))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root writes anywhere: nothing to check then
        with pytest.raises(InputError, match="no permission to write in"):
            check_output(str(locked / "dataset"))


def test_a_missing_or_unreachable_bucket_is_a_clear_error():
    from tests.s3server import free_port, moto_server

    with moto_server("data"):
        check_output("s3://data/datasets/one")
        with pytest.raises(InputError, match="input 's3://data/no/images/yet' lists no inputs"):
            list_inputs("s3://data/no/images/yet")  # an empty prefix of a bucket that exists
        with pytest.raises(InputError, match="output s3://nobucket/datasets/one: bucket 'nobucket' does not exist"):
            check_output("s3://nobucket/datasets/one")
        with pytest.raises(InputError, match="input s3://nobucket/images: bucket 'nobucket' does not exist"):
            list_inputs("s3://nobucket/images")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(InputError, match="cannot reach bucket 'data'"):
        list_inputs("s3://data/images", endpoint_url=closed)
    with pytest.raises(InputError, match="cannot reach bucket 'data'"):
        check_output("s3://data/datasets/one", endpoint_url=closed)


def test_a_name_that_is_not_utf8_gets_a_file_uri_that_reads(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9.jpg"  # Latin-1 bytes: not valid UTF-8
    with open(raw, "wb") as f:
        f.write(b"latin-1 name")
    (tmp_path / "plain.jpg").write_bytes(b"plain")
    uris = list_inputs(str(tmp_path))["uri"].to_pylist()
    weird = f"file://{tmp_path}/caf%E9.jpg"
    assert uris == [str(tmp_path / "plain.jpg"), weird]
    assert read_bytes(weird, max_bytes=100) == b"latin-1 name"
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{weird}\nplain.jpg\n")
    assert list_inputs(str(manifest))["uri"].to_pylist() == [str(tmp_path / "plain.jpg"), weird]
    manifest.write_bytes(b"caf\xe9.jpg\n")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        list_inputs(str(manifest))


def test_an_input_that_lists_nothing_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("no images here")
    (tmp_path / "list.txt").write_text("# nothing yet\n\n")
    for spec in ("empty", "text", "empty/*.jpg", "list.txt"):
        with pytest.raises(InputError, match=re.escape(f"input '{tmp_path / spec}' lists no inputs")):
            list_inputs(str(tmp_path / spec))


def test_the_job_refuses_an_input_that_lists_nothing(tmp_path):
    """Exit 2 and a one-line reason, not a run of nothing that exits 0; nothing is written."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "dataset"
    r = subprocess.run([sys.executable, "jobs/auto_annotate.py", "--input", str(tmp_path / "empty"),
                        "--output", str(out), "--points-per-side", "4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: input '{tmp_path / 'empty'}' lists no inputs " \
        f"(folders and s3:// prefixes take the suffixes {' '.join(sources.IMAGE_SUFFIXES)})"
    assert "Traceback" not in r.stderr and not out.exists()


def test_symlinked_folders_are_walked_and_link_loops_end(tmp_path):
    store = tmp_path / "store" / "photos"
    store.mkdir(parents=True)
    (store / "a.png").write_bytes(b"a")
    (store / "again").symlink_to(store)  # a loop: the folder inside itself
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "photos").symlink_to(store)  # the folder holds nothing but a link to a folder
    (folder / "up").symlink_to(folder)  # a loop through the folder walked
    assert list_inputs(str(folder))["uri"].to_pylist() == [str(folder / "photos" / "a.png")]


def test_every_image_suffix_is_listed_and_undecoded_formats_are_quarantined(tmp_path):
    """.avif is decoded; .heic/.heif are listed so that the reader quarantines them as
    unsupported_format, as it does any image format it recognises and does not decode."""
    (tmp_path / "x.avif").write_bytes(b"avif")
    (tmp_path / "IMG_0001.HEIC").write_bytes(HEIC)
    (tmp_path / "y.heif").write_bytes(HEIC)
    (tmp_path / "notes.txt").write_text("not listed")
    listing = list_inputs(str(tmp_path))
    assert [Path(u).name for u in listing["uri"].to_pylist()] == ["IMG_0001.HEIC", "x.avif", "y.heif"]
    reasons = _reasons(listing)
    assert reasons[str(tmp_path / "IMG_0001.HEIC")].startswith("unsupported_format: HEIF/HEIC is not decoded")
    assert reasons[str(tmp_path / "y.heif")].startswith("unsupported_format")


def test_a_symlinked_file_keeps_its_own_name_and_reads_through(tmp_path):
    """cat.png -> ../store/5f2a9c0e1b (DVC, git-annex, a Hugging Face cache): the input is
    cat.png however it is named, its bytes and size are the target's, and a file under two
    names is one image (image_id: sha256 of the bytes)."""
    png = _png()
    blob = tmp_path / "store" / "5f2a9c0e1b"
    blob.parent.mkdir()
    blob.write_bytes(png)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "cat.png").symlink_to(Path("..") / "store" / "5f2a9c0e1b")
    (folder / "list.txt").write_text("cat.png\n")
    link = str(folder / "cat.png")
    for spec in (folder, folder / "cat.png", folder / "*.png", folder / "list.txt"):
        assert list_inputs(str(spec))["uri"].to_pylist() == [link], spec
    assert list_inputs(str(folder))["size"].to_pylist() == [len(png)]
    assert read_bytes(link, max_bytes=len(png)) == png
    (tmp_path / "store" / "cat.png").symlink_to(blob)  # a second name of the same file
    listing = list_inputs(str(tmp_path / "*" / "cat.png"))
    assert listing["uri"].to_pylist() == [link, str(tmp_path / "store" / "cat.png")]
    out = _read(listing)
    assert list(out["reason"]) == ["", ""] and set(out["image_id"]) == {hashlib.sha256(png).hexdigest()}


def test_a_manifest_names_each_file_once_however_it_is_written(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "x.png").write_bytes(HEIC)
    (tmp_path / "my cat.png").write_bytes(HEIC + b"!")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"x.png\n./x.png\n{tmp_path}/x.png\nfile://{tmp_path}/x.png\nsub/../x.png\n"
                        f"file://{tmp_path}/my%20cat.png\nmy cat.png\n")
    assert list_inputs(str(manifest))["uri"].to_pylist() == [str(tmp_path / "my cat.png"), str(tmp_path / "x.png")]


def test_a_manifest_naming_no_existing_file_is_refused(tmp_path):
    """Notes passed as a manifest (or a list made on another machine) would quarantine every
    line as missing and exit 0; one existing entry makes it a manifest with gaps."""
    notes = tmp_path / "notes.txt"
    notes.write_text("Remember to annotate the cats.\nAsk about the dogs\n")
    with pytest.raises(InputError, match=r"none of its 2 entries names an existing file.*Remember to annotate"):
        list_inputs(str(notes))
    (tmp_path / "x.png").write_bytes(HEIC)
    notes.write_text("gone.png\nx.png\n")
    assert list_inputs(str(notes))["uri"].to_pylist() == [str(tmp_path / "gone.png"), str(tmp_path / "x.png")]
    notes.write_text("gone.png\ns3://bucket/key.jpg\n")  # objects are not asked for here
    assert len(list_inputs(str(notes))) == 2


def test_a_folder_named_in_a_manifest_is_quarantined_for_good(tmp_path):
    """Not the transient read_error, retried with backoff here and again by every rerun."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "list.txt").write_text("sub\n")
    listing = list_inputs(str(tmp_path / "list.txt"))
    started = time.perf_counter()
    reason = _reasons(listing)[str(tmp_path / "sub")]
    assert reason.startswith("not_a_file: ") and not reason.startswith(RETRIED_REASON)
    assert time.perf_counter() - started < 1  # no retries
