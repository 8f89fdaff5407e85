"""Listing inputs (folder, glob, manifest, file) and reading them with retries."""
from __future__ import annotations

import os

import pytest

from pipeline import sources
from pipeline.sources import InputError, ReadError, check_output, list_inputs, read_bytes


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "deep").mkdir()
    for rel in ("x.jpg", "a/y.PNG", "a/deep/z.webp", "a/notes.txt", "a/deep/data.json"):
        (tmp_path / rel).write_bytes(b"0123456789"[: len(rel)])
    return tmp_path


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
        assert list_inputs("s3://data/no/images/yet").num_rows == 0  # an empty prefix lists nothing
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
