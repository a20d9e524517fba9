"""Strategy selection."""

import json

import pytest
import tensorflow as tf

from dual_encoder.training.distribute import get_strategy, is_chief


def test_auto_is_the_default_strategy_on_one_cpu(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = get_strategy("auto")
    assert strategy.num_replicas_in_sync == 1
    assert is_chief(strategy)


def test_mirrored_without_gpus_mirrors_the_logical_cpus():
    strategy = get_strategy("mirrored")
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 2  # conftest made two logical CPUs


def test_auto_picks_multi_worker_when_tf_config_names_workers(monkeypatch):
    from dual_encoder.training import distribute

    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 0}}))
    assert distribute._auto_strategy_name() == "multi_worker"


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError, match="unknown strategy"):
        get_strategy("quantum")
