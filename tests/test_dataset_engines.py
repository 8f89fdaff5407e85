"""DuckDB and Polars read a pinned version of the annotations table and see what pyarrow sees.

The table has three versions: 4 images of 3 masks; 3 more images of 5 masks; then one
image re-annotated in place (writer mode="replace", a MERGE that rewrites the data file
holding it and removes the old file from the log, leaving it on disk). Reading the folder's Parquet files without the log would
count that image twice, so each engine has to go through the Delta log to get it right.
"""
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from dataset import DatasetWriter, open_dataset, open_version, read_images, storage_options, table_uri
from dataset.lineage import new_lineage
from dataset.synthetic import image_records
from tests.s3server import moto_server

duckdb = pytest.importorskip("duckdb")
pl = pytest.importorskip("polars")

# DuckDB's delta extension is a download from DuckDB's own server; never fetch it from a test.
NO_AUTOINSTALL = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


def _build(root: str) -> list[int]:
    """Three versions as in the module docstring; returns them."""
    records = image_records(7, 3)
    more = image_records(7, 5, seed=1)[4:]  # same image ids as records[4:], 5 masks each
    w = DatasetWriter(root, new_lineage(round=0, stage="auto", run_id="r0"))
    v1 = w.commit_images(records[:4], chunk=0)
    v2 = w.commit_images(more, chunk=1)
    again = image_records(1, 2, seed=2)[0]  # image 0 with 2 masks instead of 3
    v3 = DatasetWriter(root, new_lineage(round=1, stage="auto", run_id="r1"), mode="replace").commit_images([again])
    assert (v1, v2, v3) == (v1, v1 + 1, v1 + 2)
    return [v1, v2, v3]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("engines"))
    return root, _build(root)


def _truth(root: str, version: int, options=None) -> dict:
    """pyarrow's view of a version: image_id -> (mask count, annotation ids, first RLE string)."""
    rows = read_images(root, version=version, options=options).to_pylist()
    return {r["image_id"]: (len(r["annotations"]), [a["id"] for a in r["annotations"]],
                            r["annotations"][0]["segmentation"]["counts"]) for r in rows}


def _from_polars(df) -> dict:
    out = {}
    for r in df.to_dicts():
        assert r["image_id"] not in out, f"{r['image_id']} read twice"
        out[r["image_id"]] = (len(r["annotations"]), [a["id"] for a in r["annotations"]],
                              r["annotations"][0]["segmentation"]["counts"])
    return out


def _from_duckdb(con, relation_sql: str, params=None) -> dict:
    rows = con.execute(f"SELECT image_id, len(annotations), annotations FROM {relation_sql}", params).fetchall()
    out = {}
    for image_id, n, anns in rows:
        assert image_id not in out, f"{image_id} read twice"
        out[image_id] = (n, [a["id"] for a in anns], anns[0]["segmentation"]["counts"])
    return out


def test_the_versions_differ_and_the_folder_alone_is_wrong(dataset):
    """What the engine tests below rely on: each version has its own answer, and the raw
    Parquet files of the folder hold stale copies of the rewritten file's rows."""
    root, (v1, v2, v3) = dataset
    counts = [sorted(n for n, _, _ in _truth(root, v).values()) for v in (v1, v2, v3)]
    assert counts == [[3] * 4, [3] * 4 + [5] * 3, [2] + [3] * 3 + [5] * 3]
    every_file = pq.read_table(table_uri(root, "annotations"), columns=["image_id"])
    # 7 images, plus the first file's 4 rows that the MERGE rewrote (it rewrites whole files).
    assert every_file.num_rows == 11


def test_polars_read_delta_at_each_version(dataset):
    root, versions = dataset
    uri = table_uri(root, "annotations")
    for v in versions:
        assert _from_polars(pl.read_delta(uri, version=v)) == _truth(root, v), f"version {v}"
    # The latest version without a pin.
    assert _from_polars(pl.read_delta(uri)) == _truth(root, versions[-1])


