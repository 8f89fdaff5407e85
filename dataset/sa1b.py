"""SA-1B per-image JSON: export a version, import SA-1B itself (folders or tar shards).

An SA-1B file is {"image": {image_id, width, height, file_name}, "annotations": [{id,
segmentation {size, counts}, area, bbox, predicted_iou, point_coords, stability_score,
crop_box}]} with integer ids. Exports write that layout exactly, one `<image_key>.json` per
image, plus `image_keys.parquet` mapping each integer image_id back to our sha256 image_id,
uri and phash: the stored table that lets a re-import restore every id. Stage and round are
not part of SA-1B; an import takes them from the importing run's lineage.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .identity import image_identity
from .exports import export_file_names, replacing_folder
from .reader import iter_images
from .writer import Skipped

KEY_TABLE = "image_keys.parquet"
KEY_SCHEMA = pa.schema([("image_key", pa.int64()), ("image_id", pa.string()), ("uri", pa.string()),
                        ("phash", pa.string())])
_MASK_FIELDS = ("id", "segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                "crop_box")


def to_sa1b(image: dict, file_name: str) -> dict:
    """One of our image rows -> its SA-1B JSON document."""
    return {
        "image": {"image_id": image["image_key"], "width": image["width"], "height": image["height"],
                  "file_name": file_name},
        "annotations": [{k: ann[k] for k in _MASK_FIELDS} for ann in image["annotations"]],
    }


def export_sa1b(root: str, dest: str | Path, **pin: Any) -> int:
    """Write a version as SA-1B JSON files under dest (a local folder); returns the image count.

    JSON files are named by image_key, unique in a version, where SA-1B names them after the
    image: images with the same base name in different folders must not share one. Each
    file_name is the image's path relative to the folder that holds them all
    (`export_file_names`). dest is replaced whole (`replacing_folder`), so that it holds
    this export and no JSON file of an earlier one.
    """
    keys: list[dict] = []
    with replacing_folder(dest, _is_sa1b_export) as new:
        file_name = export_file_names(root, **pin)
        for image in iter_images(root, **pin):
            doc = to_sa1b(image, file_name(image["uri"]))
            (new / f"{image['image_key']}.json").write_text(json.dumps(doc, separators=(",", ":")))
            keys.append({k: image[k] for k in KEY_SCHEMA.names})
        pq.write_table(pa.Table.from_pylist(keys, schema=KEY_SCHEMA), new / KEY_TABLE, compression="zstd")
    return len(keys)


def _is_sa1b_export(path: Path) -> bool:
    """Whether path is one of the files export_sa1b writes."""
    return path.is_file() and (path.name == KEY_TABLE or re.fullmatch(r"\d+\.json", path.name) is not None)


def from_sa1b(doc: dict, image_id: str, uri: str, phash: str | None, image_key: int | None = None) -> dict:
    """An SA-1B document -> a writer-ready image record. Annotation ids are dropped: the writer
    derives them from the image key (for our own exports that gives back the same ids)."""
    info = doc["image"]
    annotations = []
    for ann in doc["annotations"]:
        seg = ann["segmentation"]
        annotations.append({
            "segmentation": {"size": [int(s) for s in seg["size"]], "counts": seg["counts"]},
            "area": int(ann["area"]), "bbox": [int(round(v)) for v in ann["bbox"]],
            "predicted_iou": ann.get("predicted_iou"), "point_coords": ann.get("point_coords") or [],
            "stability_score": ann.get("stability_score"),
            "crop_box": [int(round(v)) for v in ann.get("crop_box") or (0, 0, info["width"], info["height"])],
        })
    record = {"image_id": image_id, "uri": uri, "width": int(info["width"]), "height": int(info["height"]),
              "phash": phash, "annotations": annotations}
    if image_key is not None:
        record["image_key"] = image_key
    return record


def read_sa1b(source: str | Path) -> Iterator[dict | Skipped]:
    """Writer-ready records from an SA-1B folder or tar shard.

    The sha256 image_id comes from `image_keys.parquet` when the folder has one (our exports),
    otherwise from the image file named by file_name, which must then sit beside the JSON.
    A record that cannot be read (bad JSON, a missing image) yields a Skipped with the
    reason; a source that is neither a folder nor a tar file is a ValueError.
    """
    source = Path(source)
    if source.is_file() and tarfile.is_tarfile(source):
        yield from _read_tar(source)
        return
    if not source.is_dir():
        raise ValueError(f"{source}: not an SA-1B folder or tar shard")
    keys = _key_table(source / KEY_TABLE)
    for path in sorted(source.glob("*.json")):
        try:
            record = _folder_record(path, keys)
        except (OSError, ValueError, KeyError, TypeError) as e:
            record = Skipped(str(path), f"bad_record: {type(e).__name__}: {e}")
        yield record


def _folder_record(path: Path, keys: dict[int, dict]) -> dict | Skipped:
    doc = json.loads(path.read_bytes())
    known = keys.get(doc["image"]["image_id"])
    if known is not None:
        return from_sa1b(doc, known["image_id"], known["uri"], known["phash"], known["image_key"])
    image_path = path.parent / doc["image"]["file_name"]
    if not image_path.is_file():
        return Skipped(str(path), f"missing: image {image_path.name} not found and no {KEY_TABLE} entry")
    sha, phash = image_identity(image_path.read_bytes())
    return from_sa1b(doc, sha, str(image_path), phash)


def _read_tar(path: Path) -> Iterator[dict | Skipped]:
    """SA-1B shards hold sa_N.jpg next to sa_N.json; pair them as they stream by."""
    images: dict[str, bytes] = {}
    docs: dict[str, dict] = {}
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = os.path.basename(member.name)
            data = tar.extractfile(member).read()
            if name.endswith(".json"):
                try:
                    doc = json.loads(data)
                    docs[doc["image"]["file_name"]] = doc
                except (ValueError, KeyError, TypeError) as e:
                    yield Skipped(f"{path}#{name}", f"bad_record: {type(e).__name__}: {e}")
            else:
                images[name] = data
            for file_name in [f for f in docs if f in images]:
                sha, phash = image_identity(images.pop(file_name))
                try:
                    record = from_sa1b(docs.pop(file_name), sha, f"{path}#{file_name}", phash)
                except (ValueError, KeyError, TypeError) as e:
                    record = Skipped(f"{path}#{file_name}", f"bad_record: {type(e).__name__}: {e}")
                yield record
    for file_name in sorted(docs):
        yield Skipped(f"{path}#{file_name}", "missing: the shard has no image for this record")


def _key_table(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    return {row["image_key"]: row for row in pq.read_table(path).to_pylist()}


def import_sa1b(sources: Iterable[str | Path], writer, chunk_images: int = 1000) -> list[int]:
    """Commit SA-1B folders / tar shards through a DatasetWriter; returns the versions made."""
    return writer.commit_all((r for s in sources for r in read_sa1b(s)), chunk_images)
