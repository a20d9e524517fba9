"""Contrastive objectives (one class each) and the one helper that gathers embeddings across replicas.

Distributed contract (every loss): each replica gathers the embeddings of all replicas, computes the loss
over the whole global batch of B = b_1 + ... + b_N rows, and returns that loss times b_local / B, its
share. Summing the per-replica values — what `strategy.reduce(SUM, ...)` does to the loss and what
`optimizer.apply_gradients` under MirroredStrategy does to the gradients — gives exactly the single-device
loss and gradient on the whole batch: the gradient of `all_gather` sums every replica's upstream gradient
and the shares sum to 1. So the caller applies NO further scaling (do not divide by the number of
replicas). Outside a strategy, or with one replica, the share is 1: the plain batch loss.

Captions that fit several images: a partial caption ("a red star") fits many images of a batch. Every loss
scores with a positives mask P ([B images, B captions]; P_ij = 1 when caption j fits image i; P_ii = 1) instead
of the identity:
- `caption_ids` (equal for captions identical after normalisation, `data.pipeline.caption_ids`): caption j fits
  image i when it is identical to caption i, image i's own.
- `image_labels` / `caption_labels` (0-padded hashed labels, `data.pipeline.label_arrays`), where the dataset
  says what its images hold and what its captions ask: caption j fits image i when image i has every label of
  caption j.
- `image_ids` (`data.pipeline.image_ids`), when a batch brings several captions per image and the model repeats
  each image's embedding once per caption: caption j fits image i when rows i and j are the same image.
They are gathered across replicas with the embeddings, so the mask of the global batch is the same on every
replica and the distributed contract above holds.

Hard negatives (NegCLIP, Yuksekgonul et al. 2023): `negative_embeddings` [B, D] holds, for each row, a caption
that is false of its image (its own caption with one colour, shape, size or place changed); `negative_mask` [B] is
0 for rows that have none. The clip and siglip losses score each image against the hard negatives of every row of
that image — its own, and with several captions per image (`image_ids`) those of its other captions too, free
since they are embedded anyway — as more wrong captions; soft_target (the recipe's) ignores them.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops

from dual_encoder.errors import DualEncoderError


class UnknownLossError(DualEncoderError, ValueError):
    """`build_loss` was asked for a loss that is not registered."""


def gather_across_replicas(x):
    """`x` of every replica concatenated along axis 0 (differentiable) inside a step of a multi-replica
    strategy; `x` itself otherwise."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x
    if x.dtype.is_integer:
        # Ids (< 2**48): multi-worker collectives refuse integers and TPUs float64, so they travel as two
        # float32 halves of 24 bits, each exact.
        high, low = tf.cast(x // (1 << 24), tf.float32), tf.cast(x % (1 << 24), tf.float32)
        high, low = (tf.cast(context.all_gather(half, axis=0), x.dtype) for half in (high, low))
        return high * (1 << 24) + low
    return context.all_gather(x, axis=0)


class ContrastiveLoss(keras.layers.Layer):
    """Base of the losses: gathers the global batch, scores it, returns this replica's share (module doc).

    Subclasses implement `batch_loss(image_embeddings, text_embeddings, positives)` on L2-normalised `[B, D]`
    embeddings whose row i of each is a matching pair, and the positives mask (module doc). Computed in float32 under any dtype policy.

    Args:
        gather_negatives: use the other replicas' examples as negatives. When False each replica scores only
            its own rows (the loss is then the batch-size-weighted mean of the per-replica losses).

    Class attribute `UNTRAINED_IS_LN_BATCH`: a model that tells nothing apart scores ln(batch) (a softmax over the
    batch); training's "did not learn" warning uses it.
    """

    UNTRAINED_IS_LN_BATCH = True

    @classmethod
    def from_settings(cls, temperature: float, max_logit_scale: float, **kwargs) -> "ContrastiveLoss":
        """The loss from the loss section's settings; each subclass takes the ones it uses."""
        raise NotImplementedError

    def __init__(self, gather_negatives: bool = True, **kwargs):
        kwargs["dtype"] = "float32"  # logits and log-softmax overflow or lose precision in float16
        super().__init__(**kwargs)
        self.gather_negatives = gather_negatives

    def call(
        self, image_embeddings, text_embeddings, caption_ids=None, image_labels=None, caption_labels=None,
        negative_embeddings=None, negative_mask=None, image_ids=None,
    ):  # fmt: skip
        """This replica's share of the global-batch loss; the optional inputs say which captions fit which
        images (module doc): `caption_ids` [B] int64, `image_labels` [B, L] and `caption_labels` [B, L'] int64;
        and give each image a hard negative: `negative_embeddings` [B, D], `negative_mask` [B]."""
        image_embeddings = ops.cast(image_embeddings, "float32")
        text_embeddings = ops.cast(text_embeddings, "float32")
        negatives = None
        if negative_embeddings is not None:
            mask = ops.ones_like(image_embeddings[:, 0]) if negative_mask is None else negative_mask
            negatives = (ops.cast(negative_embeddings, "float32"), ops.cast(mask, "float32"))
        local_size = ops.cast(ops.shape(image_embeddings)[0], "float32")
        fit_inputs = (caption_ids, image_labels, caption_labels, image_ids)
        if self.gather_negatives:
            image_embeddings = gather_across_replicas(image_embeddings)
            text_embeddings = gather_across_replicas(text_embeddings)
            fit_inputs = tuple(None if x is None else gather_across_replicas(x) for x in fit_inputs)
            negatives = None if negatives is None else tuple(gather_across_replicas(x) for x in negatives)
            global_size = ops.cast(ops.shape(image_embeddings)[0], "float32")
        else:
            global_size = ops.sum(gather_across_replicas(ops.reshape(local_size, (1,))))
        size = ops.shape(image_embeddings)[0]
        positives = positives_mask(size, *fit_inputs)
        if negatives is not None:  # which rows' negatives are false of each row's image: those of the same image
            same_image = positives_mask(size, image_ids=fit_inputs[3])
            negatives = (negatives[0], same_image * negatives[1][None, :])
        return self.batch_loss(image_embeddings, text_embeddings, positives, negatives) * local_size / global_size

    def batch_loss(self, image_embeddings, text_embeddings, positives, negatives=None):
        """The loss over one whole batch; `positives` [B, B] float32 is 1 where caption j fits image i;
        `negatives` is None or (negative embeddings [B, D], valid [B images, B negatives]: 1 where negative j is
        false of image i) (module doc)."""
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), "gather_negatives": self.gather_negatives}


