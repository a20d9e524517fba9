"""Config sections, tower families, presets, overrides, and configs of format 1 (a flat model section)."""

import dataclasses
import json
from pathlib import Path

import pytest

from dual_encoder.config import CONFIG_FORMAT, Config, ConfigError, list_presets
from dual_encoder.model_config import (
    ApplicationConfig, HeadsConfig, KerasHubBertConfig, LossConfig, ModelConfig, PairedConfig, SmallCnnConfig,
    SmallTransformerConfig, TFHubConfig,
)  # fmt: skip

FLAT = Path(__file__).parents[1] / "fixtures" / "flat_v1"


def test_every_preset_loads_and_round_trips_through_json():
    assert {"synthetic-small", "coco-xception-bert", "clip-vit-b32"} <= set(list_presets())
    for name in list_presets():
        config = Config.from_preset(name)
        assert Config.from_json(config.to_json()) == config
        assert json.loads(config.to_json())["format_version"] == CONFIG_FORMAT


def test_presets_are_written_in_sections():
    for path in Path("dual_encoder/presets").glob("*.json"):
        model = json.loads(path.read_text())["model"]
        assert set(model) <= {"image", "text", "paired", "heads", "loss"}, path.name


def test_coco_preset_is_the_keras_recipe():
    config = Config.from_preset("coco-xception-bert")
    assert config.model.image == ApplicationConfig(backbone="xception", size=299, weights="imagenet", trainable=False)
    assert config.model.text == KerasHubBertConfig(preset="bert_small_en_uncased", sequence_length=128, pooling="cls")
    assert config.model.heads == HeadsConfig(embed_dim=256, layers=1, dropout=0.1)
    assert (config.train.batch_size, config.train.learning_rate, config.train.weight_decay) == (256, 1e-3, 1e-3)


def test_each_family_declares_what_it_needs():
    assert SmallTransformerConfig.needs_vocabulary and not SmallTransformerConfig.needs_tensorflow_text
    assert KerasHubBertConfig.needs_tensorflow_text and TFHubConfig.needs_tensorflow_text
    assert not KerasHubBertConfig.needs_vocabulary
    assert PairedConfig.joint_space and PairedConfig.towers == ("image", "text")
    clip = Config.from_preset("clip-vit-b32").model
    assert clip.tower("image") is clip.tower("text") is clip.paired
    assert (clip.image, clip.text, clip.heads.kind) == (None, None, "none")


# --- overrides -------------------------------------------------------------------------------------------------


def test_overrides_address_sections():
    config = Config().with_overrides(
        ["text.width=64", "model.image.size=48", "heads.embed_dim=32", "loss.name=siglip", "train.epochs=3",
         "loss.gather_negatives=false", "index.dtype=float16"]
    )  # fmt: skip
    assert (config.model.text.width, config.model.image.size, config.model.heads.embed_dim) == (64, 48, 32)
    assert (config.model.loss.name, config.model.loss.gather_negatives) == ("siglip", False)
    assert (config.train.epochs, config.index.dtype) == (3, "float16")


def test_flat_names_of_format_1_are_aliases():
    config = Config().with_overrides(
        ["image_size=32", "embed_dim=8", "loss=siglip", "batch_size=512", "mixed_precision=true", "image_weights=null",
         "dropout=0.2", "gather_negatives=false", "model.text_width=16"]
    )  # fmt: skip
    assert (config.model.image.size, config.model.heads.embed_dim, config.model.loss.name) == (32, 8, "siglip")
    assert (config.model.heads.dropout, config.model.text.dropout) == (0.2, 0.2)  # both, as the flat field was
    assert (config.model.text.width, config.model.loss.gather_negatives) == (16, False)
    assert (config.train.batch_size, config.train.mixed_precision) == (512, True)


def test_a_backbone_of_another_family_brings_that_family_s_section():
    config = Config().with_overrides(["text.preset=bert_tiny_en_uncased", "text.backbone=keras_hub", "image.backbone=resnet50"])
    assert config.model.text == KerasHubBertConfig(preset="bert_tiny_en_uncased")
    assert config.model.image == ApplicationConfig(backbone="resnet50")
    hub = Config().with_overrides(["text_backbone=tf_hub", "text_preset=enc", "text_preprocessor=pre"])  # format 1 names
    assert hub.model.text == TFHubConfig(encoder="enc", preprocessor="pre")
    same_family = Config().with_overrides(["image.width=8", "image.backbone=small_cnn_detectors"])
    assert same_family.model.image == SmallCnnConfig(backbone="small_cnn_detectors", width=8)


