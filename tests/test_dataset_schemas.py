"""Record shapes: pydantic models and Arrow schemas agree; ids; RLE string parsing."""
import hashlib

import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as coco_mask

from dataset.synthetic import blob_masks, encode_masks, image_records
from dataset.validation import rle_counts
from schemas import (
    IMAGES, MASK, TABLES, ImageRecord, MaskAnnotation, annotation_id, assign_image_keys, conform,
    natural_image_key, split_annotation_id, to_records, to_table,
)


def _sha(i):
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_models_and_arrow_schemas_name_the_same_fields():
    for name, (schema, model) in TABLES.items():
        assert schema.names == list(model.model_fields), name
    assert [f.name for f in MASK] == list(MaskAnnotation.model_fields)


def test_records_round_trip_through_arrow():
    rec = image_records(1, 3)[0]
    rec["image_key"] = natural_image_key(rec["image_id"])
    for i, a in enumerate(rec["annotations"]):
        a.update(id=annotation_id(rec["image_key"], i), stage="auto", round=2)
    model = ImageRecord.model_validate(rec)
    table = to_table([model])
    assert table.schema.equals(IMAGES)
    assert to_table([rec]).equals(table)  # dicts take the same path without a model
    assert to_records(table) == [model]
    # Delta hands back wider types; conform restores ours.
    wide = table.cast(pa.schema([pa.field(f.name, pa.large_string()) if f.type == pa.string() else f
                                 for f in IMAGES]))
    assert conform(wide).equals(table)


def test_arrow_rejects_a_missing_required_field():
    rec = image_records(1, 1)[0]
    rec["image_key"] = 1
    del rec["annotations"][0]["area"]
    rec["annotations"][0].update(id=1, stage="auto", round=0)
    with pytest.raises(ValueError, match=r"annotations\[\]\.area"):
        to_table([rec])


def test_image_id_must_be_sha256():
    with pytest.raises(ValueError):
        ImageRecord(image_id="abc", image_key=0, uri="x", width=1, height=1)


def test_image_keys_probe_past_collisions_and_are_stable():
    a, c = _sha(1), _sha(3)
    ka = natural_image_key(a)
    twin = ka.to_bytes(6, "big").hex() + "f" * 52  # same top 48 bits as a
    assert natural_image_key(twin) == ka
    table = {ka: twin}  # the twin came first and holds the key
    keys = assign_image_keys([a, c, twin], owner=table.get)
    assert keys == {a: ka + 1, c: natural_image_key(c), twin: ka}  # the twin finds its own key
    # Twins new in the same batch get different keys too.
    keys = assign_image_keys([a, twin], owner=lambda k: None)
    assert keys == {a: ka, twin: ka + 1}


def test_annotation_ids_pack_image_key_and_index():
    key = natural_image_key(_sha(7))
    ids = [annotation_id(key, i) for i in range(100)]
    assert len(set(ids)) == 100 and max(ids) < 2**63
    assert split_annotation_id(ids[42]) == (key, 42)
    with pytest.raises(ValueError):
        annotation_id(key, 1 << 15)


def test_rle_counts_parses_what_pycocotools_writes():
    masks = blob_masks(60, 80, 30, np.random.default_rng(1))
    masks[0] = True  # starts set: an empty first run
    masks[1] = False
    for m, rle in zip(masks, encode_masks(masks)):
        counts = rle_counts(rle["counts"])
        assert counts.sum() == 60 * 80 and counts[1::2].sum() == m.sum()
        back = coco_mask.frPyObjects({"size": [60, 80], "counts": counts.astype(np.uint32)}, 60, 80)
        assert back["counts"].decode() == rle["counts"]
    assert rle_counts("ab\x7f") is None  # outside the alphabet
    assert rle_counts("0i") is None  # ends inside a multi-char count
