"""Paired pretrained towers (KerasHub CLIP / SigLIP) from tiny presets made offline: model create -> index build
-> search, with embeddings equal to KerasHub's own."""

from __future__ import annotations

import base64
import json

import keras_hub
import numpy as np
import pytest
from PIL import Image

from dual_encoder.cli import main
from dual_encoder.data.pipeline import decode_and_resize, image_input
from dual_encoder.config import Config, ConfigError
from dual_encoder.model_config import HeadsConfig, ModelConfig, PairedConfig
from dual_encoder.models import ModelConfigError, build_dual_encoder, load_model
from tests.pretrained_presets import IMAGE_SIZE, make_clip_preset, make_siglip_preset

pytestmark = pytest.mark.slow  # each builds, saves and loads small KerasHub models (seconds to a minute)

FAMILIES = {
    "clip": (make_clip_preset, keras_hub.models.CLIPPreprocessor),
    "siglip": (make_siglip_preset, keras_hub.models.SigLIPPreprocessor),
}
TEXTS = ["a red circle", "The photo of a DOG!", "green star"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def preset(request, tmp_path_factory):
    make, preprocessor_class = FAMILIES[request.param]
    return make(tmp_path_factory.mktemp(request.param) / "preset"), preprocessor_class


def _reference(folder, preprocessor_class, images, texts):
    """KerasHub's own embeddings (L2-normalised): its preprocessor, then get_vision/text_embeddings."""
    backbone = keras_hub.models.Backbone.from_preset(str(folder))
    inputs = preprocessor_class.from_preset(str(folder))({"images": images.astype("float32"), "prompts": texts})
    image = np.asarray(backbone.get_vision_embeddings(inputs["images"]))
    text = np.asarray(backbone.get_text_embeddings(inputs["token_ids"]))
    return image / np.linalg.norm(image, axis=-1, keepdims=True), text / np.linalg.norm(text, axis=-1, keepdims=True)


def test_embeddings_equal_keras_hub_and_survive_a_model_folder(preset, tmp_path):
    folder, preprocessor_class = preset
    # Non-square and not the preset's size: the tower's own image converter must resize and normalise.
    images = np.random.default_rng(0).integers(0, 256, (3, 45, 70, 3), dtype=np.uint8)
    expected_image, expected_text = _reference(folder, preprocessor_class, images, TEXTS)

    model = build_dual_encoder(ModelConfig(paired=PairedConfig(preset=str(folder)), heads=HeadsConfig(kind="none")))
    assert model.image_size == IMAGE_SIZE
    np.testing.assert_allclose(model.encode_image(images), expected_image, atol=1e-5)
    np.testing.assert_allclose(model.encode_text(TEXTS), expected_text, atol=1e-5)
    tokens = model.tokenize(TEXTS)
    np.testing.assert_allclose(
        model.encode_token_ids(tokens["token_ids"], tokens["padding_mask"]), expected_text, atol=1e-5
    )
    # A resize that is not the converter's (plain bilinear to the preset size) gives other embeddings.
    squashed = np.asarray(model.image_encoder.backbone.get_vision_embeddings(
        np.asarray(images, "float32")[:, :IMAGE_SIZE, :IMAGE_SIZE] / 255.0))
    assert not np.allclose(squashed / np.linalg.norm(squashed, axis=-1, keepdims=True), expected_image, atol=1e-3)

    output = tmp_path / "model"
    assert main(["model", "create", "--from-keras-hub", str(folder), "--output", str(output)]) == 0
    saved = json.loads((output / "config.json").read_text())
    assert saved["model"]["heads"]["kind"] == "none" and saved["model"]["image"] is None
    assert saved["assets"] == {"paired.preset": "assets/pretrained_preset"}
    # Self-contained: the source preset may go away.
    for path in sorted(folder.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    try:
        loaded = load_model(output)
        np.testing.assert_allclose(loaded.encode_image(images), expected_image, atol=1e-5)
        np.testing.assert_allclose(loaded.encode_text(TEXTS), expected_text, atol=1e-5)
    finally:
        make = FAMILIES["clip" if preprocessor_class is keras_hub.models.CLIPPreprocessor else "siglip"][0]
        make(folder)  # the module's other tests use the same preset


def test_model_create_index_build_search(preset, tmp_path, capsys):
    folder, _ = preset
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for index in range(5):
        Image.fromarray(rng.integers(0, 256, (40 + index, 60, 3), dtype=np.uint8)).save(photos / f"p{index}.png")
    model_dir, index_dir = tmp_path / "model", tmp_path / "index"
    assert main(["model", "create", "--from-keras-hub", str(folder), "--output", str(model_dir)]) == 0
    # An existing model folder is not replaced without --overwrite; a folder of something else never.
    assert main(["model", "create", "--from-keras-hub", str(folder), "--output", str(model_dir)]) == 2
    assert main(["model", "create", "--from-keras-hub", str(folder), "--output", str(photos), "--overwrite"]) == 2
    assert main(["index", "build", "--model", str(model_dir), "--images", str(photos), "--output", str(index_dir),
                 "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["search", "a red circle", "--index", str(index_dir), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    # The index's scores are the model's: the query against each image as the index pipeline decodes it.
    model = load_model(model_dir)
    query = np.asarray(model.encode_text(["a red circle"]))[0]
    names = [f"p{i}.png" for i in range(5)]
    images = np.stack([decode_and_resize((photos / name).read_bytes(), image_input(model)) for name in names])
    scores = np.asarray(model.encode_image(images)) @ query
    assert [hit["path"].rsplit("/", 1)[-1] for hit in hits] == [names[i] for i in np.argsort(-scores)[:3]]
    np.testing.assert_allclose([hit["score"] for hit in hits], np.sort(scores)[::-1][:3], atol=1e-4)


def test_index_build_and_image_queries_resize_and_normalise_as_the_preset_does(preset, tmp_path):
    """A non-square photo: `index build` (file gallery), a prepared split, an image query and an upload to classify
    embed it exactly as KerasHub's preprocessor (crop to the aspect ratio, its interpolation, its scale and offset)
    + get_vision_embeddings."""
    from dual_encoder.config import DataConfig
    from dual_encoder.data.pipeline import make_image_dataset
    from dual_encoder.data.prepare import prepare_dataset
    from dual_encoder.index.store import ImageIndex
    from dual_encoder.search import Searcher
    from dual_encoder.serve.app import encode_uploaded_image

    folder, preprocessor_class = preset
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = np.random.default_rng(7).integers(0, 256, (2, 45, 70, 3), dtype=np.uint8)
    pixels[1] = np.random.default_rng(8).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels[0]).save(photos / "wide.png")
    Image.fromarray(np.ascontiguousarray(pixels[1].transpose(1, 0, 2))).save(photos / "tall.png")  # 70 x 45
    raw = {"wide.png": pixels[0], "tall.png": np.ascontiguousarray(pixels[1].transpose(1, 0, 2))}
    expected = {name: _reference(folder, preprocessor_class, image[None], ["a"])[0][0] for name, image in raw.items()}

    model_dir, index_dir = tmp_path / "model", tmp_path / "index"
    assert main(["model", "create", "--from-keras-hub", str(folder), "--output", str(model_dir)]) == 0
    assert main(["index", "build", "--model", str(model_dir), "--images", str(photos), "--output", str(index_dir),
                 "--quiet"]) == 0  # fmt: skip
    index = ImageIndex.load(index_dir)
    for item, vector in zip(index.items, index.embeddings):
        name = str(item.path).rsplit("/", 1)[-1]
        np.testing.assert_allclose(np.asarray(vector, np.float32), expected[name], atol=2e-3 if index.dtype == "float16" else 1e-5)
    searcher = Searcher.load(index_dir)
    for name in raw:
        np.testing.assert_allclose(searcher.encode_images([photos / name])[0], expected[name], atol=1e-5)
        upload = base64.b64encode((photos / name).read_bytes()).decode()  # POST /api/classify's image_base64
        np.testing.assert_allclose(encode_uploaded_image(searcher.model, upload, 10**6)[0], expected[name], atol=1e-5)

    # The same photos in a prepared dataset (training, evaluation and the feature cache read them this way).
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,caption\nwide.png,a red circle\ntall.png,a blue square\n")
    prepare_dataset("csv", csv, photos, tmp_path / "prepared", DataConfig(validation_fraction=0.0), progress=False)
    model = load_model(model_dir)
    batch = next(iter(make_image_dataset(tmp_path / "prepared", "train", image_size=image_input(model), batch_size=4)))
    embedded = np.asarray(model.encode_image(batch["images"]))
    for vector in embedded:  # the split's order is its own: match each row to one photo
        assert min(np.abs(vector - e).max() for e in expected.values()) < 1e-5

    # The old way (squash to a square, round to uint8, then the converter) is not the preset's: the check can fail.
    squashed = np.stack([decode_and_resize((photos / name).read_bytes(), model.image_size) for name in raw])
    assert not np.allclose(np.asarray(model.encode_image(squashed)), np.stack(list(expected.values())), atol=1e-3)


def test_paired_config_section():
    config = Config.from_preset("clip-vit-b32")
    assert config.model.paired == PairedConfig(preset="clip_vit_base_patch32")
    assert config.model.heads.kind == "none"
    assert Config.from_preset("siglip2-b16-224").model.paired.preset == "siglip2_base_patch16_224"
    assert Config.from_json(config.to_json()) == config
    changed = config.with_overrides(["heads.kind=projection", "paired.sequence_length=32"])
    assert changed.model.paired == PairedConfig("clip_vit_base_patch32", 32)
    assert changed.model.heads.kind == "projection"
    with pytest.raises(ConfigError, match="heads.kind"):
        config.with_overrides(["heads.kind=linear"])
    with pytest.raises(ConfigError, match="unknown keys"):
        config.with_overrides(["paired.colour=red"])
    assert Config().model.paired is None


def test_a_preset_of_another_family_is_refused(tmp_path):
    backbone = keras_hub.models.BertBackbone(20, 1, 2, 8, 16, max_sequence_length=8)
    backbone.save_to_preset(str(tmp_path / "bert"))
    with pytest.raises(ModelConfigError, match="BertBackbone"):
        build_dual_encoder(ModelConfig(paired=PairedConfig(preset=str(tmp_path / "bert"))))


def test_classify_from_folder_and_index(preset, tmp_path, capsys):
    folder, _ = preset
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(2)
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (36, 50, 3), dtype=np.uint8)).save(photos / f"p{index}.png")
    (tmp_path / "truth.csv").write_text("path,label\n" + "".join(f"p{i}.png,{'cat' if i % 2 else 'dog'}\n" for i in range(4)))
    model_dir, index_dir = tmp_path / "model", tmp_path / "index"
    assert main(["model", "create", "--from-keras-hub", str(folder), "--output", str(model_dir)]) == 0
    assert main(["index", "build", "--model", str(model_dir), "--images", str(photos), "--output", str(index_dir),
                 "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    common = ["--labels", "cat,dog,red star", "--templates", "imagenet", "--top-k", "2", "--json",
              "--truth", str(tmp_path / "truth.csv")]  # fmt: skip
    assert main(["classify", "--model", str(model_dir), "--images", str(photos), *common]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert main(["classify", "--index", str(index_dir), *common]) == 0
    from_index = json.loads(capsys.readouterr().out)
    # The index's stored embeddings are the ones the folder gives.
    assert from_folder["accuracy"] == from_index["accuracy"]
    for a, b in zip(from_folder["predictions"], from_index["predictions"], strict=True):
        assert a["path"] == b["path"] and [x["label"] for x in a["labels"]] == [x["label"] for x in b["labels"]]
        np.testing.assert_allclose([x["score"] for x in a["labels"]], [x["score"] for x in b["labels"]], atol=1e-5)
    assert [len(p["labels"]) for p in from_index["predictions"]] == [2] * 4
    accuracy = from_index["accuracy"]
    assert accuracy["images"] == 4 and sum(map(sum, accuracy["confusion_matrix"])) == 4
    assert (tmp_path / "truth.confusion.png").read_bytes()[:4] == b"\x89PNG"
    # Scores: the image (as the index decodes it) against the ensemble of the label's prompts.
    from dual_encoder.classify import TEMPLATES

    model = load_model(model_dir)
    first = from_index["predictions"][0]
    image = decode_and_resize((photos / first["path"].rsplit("/", 1)[-1]).read_bytes(), image_input(model))
    image_embedding = np.asarray(model.encode_image(np.asarray(image)[None]))[0]
    prompts = np.asarray(model.encode_text([t.format(first["labels"][0]["label"]) for t in TEMPLATES["imagenet"]]))
    mean = prompts.mean(axis=0)
    assert first["labels"][0]["score"] == pytest.approx(float(image_embedding @ (mean / np.linalg.norm(mean))), abs=1e-5)
    assert main(["classify", "--model", str(model_dir), "--images", str(photos), "--labels", "cat"]) == 2


def test_export_loads_without_the_package_and_equals_the_python_api(preset, tmp_path):
    import subprocess
    import sys

    from dual_encoder.search import Searcher
    from tests.e2e.test_export import STANDALONE

    folder, _ = preset
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)).save(photos / f"p{index}.png")
    model_dir, index_dir, export_dir = tmp_path / "model", tmp_path / "index", tmp_path / "export"
    assert main(["model", "create", "--from-keras-hub", str(folder), "--output", str(model_dir)]) == 0
    assert main(["index", "build", "--model", str(model_dir), "--images", str(photos), "--output", str(index_dir),
                 "--quiet"]) == 0  # fmt: skip
    assert main(["export", "--index", str(index_dir), "--output", str(export_dir)]) == 0
    # BPE (TF Text regex split) and SentencePiece run as TF Text ops in the graph.
    assert json.loads((export_dir / "export.json").read_text())["needs_tensorflow_text"] is True
    queries = ["find images of a red circle", "the photo of a dog", "green star"]
    images = sorted(str(p) for p in photos.glob("*.png"))
    run = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(export_dir), json.dumps(queries), json.dumps(images)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["modules"] == []
    searcher = Searcher.load(index_dir)
    results = searcher.search(queries, k=4)
    np.testing.assert_allclose(got["text"], searcher.encode_queries(queries), atol=1e-5)
    for result, ids, scores in zip(results, got["ids"], got["scores"]):
        assert ids == [hit.id for hit in result.hits]
        np.testing.assert_allclose(scores, [hit.score for hit in result.hits], atol=1e-5)
    pixels = np.stack([decode_and_resize(open(p, "rb").read(), image_input(searcher.model)) for p in images])
    np.testing.assert_allclose(got["image"], searcher.model.encode_image(pixels), atol=1e-5)


def test_model_create_from_a_product_preset_file_then_evaluate(preset, tmp_path, capsys):
    from dual_encoder.config import DataConfig
    from dual_encoder.data.prepare import prepare_dataset
    from dual_encoder.data.synthetic import generate_synthetic

    folder, preprocessor_class = preset
    recipe = tmp_path / "my-clip.json"  # what dual_encoder/presets/clip-vit-b32.json is, with a local preset folder
    recipe.write_text(json.dumps({"model": {"paired": {"preset": str(folder)}, "heads": {"kind": "none"}}}))
    model_dir = tmp_path / "model"
    shorter = ["model", "create", "--preset", str(recipe), "--output", str(model_dir),
               "--set", "paired.sequence_length=10"]  # fmt: skip
    if preprocessor_class is keras_hub.models.SigLIPPreprocessor:
        assert main(shorter) == 2  # SigLIP's text encoder takes exactly its max_sequence_length (12)
        assert "sequence_length 10 does not fit" in capsys.readouterr().err
        assert not model_dir.exists()
        assert main(shorter[:-2]) == 0
    else:
        assert main(shorter) == 0
        assert load_model(model_dir).tokenize(["a red circle"])["token_ids"].shape == (1, 10)
    assert main(["model", "create", "--preset", str(recipe), "--from-keras-hub", str(folder),
                 "--output", str(tmp_path / "other")]) == 2  # fmt: skip
    captions_csv = generate_synthetic(tmp_path / "synthetic", 12, seed=0, image_size=32)
    prepared = tmp_path / "prepared"
    prepare_dataset("csv", captions_csv, captions_csv.parent / "images", prepared, DataConfig(), progress=False)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model_dir), "--data", str(prepared), "--split", "train"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_captions"] > 0 and 0.0 <= report["t2i_recall@1"] <= report["t2i_recall@10"] <= 1.0


