"""Losses against NumPy references (value and gradient), and their equality on 2 replicas vs 1 device."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from dual_encoder.losses import (
    ClipLoss,
    SigLipLoss,
    SoftTargetLoss,
    UnknownLossError,
    build_loss,
    gather_across_replicas,
    positives_mask,
)

IMAGES = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]])
TEXTS = np.array([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.8, 0.6], [0.6, 0.0, 0.8]])


def _log_softmax(x):
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _clip_reference(images, texts, log_scale, max_scale=100.0):
    logits = min(np.exp(log_scale), max_scale) * images @ texts.T
    return -(np.mean(np.diag(_log_softmax(logits))) + np.mean(np.diag(_log_softmax(logits.T)))) / 2


def _positives(ids):
    return (np.asarray(ids)[:, None] == np.asarray(ids)[None, :]).astype(float)


def _clip_duplicates_reference(images, texts, log_scale, ids):
    """Written out per row: the loss of row i averages -log p over every j whose caption equals caption i."""
    logits = min(np.exp(log_scale), 100.0) * images @ texts.T
    positives = _positives(ids)
    rows = [
        -np.mean(_log_softmax(z)[i][positives[i] > 0])
        for z in (logits, logits.T)
        for i in range(len(ids))
    ]
    return np.sum(rows) / (2 * len(ids))


def _soft_target_reference(images, texts, temperature, ids=None):
    logits = texts @ images.T / temperature
    similarity = (images @ images.T + texts @ texts.T) / 2
    if ids is not None:  # duplicate captions (off the diagonal): as similar as a pair with itself
        similarity = np.where((_positives(ids) > 0) & ~np.eye(len(ids), dtype=bool), 1.0, similarity)
    similarity = similarity / temperature
    targets = np.exp(_log_softmax(similarity))
    texts_loss = -np.sum(targets * _log_softmax(logits), axis=1)
    images_loss = -np.sum(targets.T * _log_softmax(logits.T), axis=1)
    return np.mean((texts_loss + images_loss) / 2)


def _siglip_reference(images, texts, log_scale, bias, max_scale=100.0, ids=None):
    logits = min(np.exp(log_scale), max_scale) * images @ texts.T + bias
    signs = 2 * (np.eye(len(images)) if ids is None else _positives(ids)) - 1
    return -np.sum(np.log(1 / (1 + np.exp(-signs * logits)))) / len(images)


def _numeric_gradient(fn, array, step=1e-6):
    array = np.array(array, dtype=np.float64)
    gradient = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        plus, minus = array.copy(), array.copy()
        plus[index] += step
        minus[index] -= step
        gradient[index] = (fn(plus) - fn(minus)) / (2 * step)
    return gradient


# (loss, reference(images, texts, scalars...), names of the loss's learnable scalars)
CASES = {
    "clip": (lambda: ClipLoss(temperature=0.5), lambda i, t, s: _clip_reference(i, t, *s), ["log_logit_scale"]),
    "soft_target": (lambda: SoftTargetLoss(temperature=0.5), lambda i, t, s: _soft_target_reference(i, t, 0.5), []),
    "siglip": (lambda: SigLipLoss(), lambda i, t, s: _siglip_reference(i, t, *s), ["log_logit_scale", "logit_bias"]),
}


DUPLICATE_IDS = [7, 3, 7, 5]  # rows 0 and 2 have the same caption
DUPLICATE_CASES = {
    "clip": (
        lambda: ClipLoss(temperature=0.5),
        lambda i, t, s: _clip_duplicates_reference(i, t, *s, DUPLICATE_IDS),
        ["log_logit_scale"],
    ),
    "soft_target": (
        lambda: SoftTargetLoss(temperature=0.5),
        lambda i, t, s: _soft_target_reference(i, t, 0.5, DUPLICATE_IDS),
        [],
    ),
    "siglip": (
        lambda: SigLipLoss(),
        lambda i, t, s: _siglip_reference(i, t, *s, ids=DUPLICATE_IDS),
        ["log_logit_scale", "logit_bias"],
    ),
}


@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct", "duplicate-captions"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_value_and_gradients_match_numpy_reference(name, duplicates):
    make_loss, reference, scalar_names = (DUPLICATE_CASES if duplicates else CASES)[name]
    loss = make_loss()
    scalars = [getattr(loss, n) for n in scalar_names]
    images, texts = tf.constant(IMAGES, tf.float32), tf.constant(TEXTS, tf.float32)
    ids = tf.constant(DUPLICATE_IDS, tf.int64) if duplicates else None
    with tf.GradientTape() as tape:
        tape.watch([images, texts])
        value = loss(images, texts, caption_ids=ids)
    image_grad, text_grad, *scalar_grads = tape.gradient(value, [images, texts, *[s.value for s in scalars]])

    scalar_values = [float(s.numpy()) for s in scalars]
    np.testing.assert_allclose(float(value), reference(IMAGES, TEXTS, scalar_values), rtol=1e-5)
    np.testing.assert_allclose(
        image_grad, _numeric_gradient(lambda x: reference(x, TEXTS, scalar_values), IMAGES), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        text_grad, _numeric_gradient(lambda x: reference(IMAGES, x, scalar_values), TEXTS), rtol=1e-4, atol=1e-6
    )
    for i, grad in enumerate(scalar_grads):

        def vary_scalar(x, i=i):
            values = list(scalar_values)
            values[i] = float(x)
            return reference(IMAGES, TEXTS, values)

        np.testing.assert_allclose(float(grad), _numeric_gradient(vary_scalar, scalar_values[i]), rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_distinct_caption_ids_change_nothing_and_duplicates_do(name):
    loss = CASES[name][0]()
    plain = float(loss(IMAGES, TEXTS))
    assert float(loss(IMAGES, TEXTS, caption_ids=tf.constant([4, 3, 2, 1], tf.int64))) == pytest.approx(plain, rel=1e-6)
    assert abs(float(loss(IMAGES, TEXTS, caption_ids=tf.constant(DUPLICATE_IDS, tf.int64))) - plain) > 1e-3


def test_a_duplicate_caption_is_not_pushed_away_from_the_other_image():
    """Two images with the caption "a star": the clip loss's gradient no longer separates the caption from the
    image it was not drawn for, as it does when that image counts as a negative."""
    loss = ClipLoss(temperature=0.5)
    images = tf.constant(IMAGES, tf.float32)
    for ids, sign in (([0, 1, 2, 3], 1.0), (DUPLICATE_IDS, -1.0)):
        texts = tf.constant(TEXTS, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(texts)
            value = loss(images, texts, caption_ids=tf.constant(ids, tf.int64))
        gradient = tape.gradient(value, texts).numpy()
        # d loss / d text_0 along image 2: positive = descending moves text 0 away from image 2
        assert sign * float(gradient[0] @ IMAGES[2]) > 0


# Image labels (0 = padding) and caption labels: caption 1 ("a star", label 5) fits images 0, 1 and 3.
IMAGE_LABELS = np.array([[5, 6, 0], [5, 0, 0], [7, 8, 9], [9, 5, 0]], dtype=np.int64)
CAPTION_LABELS = np.array([[6, 0], [5, 0], [7, 9], [9, 5]], dtype=np.int64)
FITS = np.array(  # [image i, caption j]
    [[1, 1, 0, 0],
     [0, 1, 0, 0],
     [0, 0, 1, 0],
     [0, 1, 0, 1]], dtype=float)  # fmt: skip


def test_positives_from_labels_are_every_caption_an_image_has_all_labels_of():
    mask = positives_mask(4, None, tf.constant(IMAGE_LABELS), tf.constant(CAPTION_LABELS))
    np.testing.assert_array_equal(mask, FITS)
    both = positives_mask(4, tf.constant([1, 2, 3, 1], tf.int64), tf.constant(IMAGE_LABELS), tf.constant(CAPTION_LABELS))
    np.testing.assert_array_equal(both, np.maximum(FITS, [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]))


def test_rows_of_one_image_take_each_others_captions_as_positives():
    # Several captions per image: the model repeats the image's embedding, one row per caption.
    mask = positives_mask(4, image_ids=tf.constant([7, 8, 7, 9], tf.int64))
    np.testing.assert_array_equal(mask, [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]])
    with_labels = positives_mask(
        4, None, tf.constant(IMAGE_LABELS), tf.constant(CAPTION_LABELS), tf.constant([7, 8, 7, 9], tf.int64)
    )
    np.testing.assert_array_equal(with_labels, np.maximum(FITS, mask))


def test_a_caption_without_labels_fits_only_its_own_image():
    caption_labels = CAPTION_LABELS.copy()
    caption_labels[1] = 0  # caption 1 has no labels (e.g. metadata that does not name it)
    mask = positives_mask(4, None, tf.constant(IMAGE_LABELS), tf.constant(caption_labels))
    np.testing.assert_array_equal(mask[:, 1], [0, 1, 0, 0])


def test_clip_with_label_positives_spreads_targets_over_what_fits():
    loss = ClipLoss(temperature=0.5)
    value = float(loss(IMAGES, TEXTS, image_labels=tf.constant(IMAGE_LABELS), caption_labels=tf.constant(CAPTION_LABELS)))
    logits = 2.0 * IMAGES @ TEXTS.T
    image_side = -np.sum(FITS / FITS.sum(1, keepdims=True) * _log_softmax(logits), axis=1).mean()
    text_side = -np.sum(FITS.T / FITS.T.sum(1, keepdims=True) * _log_softmax(logits.T), axis=1).mean()
    assert value == pytest.approx((image_side + text_side) / 2, rel=1e-5)


NEGATIVES = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
NEGATIVE_MASK = np.array([1.0, 1.0, 0.0, 1.0])  # image 2 has no hard negative


def test_clip_scores_each_image_against_its_own_hard_negative():
    loss = ClipLoss(temperature=0.5)
    value = float(loss(IMAGES, TEXTS, negative_embeddings=NEGATIVES, negative_mask=NEGATIVE_MASK))
    logits = 2.0 * IMAGES @ TEXTS.T
    own = 2.0 * np.sum(IMAGES * NEGATIVES, axis=1)
    extended = np.concatenate([logits, np.where(NEGATIVE_MASK > 0, own, -1e9)[:, None]], axis=1)
    image_side = -np.mean(np.diag(_log_softmax(extended)[:, :4]))
    text_side = -np.mean(np.diag(_log_softmax(logits.T)))
    assert value == pytest.approx((image_side + text_side) / 2, rel=1e-5)
    assert value > float(loss(IMAGES, TEXTS))  # a negative close to the image costs something


def test_rows_of_one_image_are_scored_against_all_of_that_images_hard_negatives():
    # Rows 0, 1 are one image (two captions), rows 2, 3 another; row 2's caption has no negative.
    image_ids = tf.constant([7, 7, 8, 8], tf.int64)
    same = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=bool)
    valid = same & (NEGATIVE_MASK > 0)[None, :]
    clip = ClipLoss(temperature=0.5)
    value = float(clip(IMAGES, TEXTS, negative_embeddings=NEGATIVES, negative_mask=NEGATIVE_MASK, image_ids=image_ids))
    logits = 2.0 * IMAGES @ TEXTS.T
    extended = np.concatenate([logits, np.where(valid, 2.0 * IMAGES @ NEGATIVES.T, -1e9)], axis=1)
    targets = np.pad(same / same.sum(1, keepdims=True), [(0, 0), (0, 4)])
    image_side = -np.sum(targets * _log_softmax(extended), axis=1).mean()
    text_side = -np.sum(same / same.sum(1, keepdims=True) * _log_softmax(logits.T), axis=1).mean()
    assert value == pytest.approx((image_side + text_side) / 2, rel=1e-5)
    siglip = SigLipLoss()
    value = float(siglip(IMAGES, TEXTS, negative_embeddings=NEGATIVES, negative_mask=NEGATIVE_MASK, image_ids=image_ids))
    pairs = 10.0 * IMAGES @ TEXTS.T - 10.0
    signs = np.where(same, 1.0, -1.0)
    expected = -np.sum(np.log(1 / (1 + np.exp(-signs * pairs))))
    expected -= np.sum(valid * np.log(1 / (1 + np.exp(10.0 * IMAGES @ NEGATIVES.T - 10.0))))
    assert value == pytest.approx(expected / 4, rel=1e-5)


def test_siglip_counts_each_hard_negative_as_one_more_wrong_pair():
    loss = SigLipLoss()
    value = float(loss(IMAGES, TEXTS, negative_embeddings=NEGATIVES, negative_mask=NEGATIVE_MASK))
    own = 10.0 * np.sum(IMAGES * NEGATIVES, axis=1) - 10.0
    extra = -np.sum(NEGATIVE_MASK * np.log(1 / (1 + np.exp(own)))) / 4
    assert value == pytest.approx(_siglip_reference(IMAGES, TEXTS, np.log(10.0), -10.0) + extra, rel=1e-5)


def test_soft_target_keeps_the_recipe_and_ignores_hard_negatives():
    loss = SoftTargetLoss(temperature=0.5)
    assert float(loss(IMAGES, TEXTS, negative_embeddings=NEGATIVES)) == pytest.approx(float(loss(IMAGES, TEXTS)))


def test_clip_scale_starts_at_inverse_temperature_and_is_capped():
    loss = ClipLoss(temperature=0.07, max_logit_scale=100.0)
    np.testing.assert_allclose(float(loss.logit_scale), 1 / 0.07, rtol=1e-6)
    loss.log_logit_scale.assign(np.log(1000.0))
    assert float(loss.logit_scale) == pytest.approx(100.0)
    np.testing.assert_allclose(float(loss(IMAGES, TEXTS)), _clip_reference(IMAGES, TEXTS, np.log(1000.0)), rtol=1e-5)


def test_siglip_starts_at_paper_values():
    loss = SigLipLoss()
    assert float(loss.logit_scale) == pytest.approx(10.0)
    assert float(loss.logit_bias) == pytest.approx(-10.0)


def test_loss_is_float32_under_float16_inputs():
    loss = ClipLoss(temperature=0.5)
    value = loss(tf.constant(IMAGES, tf.float16), tf.constant(TEXTS, tf.float16))
    assert value.dtype == tf.float32
    np.testing.assert_allclose(float(value), _clip_reference(IMAGES, TEXTS, np.log(2.0)), rtol=1e-3)


def test_build_loss_registry():
    assert isinstance(build_loss("clip", 0.1, 50.0), ClipLoss)
    assert build_loss("clip", 0.1, 50.0).max_logit_scale == 50.0
    assert build_loss("soft_target", 0.2).temperature == 0.2
    assert isinstance(build_loss("siglip"), SigLipLoss)
    with pytest.raises(UnknownLossError, match="unknown loss 'infonce'"):
        build_loss("infonce")


def test_loss_config_round_trip():
    loss = ClipLoss(temperature=0.1, max_logit_scale=30.0, gather_negatives=False)
    restored = ClipLoss.from_config(loss.get_config())
    assert (restored.temperature, restored.max_logit_scale, restored.gather_negatives) == (0.1, 30.0, False)


def test_gather_is_identity_outside_a_strategy():
    x = tf.constant([[1.0, 2.0]])
    assert gather_across_replicas(x) is x


# --- Two replicas (conftest made two logical CPUs) against one device on the whole batch -------------

FEATURES = np.random.default_rng(0).normal(size=(8, 5)).astype("float32")
CAPTION_FEATURES = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")


def _towers_and_loss(name, gather_negatives=True):
    """Two linear 'towers' with fixed weights (so gradients flow through the gather) and a loss."""
    image_tower = keras.layers.Dense(3, use_bias=False, kernel_initializer=keras.initializers.Constant(0.3))
    text_tower = keras.layers.Dense(3, use_bias=False, kernel_initializer=keras.initializers.Constant(-0.2))
    image_tower.build((None, 5))
    text_tower.build((None, 4))
    image_tower.kernel.assign(np.random.default_rng(2).normal(size=(5, 3)))
    text_tower.kernel.assign(np.random.default_rng(3).normal(size=(4, 3)))
    loss = build_loss(name, temperature=0.5)
    loss.gather_negatives = gather_negatives
    variables = [image_tower.kernel, text_tower.kernel, *loss.trainable_weights]
    return image_tower, text_tower, loss, variables


# Rows 0 and 5 (on different replicas when split 4 + 4 or 4 + 3), and 2 and 3, share a caption; by the labels,
# caption 1 fits images 1, 4 and 6, caption 6 fits images 6 and 2 (across replicas).
BATCH_CAPTION_IDS = np.array([11, 12, 13, 13, 14, 11, 15, 16], dtype=np.int64)
BATCH_IMAGE_LABELS = np.array([[1, 0], [2, 3], [4, 9], [5, 0], [2, 0], [1, 0], [9, 2], [8, 0]], dtype=np.int64)
BATCH_CAPTION_LABELS = np.array([[1], [2], [4], [5], [2], [1], [9], [8]], dtype=np.int64)
# Rows 1 and 6 are one image (several captions per image), across the replicas.
BATCH_IMAGE_IDS = np.array([21, 22, 23, 24, 25, 26, 22, 27], dtype=np.int64)


def _loss_and_gradients(
    image_tower, text_tower, loss, variables, features, caption_features, caption_ids=None, image_labels=None,
    caption_labels=None, image_ids=None,
):  # fmt: skip
    with tf.GradientTape() as tape:
        image_embeddings = tf.math.l2_normalize(image_tower(features), axis=-1)
        text_embeddings = tf.math.l2_normalize(text_tower(caption_features), axis=-1)
        value = loss(image_embeddings, text_embeddings, caption_ids, image_labels, caption_labels, image_ids=image_ids)
    return value, tape.gradient(value, [v.value for v in variables])


@functools.cache
def _two_replicas() -> tf.distribute.MirroredStrategy:
    """One strategy for this module, with collective keys of its own.

    Every MirroredStrategy in a process starts from the same collective keys, and the runtime aborts when a
    later strategy sends differently shaped tensors under a key an earlier one used (tensorflow#62790).
    TF's own tests give each strategy its own key range through `_collective_key_base`, read at construction.
    """
    default_base = tf.distribute.MirroredStrategy._collective_key_base
    tf.distribute.MirroredStrategy._collective_key_base = 7_000_000
    try:
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    finally:
        tf.distribute.MirroredStrategy._collective_key_base = default_base


def _two_replica_loss_and_gradients(name, batch_size, gather_negatives=True, duplicates=False):
    strategy = _two_replicas()
    with strategy.scope():
        towers_and_loss = _towers_and_loss(name, gather_negatives)
    fit_inputs = _fit_inputs(batch_size, duplicates)
    dataset = tf.data.Dataset.from_tensor_slices((FEATURES[:batch_size], CAPTION_FEATURES[:batch_size], *fit_inputs))
    batch = next(iter(strategy.experimental_distribute_dataset(dataset.batch(batch_size))))

    @tf.function
    def step(features, caption_features, *fit_inputs):
        value, gradients = strategy.run(_loss_and_gradients, args=(*towers_and_loss, features, caption_features, *fit_inputs))
        # What the training loop does: SUM the per-replica losses and gradients.
        reduce = lambda x: strategy.reduce(tf.distribute.ReduceOp.SUM, x, axis=None)  # noqa: E731
        return reduce(value), [reduce(g) for g in gradients]

    return step(*batch)


def _fit_inputs(batch_size, duplicates):
    """(caption_ids, image_labels, caption_labels, image_ids) of the first `batch_size` rows: none fit any other
    row's image unless `duplicates`, then the duplicate captions, label fits and repeated image above (across the
    replicas too)."""
    if not duplicates:
        rows = np.arange(1, batch_size + 1, dtype=np.int64)
        return rows, rows[:, None], rows[:, None], rows
    return (
        BATCH_CAPTION_IDS[:batch_size], BATCH_IMAGE_LABELS[:batch_size], BATCH_CAPTION_LABELS[:batch_size],
        BATCH_IMAGE_IDS[:batch_size],
    )  # fmt: skip


@pytest.mark.parametrize("duplicates", [False, True], ids=["distinct", "fits-across-replicas"])
@pytest.mark.parametrize("name", ["clip", "siglip", "soft_target"])
@pytest.mark.parametrize("batch_size", [8, 7])  # 7 splits unevenly, 4 + 3
def test_two_replicas_with_gathering_equal_one_device_on_the_whole_batch(name, batch_size, duplicates):
    value, gradients = _two_replica_loss_and_gradients(name, batch_size, duplicates=duplicates)
    fit_inputs = [tf.constant(x) for x in _fit_inputs(batch_size, duplicates)] if duplicates else []
    expected_value, expected_gradients = _loss_and_gradients(
        *_towers_and_loss(name), FEATURES[:batch_size], CAPTION_FEATURES[:batch_size], *fit_inputs
    )
    if duplicates:  # the duplicates matter: the loss differs from the one with all captions distinct
        distinct_value, _ = _loss_and_gradients(*_towers_and_loss(name), FEATURES[:batch_size], CAPTION_FEATURES[:batch_size])
        assert abs(float(distinct_value) - float(expected_value)) > 1e-4
    np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-5)
    assert len(gradients) == len(expected_gradients)
    for got, expected in zip(gradients, expected_gradients):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_two_replicas_without_gathering_average_the_local_losses():
    value, _ = _two_replica_loss_and_gradients("clip", 8, gather_negatives=False)
    image_tower, text_tower, loss, variables = _towers_and_loss("clip")
    halves = [
        _loss_and_gradients(image_tower, text_tower, loss, variables, FEATURES[s], CAPTION_FEATURES[s])[0]
        for s in (slice(0, 4), slice(4, 8))
    ]
    np.testing.assert_allclose(float(value), float(np.mean(halves)), rtol=1e-5)


def test_an_sgd_step_on_two_replicas_equals_one_device():
    """Through `optimizer.apply_gradients`, whose cross-replica aggregation is the SUM the loss expects."""

    def train_step(image_tower, text_tower, loss, variables, optimizer, features, caption_features):
        _, gradients = _loss_and_gradients(image_tower, text_tower, loss, variables, features, caption_features)
        optimizer.apply_gradients(zip(gradients, variables))

    strategy = _two_replicas()
    with strategy.scope():
        distributed = (*_towers_and_loss("clip"), keras.optimizers.SGD(1.0))
        distributed[-1].build(distributed[3])
    batch = next(iter(strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((FEATURES, CAPTION_FEATURES)).batch(8)
    )))  # fmt: skip
    tf.function(lambda f, c: strategy.run(train_step, args=(*distributed, f, c)))(*batch)

    single = (*_towers_and_loss("clip"), keras.optimizers.SGD(1.0))
    train_step(*single, FEATURES, CAPTION_FEATURES)
    for got, expected in zip(distributed[3], single[3]):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(single[3][0].numpy(), _towers_and_loss("clip")[3][0].numpy())  # the step moved weights