def test_polars_scan_delta_lazy_aggregate_and_filter(dataset):
    root, (v1, v2, v3) = dataset
    uri = table_uri(root, "annotations")
    for v in (v1, v2, v3):
        truth = _truth(root, v)
        agg = (pl.scan_delta(uri, version=v)
               .select(pl.len().alias("images"), pl.col("annotations").list.len().sum().alias("masks"))
               .collect().to_dicts()[0])
        assert agg == {"images": len(truth), "masks": sum(n for n, _, _ in truth.values())}
    # A predicate and a projection pushed into the scan, on the old version (time travel).
    five = (pl.scan_delta(uri, version=v1).filter(pl.col("annotations").list.len() == 5)
            .select("image_id").collect())
    assert five.height == 0
    five = (pl.scan_delta(uri, version=v2).filter(pl.col("annotations").list.len() == 5)
            .select("image_id").collect())
    assert sorted(five["image_id"]) == sorted(k for k, (n, _, _) in _truth(root, v2).items() if n == 5)


def test_duckdb_reads_a_version_through_the_delta_log_files(dataset):
    """Without the delta extension: the version's data files, listed by the Delta log
    (DeltaTable.file_uris()), passed to read_parquet."""
    root, versions = dataset
    con = duckdb.connect(config=NO_AUTOINSTALL)
    for v in versions:
        files = open_version(root, version=v).file_uris()
        got = _from_duckdb(con, "read_parquet($files, union_by_name = true)", {"files": files})
        assert got == _truth(root, v), f"version {v}"
    # A glob over the folder instead of the log's list sees the replaced row too: not a version.
    n = con.execute("SELECT count(*) FROM read_parquet($g)",
                    {"g": f"{table_uri(root, 'annotations')}/*.parquet"}).fetchall()[0][0]
    assert n == 11 != len(_truth(root, versions[-1]))


def test_duckdb_queries_the_pinned_pyarrow_dataset(dataset):
    """The other route needing no extension: DuckDB scans the pyarrow dataset of a version
    (dataset.open_dataset), which also works on S3 (pyarrow does the I/O)."""
    root, versions = dataset
    con = duckdb.connect(config=NO_AUTOINSTALL)
    for v in versions:
        version_ds = open_dataset(root, version=v)
        assert isinstance(version_ds, pads.Dataset)
        con.register("version_ds", version_ds)
        assert _from_duckdb(con, "version_ds") == _truth(root, v), f"version {v}"
        (masks,), = con.execute("SELECT sum(len(annotations)) FROM version_ds").fetchall()
        assert masks == sum(n for n, _, _ in _truth(root, v).values())
        con.unregister("version_ds")


def test_duckdb_delta_scan_when_the_extension_is_installed(dataset):
    """delta_scan needs DuckDB's delta extension, a download from DuckDB's extension server
    (not a PyPI package): runs only where it was installed beforehand (INSTALL delta)."""
    root, versions = dataset
    con = duckdb.connect(config=NO_AUTOINSTALL)
    try:
        con.execute("LOAD delta")
    except duckdb.Error as e:
        pytest.skip(f"DuckDB delta extension not installed: {str(e).splitlines()[0]}")
    uri = table_uri(root, "annotations")
    assert _from_duckdb(con, "delta_scan($uri)", {"uri": uri}) == _truth(root, versions[-1])


def test_polars_and_duckdb_on_s3(tmp_path):
    """On S3 (a moto server): Polars reads with our storage options; DuckDB through the pinned
    pyarrow dataset (its own S3 reader, httpfs, is another extension download)."""
    with moto_server("engines"):
        root = "s3://engines/ds"
        v1, v2, v3 = _build(root)
        opts = storage_options(root)
        uri = table_uri(root, "annotations")
        con = duckdb.connect(config=NO_AUTOINSTALL)
        for v in (v1, v3):
            truth = _truth(root, v, opts)
            assert _from_polars(pl.read_delta(uri, version=v, storage_options=opts)) == truth
            con.register("version_ds", open_dataset(root, version=v, options=opts))
            assert _from_duckdb(con, "version_ds") == truth
            con.unregister("version_ds")