def positives_mask(size, caption_ids=None, image_labels=None, caption_labels=None, image_ids=None):
    """[B images, B captions] float32: 1 where caption j fits image i (module doc); the identity without inputs."""
    positives = ops.eye(size, dtype="bool")
    if image_ids is not None:  # rows of one image (several captions per image): each row's caption fits them all
        image_ids = ops.reshape(image_ids, (-1,))
        positives = ops.logical_or(positives, ops.equal(image_ids[:, None], image_ids[None, :]))
    if caption_ids is not None:
        caption_ids = ops.reshape(caption_ids, (-1,))
        positives = ops.logical_or(positives, ops.equal(caption_ids[:, None], caption_ids[None, :]))
    if image_labels is not None and caption_labels is not None:
        # found[i, j, l]: image i has label l of caption j; padding (0) is always found.
        found = ops.any(ops.equal(caption_labels[None, :, :, None], image_labels[:, None, None, :]), axis=-1)
        found = ops.logical_or(found, ops.equal(caption_labels, 0)[None, :, :])
        labelled = ops.any(ops.not_equal(caption_labels, 0), axis=-1)[None, :]  # a caption with no labels fits none
        positives = ops.logical_or(positives, ops.logical_and(ops.all(found, axis=-1), labelled))
    return ops.cast(positives, "float32")


def _row_normalised(matrix):
    return matrix / ops.sum(matrix, axis=-1, keepdims=True)


