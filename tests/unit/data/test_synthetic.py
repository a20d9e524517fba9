"""The captioned-shapes generator: determinism, caption paraphrases, and captions that match the pixels."""

import re


import numpy as np
import pytest

from dual_encoder.data.sources import read_source
from dual_encoder.data.synthetic import (
    COLOURS,
    POSITIONS,
    REGIONS,
    SHAPES,
    SIZES,
    Mention,
    ShapeObject,
    SyntheticOptions,
    caption_scene,
    describe_scene,
    example_queries,
    fits_scene,
    is_full,
    contrast_mentions,
    caption_labels,
    mention_label,
    scene_labels,
    generate_synthetic,
    partial_mentions,
    read_scenes,
    render_caption,
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
    assert len(first) == 14 and {"captions.csv", "scenes.jsonl", "images/000011.png"} <= set(first)
    assert all(first[name] != other[name] for name in first)


def test_output_is_a_csv_source_with_the_asked_number_of_distinct_captions_per_image(tmp_path):
    captions = generate_synthetic(tmp_path, 30, seed=0, image_size=32)
    result = read_source("csv", captions, captions.parent / "images")
    assert len(result.records) == 30 and not result.skipped
    for record in result.records:
        assert record.path.is_file()
        assert 6 <= len(record.captions) == len(set(record.captions)) <= 10  # the defaults: 6-10 per image


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


# --- partial captions and scenes --------------------------------------------------------------------------------

_ALL_WORDS = {
    "colour": {w: k for k, (_, ws) in COLOURS.items() for w in ws},
    "shape": {w: k for k, (_, ws) in SHAPES.items() for w in ws},
    "size": {w: k for k, (_, ws) in SIZES.items() for w in ws},
}


def _named(caption, kind):
    """The keys of every word of `kind` the caption uses (longest words first, each span read once)."""
    found, text = set(), f" {caption.replace(',', ' ').replace(';', ' ').replace(':', ' ')} "
    for word, key in sorted(_ALL_WORDS[kind].items(), key=lambda pair: -len(pair[0])):
        while f" {word} " in text:
            found.add(key)
            text = text.replace(f" {word} ", " | ", 1)
    return found


def test_partial_captions_state_only_what_is_drawn():
    rng = np.random.default_rng(5)
    seen_partial = 0
    for _ in range(300):
        scene = sample_scene(rng)
        for caption, described in describe_scene(scene, rng, 5, partial=0.8).items():
            seen_partial += not is_full(described.mentions, scene)
            for kind, attribute in (("colour", "colour"), ("shape", "shape"), ("size", "size")):
                assert _named(caption, kind) <= {getattr(o, attribute) for o in scene}, (caption, scene)
            places = [name for name, p in POSITIONS.items() for ph in p.phrases + p.labels if f" {ph}" in f" {caption}"]
            assert all(any(o.position in REGIONS[name] for o in scene) for name in places), (caption, scene)
    assert seen_partial > 500


def test_partial_mentions_fit_their_scene_and_name_fewer_things():
    rng = np.random.default_rng(6)
    shorter = 0
    for _ in range(300):
        scene = sample_scene(rng)
        mentions = partial_mentions(scene, rng)
        assert 1 <= len(mentions) <= len(scene) and fits_scene(mentions, scene)
        caption = render_caption(mentions, len(scene), rng)
        shorter += len(caption.split()) < len(caption_scene(scene, rng, 1)[0].split())
    assert shorter > 250  # a partial caption is usually shorter than a full one


def test_the_partial_mix_is_an_option_and_full_captions_come_first():
    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng) for _ in range(200)]
    kinds = {
        p: [[is_full(d.mentions, s) for d in describe_scene(s, rng, 5, partial=p).values()] for s in scenes]
        for p in (0.0, 0.5, 1.0)
    }
    assert all(all(k) for k in kinds[0.0])  # no partial captions
    # only partial ones, but a partial draw may happen to name everything (then it is marked full, as it is)
    assert np.mean([k for image in kinds[1.0] for k in image]) < 0.05
    half = [k for image in kinds[0.5] for k in image]
    assert 0.35 < 1 - np.mean(half) < 0.6
    assert all(image[0] and image == sorted(image, reverse=True) for image in kinds[0.5])


