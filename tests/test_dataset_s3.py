"""The dataset on S3 through delta-rs with conditional-put commits, against a moto server
run as its own process (a moto thread beside delta-rs in one process can stall)."""
import threading

import pytest

from dataset import DatasetWriter, committed_image_ids, history, read_images, read_table, storage_options
from dataset.lineage import new_lineage
from dataset.synthetic import image_records
from dataset.validation import validate
from tests.s3server import moto_server


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_server("data") as endpoint:
        yield endpoint


def test_write_and_read_a_dataset_on_s3(s3_endpoint):
    root = "s3://data/engine"
    opts = storage_options(root)  # from the AWS environment alone
    assert opts["AWS_ENDPOINT_URL"] == s3_endpoint and opts["AWS_ALLOW_HTTP"] == "true"
    assert opts["conditional_put"] == "etag"
    records = image_records(8, 5)
    w = DatasetWriter(root, new_lineage(round=0, stage="auto", run_id="s3run"))
    w.start_run()
    v1 = w.commit_images(records[:4], chunk=0)
    assert w.commit_images(records[:4], chunk=0) is None  # a retried chunk adds nothing

    # Two writers committing at once: conditional put makes one retry on top of the other.
    writers = [DatasetWriter(root, new_lineage(round=0, stage="auto"), mode="append") for _ in range(2)]
    errors = []

    def commit(w, part):
        try:
            w.commit_images(part, chunk=0)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(w, records[4 + 2 * i:6 + 2 * i])) for i, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert [c["version"] for c in history(root)][-3:] == [v1, v1 + 1, v1 + 2]
    assert read_images(root).num_rows == 8 and read_images(root, version=v1).num_rows == 4
    assert committed_image_ids(root) == {r["image_id"] for r in records}
    assert read_table(root, "lineage").to_pylist()[0]["run_id"] == "s3run"
    assert validate(root).ok


def test_jobs_on_a_missing_bucket_or_unreachable_endpoint_are_one_line_errors(s3_endpoint, capsys):
    """validate, export, maintain and report name the store's reason (not a delta-rs traceback
    nested over many lines), with exit code 2."""
    from jobs import export, maintain, report, validate

    for main, argv in ((validate.main, ["s3://nobucket/ds"]),
                       (export.main, ["s3://nobucket/ds", "--to", "coco", "--dest", "/nonexistent/x.json"]),
                       (maintain.main, ["s3://nobucket/ds", "compact"]),
                       (report.main, ["s3://nobucket/ds", "--out", "/nonexistent/x.html"]),
                       (validate.main, ["s3://data/ds", "--endpoint-url", "http://127.0.0.1:9"])):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        reason = "Connection refused" if "--endpoint-url" in argv else "NoSuchBucket: The specified bucket"
        assert err.startswith("error: cannot re") and reason in err and len(err.splitlines()) == 1, err