def _cross_entropy(targets, logits):
    """Mean over rows of -sum_j targets_ij * log_softmax(logits)_ij."""
    return ops.mean(-ops.sum(targets * ops.log_softmax(logits, axis=-1), axis=-1))


class ClipLoss(ContrastiveLoss):
    """Symmetric InfoNCE (CLIP) with a learnable logit scale, stored as its log and capped.

        s = min(exp(t), max_logit_scale),   t initialised to log(1 / temperature)
        logits_per_image = s * I @ T^T,     logits_per_text = logits_per_image^T
        loss = (CE(P / rowsum(P), logits_per_image) + CE(P^T / rowsum(P^T), logits_per_text)) / 2

    With hard negatives, logits_per_image gets more columns, s * I_i . N_j for the negatives N_j false of image i
    (its own; with several captions per image, those of its other rows too), target 0.

    where CE(y, z) = mean_i -sum_j y_ij log_softmax(z)_ij and P is the positives mask (module doc): each image's
    targets are spread evenly over the captions that fit it, each caption's over the images it fits.
    With distinct captions this is CLIP's -mean_i log_softmax(logits)_ii. Past the cap, t gets no gradient.

    Args:
        temperature: initial temperature (0.07 in CLIP).
        max_logit_scale: cap on the scale (100 in CLIP).
        **kwargs: `gather_negatives` of `ContrastiveLoss`.
    """

    @classmethod
    def from_settings(cls, temperature: float, max_logit_scale: float, **kwargs) -> "ClipLoss":
        return cls(temperature, max_logit_scale, **kwargs)

    def __init__(self, temperature: float = 0.07, max_logit_scale: float = 100.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature
        self.max_logit_scale = max_logit_scale
        self.log_logit_scale = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(math.log(1.0 / temperature)), name="log_logit_scale"
        )

    @property
    def logit_scale(self):
        return ops.minimum(ops.exp(self.log_logit_scale), self.max_logit_scale)

    def batch_loss(self, image_embeddings, text_embeddings, positives, negatives=None):
        logits_per_image = self.logit_scale * ops.matmul(image_embeddings, ops.transpose(text_embeddings))
        text_loss = _cross_entropy(_row_normalised(ops.transpose(positives)), ops.transpose(logits_per_image))
        image_targets = _row_normalised(positives)
        if negatives is not None:  # more columns per image: its hard negatives, never targets
            embeddings, valid = negatives
            own = self.logit_scale * ops.matmul(image_embeddings, ops.transpose(embeddings))
            own = ops.where(valid > 0, own, -1e9)
            logits_per_image = ops.concatenate([logits_per_image, own], axis=1)
            image_targets = ops.pad(image_targets, [[0, 0], [0, ops.shape(own)[1]]])
        image_loss = _cross_entropy(image_targets, logits_per_image)
        return (image_loss + text_loss) / 2.0

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature, "max_logit_scale": self.max_logit_scale}


