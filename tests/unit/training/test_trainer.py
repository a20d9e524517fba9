"""The training loop: artifacts, best checkpoint, resume, feature cache, replicas, mixed precision."""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from dual_encoder import features as feature_cache
from dual_encoder.config import Config, TrainConfig
from dual_encoder.data.pipeline import read_split, sampled_caption_rows
from dual_encoder.evaluation import evaluate_split
from dual_encoder.models import build_dual_encoder, load_model
from dual_encoder.training.distribute import get_strategy
from dual_encoder.training.trainer import MONITOR, make_train_step, train

from tests.tiny import TINY_MODEL, locked, tiny_config

CAPTIONS = ["a red circle on the left", "a blue square", "two green triangles at the top", "a small star"]


def _weights(model):
    return {v.path: np.asarray(v) for v in model.weights}


def test_training_writes_the_best_model_history_curves_and_logs(tiny_data, tmp_path):
    result = train(tiny_config(), tiny_data, tmp_path / "run", strategy="default", progress=False)

    assert [r["epoch"] for r in result.history] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in result.history)
    for name in ("config.json", "history.json", "curves.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == result.history
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))
    # The saved model is the best epoch's: scoring it again reproduces the recorded best metric.
    model = load_model(result.model_dir)
    assert evaluate_split(model, tiny_data, "validation")[MONITOR] == pytest.approx(result.best[MONITOR], abs=1e-6)

    # Running the same command on a finished run resumes at the end and trains nothing more.
    again = train(tiny_config(), tiny_data, tmp_path / "run", strategy="default", progress=False)
    assert again.history == result.history


def test_a_run_that_learns_nothing_says_so_with_the_likely_cause(tiny_data, tmp_path, capsys):
    # 36 images, 2 epochs of 4 steps: far too little to leave chance on a 12-image validation gallery
    result = train(tiny_config(learning_rate=1e-7), tiny_data, tmp_path / "run", strategy="default", progress=False)
    printed = capsys.readouterr().out
    assert result.warning and result.warning in printed and "WARNING: training did not learn" in printed
    assert "too little training" in result.warning and "learning rate (1e-07)" in result.warning
    assert "ln(batch) = 2.08" in result.warning  # batch 8: the loss stayed at chance


def _history(losses, recalls):
    return [{"epoch": i + 1, "loss": l, "val_t2i_recall@10": r} for i, (l, r) in enumerate(zip(losses, recalls))]


def test_learning_warning_compares_recall_with_chance_and_the_loss_with_ln_batch():
    from dual_encoder.training.trainer import learning_warning

    config = tiny_config(batch_size=64)  # ln 64 = 4.16; chance recall@10 on 1,000 images = 0.01
    learnt = _history([4.1, 3.0, 1.2], [0.02, 0.4, 0.9])
    assert learning_warning(learnt, config, 6000, 1000) is None
    at_chance = learning_warning(_history([4.0, 3.9], [0.01, 0.015]), config, 600, 1000)
    assert "recall@10 peaked at 0.015 (chance 0.010)" in at_chance and "600 images and 2 epochs are 18 steps" in at_chance
    stuck = learning_warning(_history([4.16, 4.15], [0.5, 0.5]), config, 600, 1000)
    assert "never fell below 95% of ln(batch) = 4.16" in stuck
    assert learning_warning([], config, 600, 1000) is None
    siglip = Config(model=config.model.replace({"loss.name": "siglip"}), train=config.train)
    assert learning_warning(_history([17.0, 9.0], [0.5, 0.6]), siglip, 600, 1000) is None  # its loss is not ln(B)


def test_batch_larger_than_the_training_set_is_a_clear_error(tiny_data, tmp_path):
    from dual_encoder.training.trainer import TrainingError

    with pytest.raises(TrainingError, match="larger than"):
        train(tiny_config(batch_size=4096), tiny_data, tmp_path / "run", strategy="default", progress=False)


