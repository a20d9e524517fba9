"""Pick a tf.distribute strategy: TPU, multi-worker, multi-GPU mirrored, or the default."""

from __future__ import annotations

import functools
import json
import os

import tensorflow as tf

STRATEGY_NAMES = ("auto", "default", "mirrored", "multi_worker", "tpu")


@functools.lru_cache(maxsize=None)
def get_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Return the strategy called `name`; `auto` picks TPU, multi-worker, mirrored or default, in that order.

    One strategy object per name and process: a second MirroredStrategy in a process would reuse the first
    one's collective keys and fail on tensors of other shapes (tensorflow#62790), so training twice in a
    notebook reuses the first strategy.

    `auto` chooses multi-worker when `TF_CONFIG` names more than one worker, mirrored when more than one GPU is
    visible, TPU when a TPU cluster resolves. `mirrored` without GPUs mirrors over the visible logical CPUs, so
    tests can run two replicas on one CPU.
    """
    if name not in STRATEGY_NAMES:
        raise ValueError(f"unknown strategy '{name}'; choose one of {', '.join(STRATEGY_NAMES)}")
    if name == "auto":
        name = _auto_strategy_name()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def _auto_strategy_name() -> str:
    if _tf_config_workers() > 1:
        return "multi_worker"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    if os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"):
        return "tpu"
    return "default"


def _tf_config_workers() -> int:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0
    cluster = json.loads(raw).get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes run artifacts (always true outside multi-worker training)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict())