class SoftTargetLoss(ContrastiveLoss):
    """The Keras "natural language image search" example's loss, with a fixed temperature tau.

        logits  = T @ I^T / tau
        S       = (I @ I^T + T @ T^T) / 2, with S_ij = 1 where P_ij or P_ji, i != j
        targets = softmax_rows(S / tau)
        loss    = (CE(targets, logits) + CE(targets^T, logits^T)) / 2,  CE(y, z) = mean_i -sum_j y_ij log_softmax(z)_ij

    A pair of examples where either caption fits the other image (module doc) gets the similarity of a pair with itself (1, as on the
    diagonal of unit vectors), so it is a target as strong as the pair's own. With distinct captions this is the
    example's loss. As in the example, gradients also flow through the targets.

    Args:
        temperature: the fixed temperature tau.
        **kwargs: `gather_negatives` of `ContrastiveLoss`.
    """

    @classmethod
    def from_settings(cls, temperature: float, max_logit_scale: float, **kwargs) -> "SoftTargetLoss":
        return cls(temperature, **kwargs)

    def __init__(self, temperature: float = 0.07, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature

    def batch_loss(self, image_embeddings, text_embeddings, positives, negatives=None):
        del negatives  # the recipe's loss, as the example has it
        logits = ops.matmul(text_embeddings, ops.transpose(image_embeddings)) / self.temperature
        images_similarity = ops.matmul(image_embeddings, ops.transpose(image_embeddings))
        texts_similarity = ops.matmul(text_embeddings, ops.transpose(text_embeddings))
        similarity = (images_similarity + texts_similarity) / 2.0
        either = ops.maximum(positives, ops.transpose(positives))
        off_diagonal = either * (1.0 - ops.eye(ops.shape(positives)[0], dtype="float32"))
        similarity = ops.where(off_diagonal > 0, 1.0, similarity)
        targets = ops.softmax(similarity / self.temperature, axis=-1)
        texts_loss = _cross_entropy(targets, logits)
        images_loss = _cross_entropy(ops.transpose(targets), ops.transpose(logits))
        return (texts_loss + images_loss) / 2.0

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


class SigLipLoss(ContrastiveLoss):
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023) with a learnable scale and bias.

        s = min(exp(t'), max_logit_scale),  t' initialised to log 10;  b initialised to -10
        logits_ij = s * I_i . T_j + b,      z_ij = 1 if caption j fits image i (P_ij, module doc) else -1
        loss = -(1 / B) sum_i sum_j log sigmoid(z_ij * logits_ij)
        (with hard negatives, plus -(1 / B) sum over the negatives N_j false of image i of log sigmoid(-(s * I_i . N_j + b)))

    Args:
        max_logit_scale: cap on the scale.
        **kwargs: `gather_negatives` of `ContrastiveLoss`.
    """

    UNTRAINED_IS_LN_BATCH = False  # per pair, not over the batch: an untrained model's loss depends on the bias

    @classmethod
    def from_settings(cls, temperature: float, max_logit_scale: float, **kwargs) -> "SigLipLoss":
        return cls(max_logit_scale, **kwargs)

    def __init__(self, max_logit_scale: float = 100.0, **kwargs):
        super().__init__(**kwargs)
        self.max_logit_scale = max_logit_scale
        self.log_logit_scale = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(math.log(10.0)), name="log_logit_scale"
        )
        self.logit_bias = self.add_weight(shape=(), initializer=keras.initializers.Constant(-10.0), name="logit_bias")

    @property
    def logit_scale(self):
        return ops.minimum(ops.exp(self.log_logit_scale), self.max_logit_scale)

    def batch_loss(self, image_embeddings, text_embeddings, positives, negatives=None):
        logits = self.logit_scale * ops.matmul(image_embeddings, ops.transpose(text_embeddings)) + self.logit_bias
        signs = 2.0 * positives - 1.0
        total = ops.sum(ops.log_sigmoid(signs * logits))
        if negatives is not None:  # each image against its hard negatives: more wrong pairs
            embeddings, valid = negatives
            own = self.logit_scale * ops.matmul(image_embeddings, ops.transpose(embeddings)) + self.logit_bias
            total = total + ops.sum(valid * ops.log_sigmoid(-own))
        return -total / ops.cast(ops.shape(logits)[0], "float32")

    def get_config(self):
        return {**super().get_config(), "max_logit_scale": self.max_logit_scale}


LOSSES: dict[str, type[ContrastiveLoss]] = {"clip": ClipLoss, "soft_target": SoftTargetLoss, "siglip": SigLipLoss}


def build_loss(
    name: str, temperature: float = 0.07, max_logit_scale: float = 100.0, gather_negatives: bool = True
) -> ContrastiveLoss:
    """The loss registered as `name` ("clip", "soft_target", "siglip"); each takes the settings it uses."""
    if name not in LOSSES:
        raise UnknownLossError(f"unknown loss '{name}'; choose one of {sorted(LOSSES)}")
    return LOSSES[name].from_settings(
        temperature, max_logit_scale, gather_negatives=gather_negatives, name="contrastive_loss"
    )