def test_loss_and_update_on_two_replicas_equal_one_device_on_the_whole_batch():
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.integers(0, 256, (8, 32, 32, 3)).astype("uint8"),
        "captions": tf.constant(CAPTIONS * 2),
    }
    results = {}
    for name in ("default", "mirrored"):
        strategy = get_strategy(name)
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_dual_encoder(TINY_MODEL, captions=CAPTIONS)
            optimizer = keras.optimizers.SGD(learning_rate=0.5)
            optimizer.build(model.trainable_variables)
        expected_loss = float(model.compute_contrastive_loss(model(batch, training=True)))
        step = make_train_step(model, optimizer, strategy)
        loss = float(step(iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch)))))
        results[name] = (expected_loss, loss, _weights(model), strategy.num_replicas_in_sync)

    single_expected, single_loss, single_weights, _ = results["default"]
    mirrored_expected, mirrored_loss, mirrored_weights, replicas = results["mirrored"]
    assert replicas == 2
    assert single_loss == pytest.approx(single_expected, rel=1e-5)
    # The loss reported under two replicas is the global-batch loss, not one replica's.
    assert mirrored_loss == pytest.approx(single_expected, rel=1e-4)
    # And the update is the single-device update on the whole batch (gathered negatives, scaled gradients).
    assert single_weights.keys() == mirrored_weights.keys()
    changed = 0
    for name, value in single_weights.items():
        np.testing.assert_allclose(mirrored_weights[name], value, atol=2e-5, err_msg=name)
        changed += not np.allclose(value, 0)
    assert changed


@pytest.mark.parametrize("per_image", [1, 3], ids=["one-caption", "three-captions-per-image"])
def test_heads_trained_on_cached_features_equal_heads_trained_with_live_frozen_backbones(tiny_data, tmp_path, per_image):
    frozen = locked(TINY_MODEL)
    runs = {}
    for cache in (True, False):
        train_config = TrainConfig(
            batch_size=8, epochs=2, feature_cache=cache, tensorboard=False, captions_per_image=per_image
        )
        config = Config(model=frozen, train=train_config)
        result = train(config, tiny_data, tmp_path / f"cache-{cache}", strategy="default", progress=False)
        runs[cache] = (result.history, _weights(load_model(result.model_dir)))

    assert list((tiny_data / "features").glob("train-*/features.npz"))
    (cached_history, cached_weights), (live_history, live_weights) = runs[True], runs[False]
    # Same seed, same examples in the same order: equal up to float32 summation order (tolerance 1e-4).
    for cached, live in zip(cached_history, live_history):
        assert cached["loss"] == pytest.approx(live["loss"], abs=1e-4)
    for name, value in live_weights.items():
        np.testing.assert_allclose(cached_weights[name], value, atol=1e-4, err_msg=name)


