"""Model directories: save -> load gives identical embeddings, offline; fingerprints; safe replacement."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dual_encoder.model_config import (
    ApplicationConfig, HeadsConfig, KerasHubBertConfig, ModelConfig, SmallCnnConfig, TFHubConfig,
)  # fmt: skip
from dual_encoder.models import ModelDirectoryError, build_dual_encoder, load_model, model_fingerprint, save_model
from dual_encoder.models.io import _hash_directory, model_image_size

from .conftest import CAPTIONS, tiny_image


@pytest.fixture
def model(tiny_config):
    model = build_dual_encoder(tiny_config, captions=CAPTIONS)
    model.contrastive_loss.log_logit_scale.assign(3.0)  # a learned temperature must survive the round trip
    return model


def test_save_then_load_gives_identical_embeddings(model, tmp_path, images, assert_same_embeddings):
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert loaded.model_config == model.model_config
    assert loaded.vocabulary == model.vocabulary
    assert float(loaded.contrastive_loss.log_logit_scale) == 3.0
    assert_same_embeddings(model, loaded, images, CAPTIONS)
    fresh = build_dual_encoder(model.model_config, captions=CAPTIONS)
    assert not np.allclose(fresh.encode_image(images), model.encode_image(images))  # the weights did load


def test_directory_layout_and_config_file(model, tmp_path):
    directory = save_model(model, tmp_path / "model")
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.json", "fingerprint.json", "model.weights.h5", "vocabulary.json",
    ]  # fmt: skip
    saved = json.loads((directory / "config.json").read_text())
    assert saved["format_version"] == 2 and saved["image_size"] == 32
    assert ModelConfig.from_dict(saved["model"]) == model.model_config
    assert saved["assets"] == {}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directory left behind


def test_fingerprint_is_recorded_stable_and_detects_tampering(model, tmp_path):
    save_model(model, tmp_path / "a")
    save_model(model, tmp_path / "b")
    fingerprint = model_fingerprint(tmp_path / "a")
    assert len(fingerprint) == 64
    model.contrastive_loss.log_logit_scale.assign(2.0)
    save_model(model, tmp_path / "c")
    assert model_fingerprint(tmp_path / "c") != fingerprint
    config_path = tmp_path / "a" / "config.json"
    config_path.write_text(config_path.read_text().replace('"embed_dim": 16', '"embed_dim": 17'))
    with pytest.raises(ModelDirectoryError, match="modified after it was saved"):
        load_model(tmp_path / "a")


def test_saving_over_a_model_replaces_it_but_other_directories_are_refused(model, tmp_path, images):
    save_model(model, tmp_path / "model")
    model.contrastive_loss.log_logit_scale.assign(1.0)
    save_model(model, tmp_path / "model")
    assert float(load_model(tmp_path / "model").contrastive_loss.log_logit_scale) == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "cat.jpg").write_bytes(b"not a model")
    with pytest.raises(ModelDirectoryError, match="not a saved model: not replacing it"):
        save_model(model, precious)
    assert (precious / "cat.jpg").read_bytes() == b"not a model"


def test_loading_a_non_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelDirectoryError, match="is not a saved model directory"):
        load_model(tmp_path)


def test_keras_hub_model_loads_from_its_own_copy_of_the_preset(bert_preset, tmp_path, images, assert_same_embeddings):
    preset = tmp_path / "preset"
    shutil.copytree(bert_preset, preset)
    config = ModelConfig(
        image=tiny_image(),
        text=KerasHubBertConfig(preset=str(preset), pooling="cls", trainable=True, sequence_length=8),
        heads=HeadsConfig(embed_dim=16),
    )
    model = build_dual_encoder(config)
    model.text_encoder.backbone.weights[0].assign(model.text_encoder.backbone.weights[0] * 2)  # "fine-tuned"
    save_model(model, tmp_path / "model")
    shutil.rmtree(preset)  # loading must not need the original preset
    loaded = load_model(tmp_path / "model")
    assert_same_embeddings(model, loaded, images, ["a red circle", "blue squares"])
    assert json.loads((tmp_path / "model" / "config.json").read_text())["assets"] == {"text.preset": "assets/text_preset"}


def test_tf_hub_model_loads_from_its_own_copy_of_the_savedmodels(hub_models, tmp_path, images, assert_same_embeddings):
    for name in ("encoder", "packing"):
        shutil.copytree(hub_models[name], tmp_path / name)
    text = TFHubConfig(
        encoder=str(tmp_path / "encoder"), preprocessor=str(tmp_path / "packing"), trainable=True, sequence_length=8
    )
    config = ModelConfig(image=tiny_image(), text=text, heads=HeadsConfig(embed_dim=16))
    model = build_dual_encoder(config)
    for weight in model.text_encoder.trainable_weights:  # "fine-tuned": must come back from the weights file
        weight.assign(weight * 0.5)
    save_model(model, tmp_path / "model")
    for name in ("encoder", "packing"):
        shutil.rmtree(tmp_path / name)
    loaded = load_model(tmp_path / "model")
    assert_same_embeddings(model, loaded, images, ["a red circle", "two blue squares"])


def test_imagenet_weights_are_not_fetched_again_on_load(tiny_config, tmp_path):
    # Write a directory as a model built with image.weights="imagenet" would be saved; loading must
    # take every weight from model.weights.h5 instead of downloading.
    image = ApplicationConfig(backbone="mobilenetv3_small", size=32, weights=None, trainable=True)
    model = build_dual_encoder(dataclasses.replace(tiny_config, image=image), captions=CAPTIONS)
    save_model(model, tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    saved = json.loads(config_path.read_text())
    saved["model"]["image"]["weights"] = "imagenet"
    config_path.write_text(json.dumps(saved))
    fingerprint_path = tmp_path / "model" / "fingerprint.json"  # re-sign the edited directory
    fingerprint_path.write_text(json.dumps({"sha256": _hash_directory(tmp_path / "model")}))
    loaded = load_model(tmp_path / "model")  # no network here: a download attempt would fail
    assert loaded.model_config.image.weights is None


FLAT = Path(__file__).parents[2] / "fixtures" / "flat_v1"


def test_a_model_folder_of_format_1_loads_and_gives_identical_embeddings(tmp_path):
    """A folder written by the flat-ModelConfig code (tests/fixtures/flat_v1) is migrated on read."""
    expected = np.load(FLAT / "embeddings.npz")
    captions = json.loads((FLAT / "captions.json").read_text())
    model = load_model(FLAT / "model")
    np.testing.assert_array_equal(model.encode_image(expected["images"]), expected["image_embeddings"])
    np.testing.assert_array_equal(model.encode_text(captions), expected["text_embeddings"])
    assert model.model_config.image == SmallCnnConfig(backbone="small_cnn_pooled", size=32, width=4)
    assert model.model_config.loss.name == "siglip" and model.model_config.loss.temperature == 0.1
    assert model_image_size(FLAT / "model") == 32
    # Saved again, it is written in today's format and still gives the same embeddings.
    save_model(model, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["format_version"] == 2
    again = load_model(tmp_path / "model")
    np.testing.assert_array_equal(again.encode_text(captions), expected["text_embeddings"])
    assert model_image_size(tmp_path / "model") == 32


def test_a_model_folder_of_an_unknown_format_is_refused(model, tmp_path):
    save_model(model, tmp_path / "model")
    config_path = tmp_path / "model" / "config.json"
    config_path.write_text(config_path.read_text().replace('"format_version": 2', '"format_version": 9'))
    (tmp_path / "model" / "fingerprint.json").write_text(json.dumps({"sha256": _hash_directory(tmp_path / "model")}))
    with pytest.raises(ModelDirectoryError, match="unsupported model format 9"):
        load_model(tmp_path / "model")
