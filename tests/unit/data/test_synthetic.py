"""The captioned-shapes generator: determinism, caption paraphrases, and captions that match the pixels."""

import numpy as np
import pytest

from dual_encoder.data.sources import read_source
from dual_encoder.data.synthetic import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    caption_scene,
    example_queries,
    generate_synthetic,
    render_scene,
    sample_scene,
)


def _files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    first = _files(generate_synthetic(tmp_path / "a", 12, seed=3, image_size=32).parent)
    again = _files(generate_synthetic(tmp_path / "b", 12, seed=3, image_size=32).parent)
    other = _files(generate_synthetic(tmp_path / "c", 12, seed=4, image_size=32).parent)
    assert first == again
    assert len(first) == 13 and "captions.csv" in first and "images/000011.png" in first
    assert all(first[name] != other[name] for name in first)


def test_output_is_a_csv_source_with_at_least_three_distinct_captions_per_image(tmp_path):
    captions = generate_synthetic(tmp_path, 30, seed=0, image_size=32)
    result = read_source("csv", captions, captions.parent / "images")
    assert len(result.records) == 30 and not result.skipped
    for record in result.records:
        assert record.path.is_file()
        assert 3 <= len(record.captions) == len(set(record.captions)) <= 5


def _mentions(caption, words):
    return any(word in caption for word in words)


def test_every_caption_names_each_objects_size_colour_shape_and_position():
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(200):
        scene = sample_scene(rng)
        counts.add(len(scene))
        assert len({obj.position for obj in scene}) == len(scene)  # one object per grid cell
        for caption in caption_scene(scene, rng, 4):
            for obj in scene:
                assert _mentions(caption, COLOURS[obj.colour][1]), (caption, obj)
                assert _mentions(caption, SHAPES[obj.shape][1]), (caption, obj)
                assert _mentions(caption, SIZES[obj.size][1]), (caption, obj)
                assert _mentions(caption, POSITIONS[obj.position].phrases + POSITIONS[obj.position].labels)
    assert counts == {1, 2, 3}


def _cell(pixels, position):
    third = pixels.shape[0] // 3
    return pixels[position.row * third :, position.column * third :][:third, :third]


def _close_to(pixels, rgb, tolerance=45):
    return np.abs(pixels.astype(int) - np.array(rgb)).max(axis=-1) <= tolerance


def _extent(mask):
    rows, columns = np.nonzero(mask)
    return max(rows.max() - rows.min(), columns.max() - columns.min()) + 1 if rows.size else 0


def test_what_the_captions_say_is_visible_in_the_pixels():
    rng = np.random.default_rng(1)
    extents = {"small": [], "large": []}
    for _ in range(150):
        scene = sample_scene(rng)
        pixels = np.asarray(render_scene(scene, 63, rng))
        assert pixels.shape == (63, 63, 3)
        occupied = {obj.position for obj in scene}
        for obj in scene:  # the object's colour is in its cell, as big as its size says
            mask = _close_to(_cell(pixels, POSITIONS[obj.position]), COLOURS[obj.colour][0])
            assert mask.sum() > 10, obj
            extents[obj.size].append(_extent(mask))
        for name, position in POSITIONS.items():  # and no object colour is in an empty cell
            if name not in occupied:
                assert all(_close_to(_cell(pixels, position), rgb).sum() < 3 for rgb, _ in COLOURS.values()), name
    assert min(extents["large"]) > max(extents["small"])  # "large" and "small" are unambiguous


def test_scenes_are_varied():
    rng = np.random.default_rng(2)
    scenes = [sample_scene(rng) for _ in range(2000)]
    assert len({frozenset(scene) for scene in scenes}) > 0.97 * len(scenes)  # identical images are rare
    drawn = {(obj.shape, obj.colour, obj.size, obj.position) for scene in scenes for obj in scene}
    assert {d[0] for d in drawn} == set(SHAPES) and {d[1] for d in drawn} == set(COLOURS)
    assert {d[2] for d in drawn} == set(SIZES) and {d[3] for d in drawn} == set(POSITIONS)
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8


def test_example_queries_are_deterministic_captions():
    queries = example_queries(5, seed=1)
    assert queries == example_queries(5, seed=1) != example_queries(5, seed=2)
    assert len(set(queries)) == 5 and all(isinstance(q, str) and q for q in queries)


def test_num_images_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        generate_synthetic(tmp_path, 0)