def test_feature_cache_is_reused_and_keyed_by_the_backbone(tiny_data, monkeypatch):
    frozen = locked(TINY_MODEL)
    keras.utils.set_random_seed(1)
    model = build_dual_encoder(frozen, captions=CAPTIONS)
    first = feature_cache.load_or_compute_features(model, tiny_data, "validation", progress=False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("features were computed again")

    monkeypatch.setattr(feature_cache, "compute_features", must_not_run)
    second = feature_cache.load_or_compute_features(model, tiny_data, "validation", progress=False)
    np.testing.assert_array_equal(first.image_features, second.image_features)
    np.testing.assert_array_equal(first.text_features, second.text_features)
    assert first.image_features.shape[0] == len(first.num_captions)
    assert first.text_features.shape[0] == first.num_captions.sum()

    keras.utils.set_random_seed(2)  # another backbone initialisation: the cache must not be reused
    other = build_dual_encoder(frozen, captions=CAPTIONS)
    with pytest.raises(AssertionError, match="computed again"):
        feature_cache.load_or_compute_features(other, tiny_data, "validation", progress=False)


def test_a_text_cache_embeds_only_the_rows_asked_for_and_fills_in_the_rest_when_needed(tiny_data, monkeypatch):
    keras.utils.set_random_seed(7)  # a backbone of its own: no other test has cached its features
    model = build_dual_encoder(locked(TINY_MODEL), captions=CAPTIONS)
    whole = feature_cache.compute_features(model, tiny_data, "validation", ("text",), progress=False).text_features
    embedded = []
    embed = feature_cache._embed_captions
    monkeypatch.setattr(
        feature_cache, "_embed_captions", lambda m, captions, *a: embedded.append(len(captions)) or embed(m, captions, *a)
    )
    load = functools.partial(feature_cache.load_or_compute_features, model, tiny_data, "validation", towers=("text",))

    rows = np.array([0, 3, 5])
    first = load(caption_rows=rows, progress=False).text_features
    assert embedded == [3]
    np.testing.assert_allclose(first[rows], whole[rows], atol=1e-5)
    assert np.isnan(np.delete(first, rows, axis=0)).all()  # never read: left unfilled, loudly

    assert np.array_equal(load(caption_rows=np.array([0, 5]), progress=False).text_features[[0, 5]], first[[0, 5]])
    assert embedded == [3]  # a subset of what is cached: nothing embedded

    filled = load(progress=False).text_features  # every row: only the missing ones are embedded, then cached
    assert embedded == [3, len(whole) - 3]
    np.testing.assert_allclose(filled, whole, atol=1e-5)
    np.testing.assert_array_equal(load(progress=False).text_features, filled)
    assert embedded == [3, len(whole) - 3]


def test_a_short_cached_run_embeds_only_the_captions_its_epochs_sample(tiny_data, tmp_path):
    keras.utils.set_random_seed(8)
    config = Config(model=locked(TINY_MODEL), train=TrainConfig(batch_size=8, epochs=1, tensorboard=False, seed=8))
    train(config, tiny_data, tmp_path / "run", strategy="default", progress=False)
    model = load_model(tmp_path / "run" / "model")
    num_captions = read_split(tiny_data, "train").num_captions()
    assert num_captions.max() > 1  # so one epoch leaves captions out
    sampled = sampled_caption_rows(num_captions, 1, 8)
    cached = feature_cache.load_or_compute_features(
        model, tiny_data, "train", towers=("text",), caption_rows=sampled, compute=lambda *a, **k: pytest.fail("recomputed")
    ).text_features
    np.testing.assert_array_equal(np.flatnonzero(~np.isnan(cached[:, 0])), sampled)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_training_runs_and_restores_the_policy(tiny_data, tmp_path, dtype, monkeypatch):
    policies = []
    set_policy = keras.mixed_precision.set_global_policy
    monkeypatch.setattr(keras.mixed_precision, "set_global_policy", lambda p: policies.append(p) or set_policy(p))
    config = tiny_config(epochs=1, mixed_precision=True, mixed_precision_dtype=dtype)
    result = train(config, tiny_data, tmp_path / "run", strategy="default", progress=False)
    assert np.isfinite(result.history[0]["loss"])
    assert policies[0] == f"mixed_{dtype}"
    assert keras.mixed_precision.global_policy().name == "float32"
    embeddings = load_model(result.model_dir).encode_text(tf.constant(CAPTIONS))
    assert embeddings.dtype == tf.float32


def _write_config(path, config):
    config.save(path)
    return str(path)


def _cli(*args):
    return [sys.executable, "-m", "dual_encoder.cli", *args]


@pytest.mark.slow
def test_a_killed_training_run_resumes_from_its_backup_and_finishes(tiny_data, tmp_path):
    preset = _write_config(tmp_path / "tiny.json", tiny_config(epochs=8, tensorboard=False))
    command = _cli("train", "--data", str(tiny_data), "--output", str(tmp_path / "run"), "--preset", preset, "--quiet")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not (tmp_path / "run" / "backup" / "checkpoint").exists():  # written last, once ckpt-1 is whole
        assert first.poll() is None, first.stdout.read().decode()
        assert time.time() < deadline, "no backup written"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    done = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(done) < 8, "the run finished before it could be killed"

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Resuming from" in second.stdout
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(1, 9))
    model = load_model(tmp_path / "run" / "model")
    assert model.encode_text(tf.constant(CAPTIONS)).shape == (4, TINY_MODEL.heads.embed_dim)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_training_on_two_local_processes_ends_with_identical_weights(tiny_data, tmp_path):
    preset = _write_config(tmp_path / "tiny.json", tiny_config(epochs=2, tensorboard=False))
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
        command = _cli("train", "--data", str(tiny_data), "--output", str(tmp_path / "run"), "--preset", preset, "--quiet", "--strategy", "multi_worker")
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output

    chief = tf.train.load_checkpoint(str(tmp_path / "run" / "backup"))
    worker = tf.train.load_checkpoint(str(tmp_path / "run" / "backup" / ".worker-1"))
    names = [name for name in chief.get_variable_to_shape_map() if name.startswith("variables/")]
    assert names
    for name in names:
        np.testing.assert_array_equal(chief.get_tensor(name), worker.get_tensor(name), err_msg=name)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