def test_trained_heads_on_a_frozen_pretrained_pair(tmp_path):
    """LiT-style: projection heads trained on the frozen preset's joint space (a recipe in the flat form of
    format 1, migrated on read)."""
    from dual_encoder.config import DataConfig
    from dual_encoder.data.prepare import prepare_dataset
    from dual_encoder.data.synthetic import generate_synthetic

    folder = make_clip_preset(tmp_path / "preset")
    recipe = tmp_path / "lit.json"
    recipe.write_text(json.dumps({
        "model": {"image_trainable": False, "text_trainable": False, "embed_dim": 8,
                  "pretrained": {"preset": str(folder), "heads": "trained"}},
        "train": {"batch_size": 4, "epochs": 2, "tensorboard": False},
    }))  # fmt: skip
    captions_csv = generate_synthetic(tmp_path / "synthetic", 24, seed=0, image_size=32)
    prepared = tmp_path / "prepared"
    prepare_dataset("csv", captions_csv, captions_csv.parent / "images", prepared, DataConfig(validation_fraction=0.25),
                    progress=False)  # fmt: skip
    assert main(["train", "--data", str(prepared), "--output", str(tmp_path / "run"), "--preset", str(recipe),
                 "--quiet"]) == 0  # fmt: skip
    model = load_model(tmp_path / "run")
    images = np.random.default_rng(4).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    embeddings = np.asarray(model.encode_image(images))
    assert embeddings.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, atol=1e-5)
    # The backbone stayed frozen: the tower's features are still KerasHub's own projections.
    expected, _ = _reference(folder, keras_hub.models.CLIPPreprocessor, images, ["a"])
    features = np.asarray(model.image_features(images))
    np.testing.assert_allclose(features / np.linalg.norm(features, axis=-1, keepdims=True), expected, atol=1e-5)
