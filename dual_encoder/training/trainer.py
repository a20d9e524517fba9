"""The training loop: build under a strategy, train epoch by epoch, validate, checkpoint, resume.

One loop (`strategy.run` inside a `tf.function`) serves every strategy: Keras 3's `fit` does not run under
MultiWorkerMirroredStrategy (keras-team/keras#20585). The loop does what the usual Keras callbacks do —
best checkpoint by validation recall, backup and restore after a kill, TensorBoard, early stopping,
reduce-on-plateau, terminate on NaN, a progress bar — and keeps their state in the backup so a resumed run
continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import keras
import tensorflow as tf

from dual_encoder.atomic import write_file_atomically
from dual_encoder.config import Config
from dual_encoder.data.pipeline import (
    image_input,
    make_train_dataset,
    read_split,
    require_images,
    sampled_caption_rows,
)
from dual_encoder.errors import DualEncoderError
from dual_encoder.evaluation import evaluate_split
from dual_encoder.features import TOWERS, SplitFeatures, load_or_compute_features
from dual_encoder.losses import LOSSES
from dual_encoder.models import build_dual_encoder, save_model
from dual_encoder.training.distribute import get_strategy, is_chief
from dual_encoder.training.run_folder import claim_run_folder

MONITOR = "mean_recall"  # mean of text->image and image->text recall@1/5/10 on the validation gallery


class TrainingError(DualEncoderError):
    """Training cannot start or cannot go on (too little data, a NaN loss)."""


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    history: list[dict]
    best: dict
    epochs_run: int
    warning: Optional[str] = None  # set when training did not learn (see `learning_warning`)


CHANCE_FACTOR = 2.0  # validation recall@10 below this many times chance counts as "at chance"
LOSS_STUCK_FRACTION = 0.95  # a loss that never fell below this fraction of ln(batch) never left chance


def chance_recall(k: int, gallery: int) -> float:
    """Text->image recall@k of a random ranking over a gallery of `gallery` images."""
    return min(1.0, k / max(1, gallery))


def learning_warning(history: list[dict], config: Config, num_train: int, num_validation: int) -> Optional[str]:
    """A warning with the likely causes when a run ended at chance or its loss never left ln(batch); else None.

    The softmax (clip) loss of a model that has learnt nothing is ln(batch) (every caption equally likely for
    every image), and its validation recall@10 is 10 / gallery.
    """
    if not history:
        return None
    chance = chance_recall(10, num_validation)
    best_recall = max(r.get("val_t2i_recall@10", 0.0) for r in history)
    stuck_loss = LOSSES[config.model.loss.name].UNTRAINED_IS_LN_BATCH and min(r["loss"] for r in history) > LOSS_STUCK_FRACTION * math.log(config.train.batch_size)
    if best_recall >= CHANCE_FACTOR * chance and not stuck_loss:
        return None
    train = config.train
    steps = len(history) * (num_train // train.batch_size)
    what = (
        f"validation text->image recall@10 peaked at {best_recall:.3f} (chance {chance:.3f})"
        + (f"; the loss never fell below {LOSS_STUCK_FRACTION:.0%} of ln(batch) = {math.log(train.batch_size):.2f}" if stuck_loss else "")
    )  # fmt: skip
    return (
        f"training did not learn: {what}. Likely causes: too little training — {num_train} images and "
        f"{len(history)} epochs are {steps} steps of batch {train.batch_size} (the synthetic-small demo needs "
        f"thousands of images and ~20 epochs); or the learning rate ({train.learning_rate:g}) is too high or too low."
    )


@dataclasses.dataclass
class _LoopState:
    """What the loop needs besides weights to resume: saved beside each backup checkpoint."""

    epoch: int = 0
    best: float = -math.inf
    best_metrics: dict = dataclasses.field(default_factory=dict)
    epochs_since_best: int = 0
    epochs_since_lr_drop: int = 0
    stopped_early: bool = False
    best_checkpoint: str = ""  # the best epoch's weights (`backup/best-<epoch>`)
    history: list = dataclasses.field(default_factory=list)


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, cosine decay to `peak * min_ratio`, times a plateau `scale` variable.

    Args:
        peak: the learning rate at the end of warm-up.
        total_steps: steps of the whole run.
        warmup_steps: steps of linear warm-up.
        min_ratio: the final learning rate as a fraction of `peak`.
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
        self.peak = peak
        self.total_steps = max(1, total_steps)
        self.warmup_steps = warmup_steps
        self.min_ratio = min_ratio
        self.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="lr_scale")

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.minimum(1.0, (step + 1.0) / max(1, self.warmup_steps))
        progress = tf.clip_by_value(
            (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 0.0, 1.0
        )
        cosine = self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + tf.cos(math.pi * progress))
        return self.peak * warmup * cosine * self.scale

    def get_config(self):
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_ratio": self.min_ratio,
        }


class _Batches:
    """Training batches of one epoch: decoded images and caption strings for a tower that trains, its cached
    backbone features for a locked one (`features`: both sides when both towers are locked, one side in LiT),
    the same images and captions in the same order either way."""

    def __init__(self, data_dir: Path, config: Config, model, num_images: int, features: Optional[SplitFeatures] = None):
        self.data_dir, self.config, self.num_images, self.features = data_dir, config, num_images, features
        self.image_input = image_input(model)

    def dataset(self, epoch: int) -> tf.data.Dataset:
        return make_train_dataset(
            self.data_dir,
            "train",
            image_size=self.image_input,
            batch_size=self.config.train.batch_size,
            epoch=epoch,
            seed=self.config.train.seed,
            captions_per_image=self.config.train.captions_per_image,
            image_features=None if self.features is None else self.features.image_features,
            text_features=None if self.features is None else self.features.text_features,
        )


def locked_towers(model, config: Config) -> tuple[str, ...]:
    """The towers whose backbone features are cached: every locked tower, when `feature_cache` is on."""
    if not config.train.feature_cache:
        return ()
    return tuple(tower for tower in TOWERS if not model.is_trainable(tower))


def train(
    config: Config,
    data_dir: str | Path,
    run_dir: str | Path,
    *,
    strategy: str | tf.distribute.Strategy = "auto",
    progress: bool = True,
    restart: bool = False,
    compute_features: Optional[Callable[..., SplitFeatures]] = None,
) -> TrainResult:
    """Train a dual encoder on a prepared dataset; the best model by validation recall lands in `run_dir/model`
    when training ends (until then the best weights are in `run_dir/backup/best`).

    Re-running the same command on the same `run_dir` resumes from the last completed epoch; a run folder
    whose config or dataset differs is refused unless `restart` (see `run_folder`). A dataset without
    validation images is refused before anything is written: the best model is chosen by validation recall.
    `compute_features` fills a missing feature cache instead of this process (e.g. `index.beam.BeamFeatures`);
    giving it for a config that uses no cache is refused.
    """
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    require_images(data_dir, "validation", "train")
    if isinstance(strategy, str):
        strategy = get_strategy(strategy)
    chief = is_chief(strategy)
    with claim_run_folder(run_dir, config, data_dir, restart=restart, chief=chief):
        with _precision_policy(config.train):
            return _Run(config, data_dir, run_dir, strategy, chief, progress, compute_features).fit()


class _Run:
    """One training run's objects, built once under the strategy's scope."""

    def __init__(self, config, data_dir, run_dir, strategy, chief, progress, compute_features=None):
        self.config, self.data_dir, self.run_dir = config, data_dir, run_dir
        self.strategy, self.chief, self.progress = strategy, chief, progress
        train_split = read_split(data_dir, "train")
        self.num_validation = read_split(data_dir, "validation").num_images
        train_captions = [c for caps in train_split.captions for c in caps]
        keras.utils.set_random_seed(config.train.seed)
        with strategy.scope():
            self.model = build_dual_encoder(config.model, captions=train_captions)
            self.cached_towers = locked_towers(self.model, config)
            if compute_features is not None and not self.cached_towers:
                raise TrainingError(
                    "features to compute elsewhere (--runner) were asked for, but this config trains without a "
                    "feature cache (that needs a locked tower and train.feature_cache=true)"
                )
            self.val_features = None
            train_features = None
            if self.cached_towers:
                extract = dict(
                    towers=self.cached_towers, batch_size=max(config.train.batch_size, 64), progress=progress,
                    compute=compute_features,
                )  # fmt: skip
                # Only the captions this run's epochs sample: a short run on many captions per image embeds fewer.
                used = sampled_caption_rows(
                    train_split.num_captions(), config.train.epochs, config.train.seed, config.train.captions_per_image
                )
                train_features = load_or_compute_features(self.model, data_dir, "train", caption_rows=used, **extract)
                self.val_features = load_or_compute_features(self.model, data_dir, "validation", **extract)
            self.source = _Batches(data_dir, config, self.model, train_split.num_images, train_features)
            self.steps_per_epoch = self.source.num_images // config.train.batch_size
            if self.steps_per_epoch == 0:
                raise TrainingError(
                    f"batch_size {config.train.batch_size} is larger than the {self.source.num_images} training images"
                )
            total = self.steps_per_epoch * config.train.epochs
            self.schedule = WarmupCosine(
                config.train.learning_rate,
                total,
                int(total * config.train.warmup_fraction),
                config.train.min_learning_rate_ratio,
            )
            self.optimizer = _build_optimizer(config, self.schedule, self.model)
        # Frozen towers never change and are rebuilt identically from the config (pretrained or seeded
        # weights): backups and the best checkpoint hold only what training changes, so a run with frozen
        # backbones writes its heads each epoch, not the backbones too.
        changing = _changing_variables(self.model)
        self.backup = tf.train.CheckpointManager(
            tf.train.Checkpoint(variables=changing, optimizer=self.optimizer, lr_scale=self.schedule.scale),
            str(self._backup_dir()),
            max_to_keep=2,
        )
        self.best = tf.train.Checkpoint(variables=changing)
        self._backup_dir().mkdir(parents=True, exist_ok=True)
        self.train_step = make_train_step(self.model, self.optimizer, strategy, _scales_loss(config.train))

    def _backup_dir(self) -> Path:
        if self.chief:
            return self.run_dir / "backup"
        # Every worker must write its checkpoint; only the chief's is kept.
        task_id = self.strategy.cluster_resolver.task_id
        return self.run_dir / "backup" / f".worker-{task_id}"

    def _restore(self) -> _LoopState:
        latest = self.backup.latest_checkpoint
        if latest is None:
            return _LoopState()
        self.backup.checkpoint.restore(latest).expect_partial()
        state = json.loads(Path(latest + ".state.json").read_text())
        print(f"Resuming from {latest} (epoch {state['epoch']} of {self.config.train.epochs} done)")
        return _LoopState(**state)

    def fit(self) -> TrainResult:
        cfg = self.config.train
        state = self._restore()
        trained = state.epoch < cfg.epochs and not state.stopped_early
        writer = tf.summary.create_file_writer(str(self.run_dir / "logs")) if self.chief and cfg.tensorboard else None
        while state.epoch < cfg.epochs and not state.stopped_early:
            epoch = state.epoch
            start = time.perf_counter()
            loss = self._train_epoch(epoch)
            metrics = evaluate_split(self.model, self.data_dir, "validation", features=self.val_features)
            record = {
                "epoch": epoch + 1,
                "loss": loss,
                "learning_rate": float(self.schedule(self.optimizer.iterations)),
                "seconds": round(time.perf_counter() - start, 3),
                **{f"val_{k}": v for k, v in metrics.items()},
            }
            chance = chance_recall(10, self.num_validation)
            at_chance = record.get("val_t2i_recall@10", 0.0) < CHANCE_FACTOR * chance
            print(_format_record(record) + (f"  (recall@10 at chance: {chance:.3f})" if at_chance else ""))
            self._after_epoch(state, record, metrics)
            if writer is not None:
                with writer.as_default(step=epoch + 1):
                    for name, value in record.items():
                        if isinstance(value, (int, float)) and name != "epoch":
                            tf.summary.scalar(name, value)
                writer.flush()
        model_dir = self.run_dir / "model"
        if self.chief and state.best_metrics and (trained or not model_dir.is_dir()):
            self.best.read(state.best_checkpoint).assert_consumed()
            save_model(self.model, model_dir)
        if self.chief:
            _plot_history(state.history, self.run_dir / "curves.png")
        warning = learning_warning(state.history, self.config, self.source.num_images, self.num_validation)
        if warning:
            print(f"WARNING: {warning}")
        return TrainResult(self.run_dir, self.run_dir / "model", state.history, state.best_metrics, state.epoch, warning)

    def _train_epoch(self, epoch: int) -> float:
        iterator = iter(self.strategy.experimental_distribute_dataset(self.source.dataset(epoch)))
        progbar = keras.utils.Progbar(self.steps_per_epoch, verbose=1 if self.progress else 0, unit_name="step")
        total = 0.0
        for step in range(self.steps_per_epoch):
            loss = float(self.train_step(iterator))
            if not math.isfinite(loss):
                raise TrainingError(f"loss became {loss} at epoch {epoch + 1}, step {step + 1}: training stopped")
            total += loss
            progbar.update(step + 1, [("loss", loss)])
        return total / self.steps_per_epoch

    def _after_epoch(self, state: _LoopState, record: dict, metrics: dict) -> None:
        cfg = self.config.train
        state.epoch += 1
        state.history.append(record)
        if metrics[MONITOR] > state.best:
            state.best, state.best_metrics = metrics[MONITOR], {"epoch": state.epoch, **metrics}
            state.epochs_since_best = state.epochs_since_lr_drop = 0
            state.best_checkpoint = self.best.write(str(self._backup_dir() / f"best-{state.epoch}"))
        else:
            state.epochs_since_best += 1
            state.epochs_since_lr_drop += 1
        if cfg.reduce_lr_patience and state.epochs_since_lr_drop >= cfg.reduce_lr_patience:
            self.schedule.scale.assign(self.schedule.scale * cfg.reduce_lr_factor)
            state.epochs_since_lr_drop = 0
            print(f"Validation {MONITOR} flat for {cfg.reduce_lr_patience} epochs: learning rate x{cfg.reduce_lr_factor}")
        if cfg.early_stopping_patience and state.epochs_since_best >= cfg.early_stopping_patience:
            state.stopped_early = True
            print(f"Early stopping: no better validation {MONITOR} for {cfg.early_stopping_patience} epochs")
        if self.chief:
            _write_json(self.run_dir / "history.json", state.history)
        # The state file goes first: a kill between the two leaves the previous checkpoint as the latest.
        path = self.backup.directory + f"/ckpt-{state.epoch}"
        _write_json(Path(path + ".state.json"), dataclasses.asdict(state))
        self.backup.save(checkpoint_number=state.epoch)
        for stale in self._backup_dir().glob("best-*"):  # the backup now names a newer best
            if not stale.name.startswith(Path(state.best_checkpoint).name + "."):
                stale.unlink()


def make_train_step(model, optimizer, strategy: tf.distribute.Strategy, mixed_precision: bool = False):
    """A compiled step: takes an iterator over a distributed dataset, trains on one global batch, returns the
    global-batch loss."""

    def replica_step(batch):
        with tf.GradientTape() as tape:
            outputs = model(batch, training=True)
            # This replica's share of the global-batch loss: summed over replicas (as the optimizer sums
            # gradients) it is the single-device loss on the whole batch.
            loss = model.compute_contrastive_loss(outputs)
            scaled = optimizer.scale_loss(loss) if mixed_precision else loss
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        return loss

    @tf.function
    def train_step(iterator):
        per_replica = strategy.run(replica_step, args=(next(iterator),))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return train_step


def _changing_variables(model) -> list:
    frozen = {id(v) for tower in (model.image_encoder, model.text_encoder) if not tower.trainable for v in tower.weights}
    return [v for v in model.weights if id(v) not in frozen]


def _build_optimizer(config: Config, schedule, model) -> keras.optimizers.Optimizer:
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.train.weight_decay)
    # As in CLIP: no weight decay on gains, biases and scalars (temperature, bias of the loss).
    optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
    if _scales_loss(config.train):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer


def _scales_loss(train: TrainConfig) -> bool:
    """float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none."""
    return train.mixed_precision and train.mixed_precision_dtype == "float16"


@contextlib.contextmanager
def _precision_policy(train: TrainConfig):
    previous = keras.mixed_precision.global_policy().name
    policy = f"mixed_{train.mixed_precision_dtype}" if train.mixed_precision else "float32"
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _format_record(record: dict) -> str:
    shown = ["epoch", "loss", "val_t2i_recall@1", "val_t2i_recall@10", "val_i2t_recall@1", MONITOR]
    parts = []
    for name in shown:
        value = record.get(name, record.get(f"val_{name}"))
        if value is not None:
            parts.append(f"{name}={value:.4f}" if isinstance(value, float) else f"{name}={value}")
    return "  ".join(parts)


def _write_json(path: Path, value) -> None:
    write_file_atomically(path, json.dumps(value, indent=2, default=float) + "\n")


def _plot_history(history: list[dict], path: Path) -> None:
    # A bare Figure draws off-screen without switching the pyplot backend of a notebook's kernel.
    from matplotlib.figure import Figure

    if not history:
        return
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_recall = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["loss"] for r in history], marker="o")
    ax_loss.set(title="training loss", xlabel="epoch")
    for name in ("val_t2i_recall@1", "val_t2i_recall@10", "val_i2t_recall@1", f"val_{MONITOR}"):
        if name in history[0]:
            ax_recall.plot(epochs, [r[name] for r in history], marker="o", label=name[4:])
    ax_recall.set(title="validation retrieval", xlabel="epoch", ylim=(0, 1))
    ax_recall.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