def test_a_paired_preset_replaces_both_towers_and_back():
    config = Config().with_overrides(["paired.preset=clip_vit_base_patch32", "heads.kind=none"])
    assert config.model.paired == PairedConfig("clip_vit_base_patch32") and config.model.image is None
    lit = Config.from_preset("clip-vit-b32").with_overrides(["paired.text_trainable=true", "paired.sequence_length=32"])
    assert (lit.model.paired.text_trainable, lit.model.paired.sequence_length) == (True, 32)
    assert Config.from_preset("clip-vit-b32").with_overrides(["model.pretrained.preset=x"]).model.paired.preset == "x"
    back = Config.from_preset("clip-vit-b32").with_overrides(["paired=null", "heads.kind=projection"])
    assert back.model == ModelConfig()


@pytest.mark.parametrize(
    "override, message",
    [
        ("text.widht=64", "'model.text': ['widht']; model.text (the small_transformer text tower) has backbone, "
                          "vocabulary_size, sequence_length, width, layers, heads, dropout, pooling, trainable"),
        ("image.width=64", None),  # fine: small_cnn has a width
        ("text.preset=x", "model.text (the small_transformer text tower) has backbone"),
        ("towers.width=1", "unknown config key 'towers.width': give section.key, with a section of data, train, "
                           "index, serve, image, text, paired, heads, loss"),
        ("nonsense=1", "unknown config key 'nonsense'"),
        ("loss", "not of the form key=value"),
        ("model.nope=1", "unknown config key 'model.nope'"),
        ("train.nope=1", "'train': ['nope']; train has batch_size, captions_per_image, epochs"),
        ("heads.kind=none", "heads.kind=none needs towers that share one embedding space"),
        ("image.backbone=vit", 'model.image.backbone="vit" is not allowed: expected one of small_cnn, small_cnn_pooled'),
        ("text.width=0", "model.text.width=0 is not allowed: expected an integer >= 1"),
        ("text_preprocessor=x", "'text_preprocessor' (a flat name of format 1) fits none of this model's sections"),
        ("model.pretrained.heads=none", "is now heads.kind"),
    ],
)
def test_a_bad_section_or_key_is_one_line_naming_what_is_allowed(override, message):
    if message is None:
        Config().with_overrides([override])
        return
    with pytest.raises(ConfigError) as error:
        Config().with_overrides([override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_image_keys_on_a_paired_model_say_where_the_towers_come_from():
    with pytest.raises(ConfigError, match="towers come from model.paired"):
        Config.from_preset("clip-vit-b32").with_overrides(["image.size=64"])


def test_unknown_preset_and_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match="unknown preset"):
        Config.from_preset("no-such-preset")
    with pytest.raises(ConfigError, match="unknown keys"):
        Config.from_dict({"model": {"not_a_field": 1}})
    with pytest.raises(ConfigError, match="unknown keys in config section 'model.heads'"):
        Config.from_dict({"model": {"heads": {"width": 1}}})
    with pytest.raises(ConfigError, match="unsupported config format_version 7"):
        Config.from_dict({"format_version": 7})


def test_one_default_k_for_the_cli_the_api_and_the_page():
    assert Config().serve.default_k == 10
    assert Config().with_overrides(["default_k=20"]).serve.default_k == 20
    with pytest.raises(ConfigError, match="serve.default_k=0 is not allowed"):
        Config().with_overrides(["default_k=0"])


def test_sections_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        HeadsConfig().embed_dim = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().image.size = 3


# --- format 1: a flat model section ------------------------------------------------------------------------------


def test_presets_of_format_1_read_as_today_s():
    for name in ("coco-xception-bert", "clip-vit-b32"):
        assert Config.load(FLAT / "presets" / f"{name}.json") == Config.from_preset(name)


def test_a_run_config_of_format_1_is_migrated():
    config = Config.load(FLAT / "run_config.json")
    assert config.model == ModelConfig(
        image=SmallCnnConfig(backbone="small_cnn_pooled", size=32, width=4),
        text=SmallTransformerConfig(vocabulary_size=30, sequence_length=8, width=8, layers=1, heads=2, dropout=0.0),
        heads=HeadsConfig(embed_dim=8, layers=1, dropout=0.0),
        loss=LossConfig(name="siglip", temperature=0.1, gather_negatives=False),  # was train.gather_negatives
    )
    assert config.train.epochs == 3
    assert Config.from_dict(config.to_dict()) == config


def test_flat_model_sections_of_each_family_migrate():
    hub = ModelConfig.from_dict({"text_backbone": "tf_hub", "text_preset": "enc", "text_preprocessor": "pre"})
    assert hub.text == TFHubConfig(encoder="enc", preprocessor="pre", sequence_length=32, pooling="mean", trainable=True)
    paired = ModelConfig.from_dict(
        {"image_trainable": False, "text_trainable": True, "pretrained": {"preset": "p", "heads": "trained", "sequence_length": 16}}
    )  # fmt: skip
    assert paired.paired == PairedConfig("p", 16, image_trainable=False, text_trainable=True)
    assert paired.heads.kind == "projection"
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelConfig.from_dict({"image_size": 32, "colour": "red"})
