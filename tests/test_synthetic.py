"""The synthetic scene generator: determinism, array contracts and mask hierarchy invariants."""
from __future__ import annotations

import numpy as np
import pytest

from training.synthetic import (
    COLOURS,
    MIN_VISIBLE_AREA,
    SHAPES,
    TEXTURES,
    Scene,
    make_scene,
    make_scenes,
    scene_seed,
)

SEEDS = range(24)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [make_scene(seed, 128) for seed in SEEDS]


def _ancestors(parents: np.ndarray, index: int) -> set[int]:
    found = set()
    while parents[index] >= 0:
        index = int(parents[index])
        found.add(index)
    return found


def test_same_seed_gives_identical_scene():
    first, second = make_scene(7), make_scene(7)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.masks, second.masks)
    np.testing.assert_array_equal(first.parents, second.parents)
    assert first.names == second.names


def test_different_seeds_give_different_scenes():
    images = [make_scene(seed, 64).image for seed in range(4)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j])


def test_make_scenes_derives_one_seed_per_scene():
    streamed = list(make_scenes(3, 3, 64))
    assert len(streamed) == 3
    for index, scene in enumerate(streamed):
        np.testing.assert_array_equal(scene.image, make_scene(scene_seed(3, index), 64).image)
    assert not np.array_equal(streamed[0].image, next(make_scenes(4, 1, 64)).image)


def test_shapes_and_dtypes(scenes):
    for scene in scenes:
        count = len(scene.names)
        assert scene.image.shape == (128, 128, 3) and scene.image.dtype == np.uint8
        assert scene.image.flags.c_contiguous
        assert scene.masks.shape == (count, 128, 128) and scene.masks.dtype == bool
        assert scene.parents.shape == (count,) and scene.parents.dtype == np.int64


def test_non_square_size():
    scene = make_scene(5, (96, 160))
    assert scene.image.shape == (96, 160, 3)
    assert scene.masks.shape[1:] == (96, 160)
    assert len(scene.names) > 0


def test_every_mask_is_big_enough(scenes):
    for scene in scenes:
        assert (scene.masks.sum((1, 2)) >= MIN_VISIBLE_AREA).all()


def test_instance_counts_are_in_the_intended_range(scenes):
    counts = [len(scene.names) for scene in scenes]
    assert min(counts) >= 1
    assert 3 <= np.mean(counts) <= 20


def test_parents_come_first_and_contain_their_parts(scenes):
    for scene in scenes:
        for index, parent in enumerate(scene.parents):
            assert -1 <= parent < index
            if parent >= 0:
                part, whole = scene.masks[index], scene.masks[parent]
                assert not (part & ~whole).any()
                assert (whole & ~part).any(), "a parent must show more than its part"


def test_hierarchy_has_parts_and_subparts(scenes):
    depths = []
    for scene in scenes:
        depths += [len(_ancestors(scene.parents, index)) for index in range(len(scene.parents))]
    assert {0, 1, 2} <= set(depths)
    assert max(depths) <= 2


def test_only_ancestors_and_descendants_overlap(scenes):
    for scene in scenes:
        flat = scene.masks.reshape(len(scene.masks), -1).astype(np.int32)
        overlaps = flat @ flat.T
        for i in range(len(flat)):
            related = _ancestors(scene.parents, i)
            for j in range(i):
                if j not in related:
                    assert overlaps[i, j] == 0, (scene.names[i], scene.names[j])


def test_names_use_the_vocabularies(scenes):
    for scene in scenes:
        for name in scene.names:
            colour, texture, shape = name.split()
            assert colour in COLOURS and texture in TEXTURES and shape in SHAPES


def test_objects_differ_from_what_surrounds_them(scenes):
    # Not a guarantee for every object (occlusion and textures interfere), but most leaf
    # instances should stand out from the ring of pixels just outside them.
    contrasts = []
    for scene in scenes:
        image = scene.image.astype(np.float32)
        has_parts = set(scene.parents.tolist())
        for index, mask in enumerate(scene.masks):
            if index in has_parts:
                continue
            ring = np.zeros_like(mask)
            ring[1:] |= mask[:-1]
            ring[:-1] |= mask[1:]
            ring[:, 1:] |= mask[:, :-1]
            ring[:, :-1] |= mask[:, 1:]
            ring &= ~mask
            if ring.any():
                contrasts.append(np.linalg.norm(image[mask].mean(0) - image[ring].mean(0)))
    assert np.mean(np.array(contrasts) > 40) > 0.75
