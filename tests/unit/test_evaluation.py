"""Evaluation: scene metadata through prepare, full-caption metrics, and judged query sets against a gallery."""

import json

import numpy as np
import pytest

from dual_encoder.config import DataConfig
from dual_encoder.data.judgements import QuerySet, QuerySetError
from dual_encoder.data.pipeline import read_split
from dual_encoder.data.prepare import prepare_dataset
from dual_encoder.data.synthetic import SCENES_FILE, generate_synthetic, read_scenes, scene_from_json
from dual_encoder.evaluation import (
    evaluate_query_set,
    evaluate_split,
    format_judged_table,
    full_caption_mask,
    match_documents,
)
from dual_encoder.metrics import judged_metrics
from dual_encoder.models import build_dual_encoder

from ..tiny import TINY_MODEL


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-with-scenes")
    captions = generate_synthetic(root / "shapes", 30, seed=0, image_size=32)
    prepare_dataset(
        "csv", captions, captions.parent / "images", root / "prepared", DataConfig(validation_fraction=0.3),
        progress=False, metadata=captions.parent / SCENES_FILE,
    )  # fmt: skip
    return root


def test_scene_metadata_round_trips_through_prepare(shapes):
    scenes = read_scenes(shapes / "shapes" / SCENES_FILE)
    for split in ("train", "validation"):
        info = read_split(shapes / "prepared", split)
        assert info.num_images and all(meta is not None for meta in info.metadata)
        for image_id, meta, captions in zip(info.image_ids, info.metadata, info.captions):
            assert scene_from_json(meta["objects"]) == scenes[image_id]
            assert meta["full_captions"] and set(meta["full_captions"]) <= set(captions)


def test_changed_metadata_makes_prepare_run_again(shapes, tmp_path):
    scenes_file = shapes / "shapes" / SCENES_FILE
    rows = [json.loads(line) for line in scenes_file.read_text().splitlines()]
    rows[0]["note"] = "edited"
    edited = tmp_path / "scenes.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    captions = shapes / "shapes" / "captions.csv"
    out = tmp_path / "prepared"
    args = ("csv", captions, captions.parent / "images", out, DataConfig(validation_fraction=0.3))
    assert not prepare_dataset(*args, progress=False, metadata=scenes_file).skipped_now
    assert prepare_dataset(*args, progress=False, metadata=scenes_file).skipped_now
    assert not prepare_dataset(*args, progress=False, metadata=edited, overwrite=True).skipped_now


def test_a_bad_metadata_line_is_named(shapes, tmp_path):
    from dual_encoder.data.sources import DataError

    bad = tmp_path / "scenes.jsonl"
    bad.write_text('{"image": "000000.png"}\n{"objects": []}\n')
    captions = shapes / "shapes" / "captions.csv"
    with pytest.raises(DataError, match=r"scenes.jsonl:2: expected an object with one of"):
        prepare_dataset("csv", captions, captions.parent / "images", tmp_path / "p", DataConfig(), progress=False, metadata=bad)


def test_caption_metrics_use_only_full_captions_where_marked(shapes):
    info = read_split(shapes / "prepared", "validation")
    mask = full_caption_mask(info)
    total = sum(len(c) for c in info.captions)
    assert mask is not None and 0 < mask.sum() < total
    model = build_dual_encoder(TINY_MODEL, captions=[c for caps in info.captions for c in caps])
    metrics = evaluate_split(model, shapes / "prepared", "validation")
    assert metrics["captions"] == "full" and metrics["num_captions"] == int(mask.sum())


def test_documents_match_by_id_or_trailing_path():
    keys = [["a/images/000001.png"], ["b/images/000001.png"], ["img-7", "/data/x/cat.jpg"]]
    assert match_documents(["img-7", "x/cat.jpg", "cat.jpg", "nothere.png"], keys) == {"img-7": 2, "x/cat.jpg": 2, "cat.jpg": 2}
    assert match_documents(["a/images/000001.png"], keys) == {"a/images/000001.png": 0}
    with pytest.raises(QuerySetError, match="'000001.png' matches 2 gallery images"):
        match_documents(["000001.png"], keys)


def test_query_set_metrics_per_group_equal_the_library_on_the_same_ranking():
    gallery = np.eye(4, dtype=np.float32)
    keys = [[f"{i}.png"] for i in range(4)]
    vectors = {"q-star": [0.9, 0.8, 0.1, 0.0], "q-ring": [0.0, 0.1, 0.2, 0.9], "q-none": [1, 0, 0, 0]}
    query_set = QuerySet(
        queries={"s": "q-star", "r": "q-ring", "n": "q-none"},
        groups={"s": "shape", "r": "shape+colour", "n": "shape"},
        qrels={"s": {"0.png": 1, "2.png": 1}, "r": {"3.png": 1, "9.png": 1}, "n": {"elsewhere.png": 1}},
    )

    def encode(texts):
        return np.array([vectors[t] for t in texts], dtype=np.float32)

    result = evaluate_query_set(encode, gallery, keys, query_set, chance_runs=2)
    direct = judged_metrics(encode(["q-star", "q-ring"]) @ gallery.T, [{0: 1, 2: 1}, {3: 1}])
    assert result["queries_without_relevant"] == 1  # "n" judges no image of this gallery
    assert result["groups"]["shape"]["queries"] == 1
    assert result["groups"]["shape"]["P@10"] == pytest.approx(direct["P@10"][0])
    assert result["groups"]["shape+colour"]["MAP"] == pytest.approx(1.0)
    assert result["all"]["nDCG@10"] == pytest.approx(direct["nDCG@10"].mean())
    assert 0 < result["all"]["chance"]["P@10"] < 1
    table = format_judged_table(result)
    assert "shape+colour" in table and "all queries" in table and "chance" in table


def test_no_judged_image_in_the_gallery_is_an_error():
    query_set = QuerySet({"q": "a star"}, {"q": "all"}, {"q": {"x.png": 1}})
    with pytest.raises(QuerySetError, match="no query has a relevant image in this gallery"):
        evaluate_query_set(lambda t: np.ones((len(t), 2)), np.ones((3, 2)), [["a.png"], ["b.png"], ["c.png"]], query_set)