def test_a_side_region_covers_three_cells_and_a_corner_one():
    assert REGIONS["left"] == {"top left", "left", "bottom left"} and REGIONS["top left"] == {"top left"}
    assert REGIONS["centre"] == {"centre"} and REGIONS["bottom"] == {"bottom left", "bottom", "bottom right"}
    star = ShapeObject("star", "red", "small", "top left")
    assert star.regions() == ["top left", "top", "left"]
    assert Mention(star, size=False, region="left").fits(ShapeObject("star", "red", "large", "bottom left"))
    assert not Mention(star, region="left").fits(ShapeObject("star", "red", "small", "top"))


def test_two_mentions_need_two_distinct_objects():
    star = ShapeObject("star", "red", "small", "left")
    one_star = (star,)
    two = [Mention(star, colour=False, size=False), Mention(star, size=False)]
    assert not fits_scene(two, one_star)
    assert fits_scene(two, (star, ShapeObject("star", "blue", "large", "top")))  # "a star and a red star"


def test_scenes_file_round_trips_and_counts_follow_the_option(tmp_path):
    options = SyntheticOptions(object_counts=(1.0, 0.0, 0.0), partial_captions=0.5)
    captions = generate_synthetic(tmp_path, 40, seed=2, image_size=32, options=options)
    scenes = read_scenes(tmp_path / "scenes.jsonl")
    assert len(scenes) == 40 and all(len(scene) == 1 for scene in scenes.values())
    rows = [line for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    result = read_source("csv", captions, tmp_path / "images")
    by_name = {record.path.name: record.captions for record in result.records}
    import json

    for row in map(json.loads, rows):
        assert row["full_captions"] and set(row["full_captions"]) <= set(by_name[row["image"]])
    with pytest.raises(ValueError, match="partial_captions"):
        SyntheticOptions(partial_captions=1.5)


def test_labels_say_exactly_which_single_mentions_fit_a_scene():
    rng = np.random.default_rng(8)
    scenes = [sample_scene(rng) for _ in range(300)]
    for _ in range(300):
        scene = scenes[int(rng.integers(len(scenes)))]
        mention = partial_mentions(scene, rng)[0]
        label = mention_label(mention)
        for other in scenes[:60]:
            assert (label in scene_labels(other)) == fits_scene([mention], other), (mention, other)


def test_the_scenes_file_carries_labels_for_every_caption(tmp_path):
    captions = generate_synthetic(tmp_path, 20, seed=1, image_size=32)
    import json

    rows = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    by_name = {r.path.name: r.captions for r in read_source("csv", captions, tmp_path / "images").records}
    for row in rows:
        assert set(row["caption_labels"]) == set(by_name[row["image"]])
        for labels in row["caption_labels"].values():
            assert labels and set(labels) <= set(row["labels"])  # every caption fits its own image


def test_hard_negatives_are_the_same_caption_with_one_thing_false():
    rng = np.random.default_rng(9)
    made = 0
    for _ in range(300):
        scene = sample_scene(rng)
        for caption, described in describe_scene(scene, rng, 4, partial=0.5).items():
            if described.negative is None:
                continue
            made += 1
            assert described.negative != caption
    assert made > 1000
    for _ in range(300):
        scene = sample_scene(rng)
        mentions = partial_mentions(scene, rng)
        changed = contrast_mentions(mentions, scene, rng)
        if changed is not None:
            assert fits_scene(mentions, scene) and not fits_scene(changed, scene)


def test_a_caption_that_says_how_many_objects_requires_that_count():
    rng = np.random.default_rng(10)
    seen = 0
    for _ in range(300):
        scene = sample_scene(rng)
        for caption, described in describe_scene(scene, rng, 5, partial=0.5).items():
            labels = caption_labels(described, scene)
            assert set(labels) <= set(scene_labels(scene))
            assert described.states_count == bool(re.match(r"(one|two|three) shapes?( including|[:,])", caption)), caption
            if described.states_count:
                seen += 1
                other = tuple(o for o in sample_scene(rng) if o.shape != "x")
                if len(other) != len(scene):  # a scene with another count never has the count label
                    assert f"count={len(scene)}" in labels and not set(labels) <= set(scene_labels(other))
    assert seen > 50
