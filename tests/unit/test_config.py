"""Config sections, presets and overrides."""

import dataclasses

import pytest

from dual_encoder.config import Config, ConfigError, ModelConfig, list_presets


def test_every_preset_loads_and_round_trips_through_json():
    assert {"synthetic-small", "coco-xception-bert"} <= set(list_presets())
    for name in list_presets():
        config = Config.from_preset(name)
        assert Config.from_json(config.to_json()) == config


def test_coco_preset_is_the_keras_recipe():
    model = Config.from_preset("coco-xception-bert").model
    train = Config.from_preset("coco-xception-bert").train
    assert (model.image_backbone, model.image_size, model.image_trainable) == ("xception", 299, False)
    assert (model.embed_dim, model.num_projection_layers, model.dropout) == (256, 1, 0.1)
    assert (train.batch_size, train.learning_rate, train.weight_decay) == (256, 1e-3, 1e-3)


def test_overrides_parse_json_values_and_find_the_section():
    config = Config().with_overrides(["loss=siglip", "batch_size=512", "mixed_precision=true", "image_weights=null"])
    assert config.model.loss == "siglip"
    assert config.train.batch_size == 512
    assert config.train.mixed_precision is True
    assert config.model.image_weights is None
    assert Config().with_overrides(["index.dtype=float16"]).index.dtype == "float16"


@pytest.mark.parametrize("override", ["nonsense=1", "loss", "model.nope=1", "bogus.loss=clip"])
def test_bad_overrides_are_clear_errors(override):
    with pytest.raises(ConfigError):
        Config().with_overrides([override])


def test_unknown_preset_and_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        Config.from_preset("no-such-preset")
    with pytest.raises(ConfigError, match="unknown keys"):
        Config.from_dict({"model": {"not_a_field": 1}})


def test_one_default_k_for_the_cli_the_api_and_the_page():
    assert Config().serve.default_k == 10
    assert Config().with_overrides(["default_k=20"]).serve.default_k == 20
    with pytest.raises(ConfigError, match="serve.default_k=0 is not allowed"):
        Config().with_overrides(["default_k=0"])


def test_sections_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().embed_dim = 3
