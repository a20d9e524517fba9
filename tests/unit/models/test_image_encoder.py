"""Image towers: every backbone builds, preprocessing and resizing live inside, local weights files load."""

import keras
import numpy as np
import pytest

from dual_encoder.models.image_encoder import IMAGE_BACKBONES, ImageEncoder, build_image_backbone
from dual_encoder.models.layers import ModelConfigError

# The heavy ones at their smallest inputs, marked slow (they still run in CI).
SIZES = {
    "xception": 71, "resnet50": 32, "efficientnetv2_b0": 32, "mobilenetv3_small": 32, "small_cnn": 32,
    "small_cnn_pooled": 32, "small_cnn_detectors": 32, "small_cnn_cells": 32,
}  # fmt: skip
HEAVY = {"xception", "resnet50"}


def test_every_registered_backbone_has_a_test_size():
    assert set(SIZES) == set(IMAGE_BACKBONES)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in sorted(SIZES)]
)
def test_backbone_builds_and_runs_one_image(name):
    size = SIZES[name]
    tower = ImageEncoder(name, image_size=size, weights=None, width=8)
    image = np.random.default_rng(0).integers(0, 256, (1, size, size, 3)).astype("uint8")
    features = np.asarray(tower(image))
    assert features.shape == (1, tower.output_dim)
    assert np.isfinite(features).all()


def test_small_cnn_keeps_a_spatial_map_whose_size_follows_width_and_image_size():
    # (image_size / 8)^2 positions x 3 * width channels: where an object is survives into the features.
    assert ImageEncoder("small_cnn", image_size=32, width=8).output_dim == 16 * 24
    assert ImageEncoder("small_cnn", image_size=32, width=4).output_dim == 16 * 12
    assert ImageEncoder("small_cnn", image_size=64, width=4).output_dim == 64 * 12


def test_small_cnn_pooled_adds_a_global_max_and_ignores_the_images_own_colour_cast():
    tower = ImageEncoder("small_cnn_pooled", image_size=32, width=8)
    assert tower.output_dim == 24 + 16 * 24  # the max of each of the last stage's channels, then the map
    rng = np.random.default_rng(0)
    image = rng.integers(40, 200, (1, 32, 32, 3)).astype("float32")
    shifted = image + np.array([30.0, -20.0, 10.0], dtype="float32")  # the same picture under another light
    np.testing.assert_allclose(tower(image), tower(shifted), rtol=1e-4, atol=1e-4)
    assert not np.allclose(tower(image), tower(image[:, :, :, ::-1]), atol=1e-3)  # colours themselves count
    backbone = tower.backbone
    max_branch = keras.Model(backbone.input, backbone.get_layer("anywhere").output)
    moved = np.roll(image, 8, axis=2)  # the same content elsewhere: the anywhere branch barely changes
    prepared = [(x - x.mean(axis=(1, 2), keepdims=True)) / 127.5 for x in (image, moved)]
    assert np.abs(max_branch(prepared[0]) - max_branch(prepared[1])).mean() < np.abs(max_branch(prepared[0])).mean()


def test_small_cnn_detectors_see_colours_and_shapes_together_in_each_cell():
    from dual_encoder.data.synthetic import ShapeObject, render_scene

    tower = ImageEncoder("small_cnn_detectors", image_size=64, width=4)
    assert tower.output_dim == 32 * (8 * 8 + 1)  # 8 * width detectors: their global max, then their map
    backbone = tower.backbone
    assert backbone.get_layer("colours_per_cell").output.shape[1:3] == backbone.get_layer("stage2_conv").output.shape[1:3]

    def picture(first, second):  # a star and a circle in fixed places, coloured `first` and `second`
        scene = (ShapeObject("star", first, "large", "top left"), ShapeObject("circle", second, "large", "bottom right"))
        return np.asarray(render_scene(scene, 64, np.random.default_rng(0)), dtype="float32")[None]

    anywhere = keras.Model(backbone.input, backbone.get_layer("anywhere").output)
    prepare = lambda x: (x - x.mean(axis=(1, 2), keepdims=True)) / 127.5  # noqa: E731
    red_star, blue_star = (np.asarray(anywhere(prepare(picture(*c)))) for c in (("red", "blue"), ("blue", "red")))
    # The same colours and shapes, bound the other way round: a max over colour channels and shape channels
    # apart would not tell them apart; detectors on both at each cell do.
    assert np.abs(red_star - blue_star).max() > 1e-3
    image = picture("red", "blue")
    np.testing.assert_allclose(tower(image), tower(image + np.array([20.0, -10.0, 5.0], "float32")), rtol=1e-4, atol=1e-4)


def test_small_cnn_features_of_an_image_do_not_depend_on_the_rest_of_its_batch(images):
    # Batch statistics would let a contrastive loss fall without learning the images.
    tower = ImageEncoder("small_cnn", image_size=32, width=8)
    batch = tower(images, training=True)
    alone = tower(images[:1], training=True)
    np.testing.assert_allclose(batch[:1], alone, rtol=1e-4, atol=1e-5)


def test_uint8_and_float_inputs_agree(images):
    tower = ImageEncoder("small_cnn", image_size=32, width=8)
    np.testing.assert_allclose(tower(images), tower(images.astype("float32")), rtol=1e-5, atol=1e-6)


def test_preprocess_input_runs_inside_the_tower(images):
    # ResNet50's caffe preprocessing (BGR, mean subtraction) must be applied by the tower, not the caller.
    tower = ImageEncoder("resnet50", image_size=32, width=8)
    expected = tower.backbone(keras.applications.resnet50.preprocess_input(images.astype("float32")))
    np.testing.assert_allclose(tower(images), expected, rtol=1e-4, atol=1e-5)


def test_other_sizes_are_resized_inside_the_tower(images):
    tower = ImageEncoder("small_cnn", image_size=32, width=8)
    large = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # 64x64, nearest-neighbour upscaled
    resized = keras.ops.image.resize(large.astype("float32"), (32, 32))
    np.testing.assert_allclose(tower(large), tower(resized), rtol=1e-5, atol=1e-6)
    assert tower(large).shape == (3, tower.output_dim)


@pytest.mark.parametrize("name", ["small_cnn", "mobilenetv3_small"])
def test_local_weights_file_loads_into_the_backbone(name, tmp_path, images):
    source = ImageEncoder(name, image_size=32, width=8)
    path = tmp_path / f"{name}.weights.h5"
    source.backbone.save_weights(path)
    loaded = ImageEncoder(name, image_size=32, width=8, weights=str(path))
    fresh = ImageEncoder(name, image_size=32, width=8)
    # Untrained MobileNetV3 outputs are ~1e-11: compare relatively.
    np.testing.assert_allclose(loaded(images), source(images), rtol=1e-5, atol=0)
    assert not np.allclose(fresh(images), source(images), rtol=1e-2, atol=0)


def test_frozen_tower_has_no_trainable_weights_and_runs_in_inference_mode(images):
    tower = ImageEncoder("small_cnn", image_size=32, width=8, trainable=False)
    assert tower.trainable_weights == [] and len(tower.non_trainable_weights) > 0
    np.testing.assert_allclose(tower(images, training=True), tower(images, training=False))
    trainable = ImageEncoder("small_cnn", image_size=32, width=8, trainable=True)
    assert len(trainable.trainable_weights) > 0


@pytest.mark.parametrize(
    "name, size, weights, message",
    [
        ("vgg_tiny", 32, None, "unknown image_backbone 'vgg_tiny'"),
        ("xception", 32, None, "below the minimum 71"),
        ("small_cnn", 32, "imagenet", "small_cnn towers have no ImageNet weights"),
        ("small_cnn", 32, "weights.npz", "must be 'imagenet', null or a .weights.h5 file"),
        ("small_cnn", 32, "/nonexistent/model.weights.h5", "file not found"),
    ],
)
def test_bad_settings_raise_a_clear_error(name, size, weights, message):
    with pytest.raises(ModelConfigError, match=message):
        build_image_backbone(name, size, 8, weights)


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_weights_of_another_architecture_raise_a_clear_error(tmp_path):
    path = tmp_path / "other.weights.h5"
    build_image_backbone("small_cnn", 32, 4, None).save_weights(path)
    with pytest.raises(ModelConfigError, match="does not hold weights of mobilenetv3_small"):
        build_image_backbone("mobilenetv3_small", 32, 8, str(path))


def test_small_cnn_cells_keeps_each_cell_apart_for_a_head_that_scores_cells():
    from dual_encoder.data.synthetic import ShapeObject, render_scene

    tower = ImageEncoder("small_cnn_cells", image_size=64, width=4)
    assert tower.grid == 8 and tower.output_dim == 8 * 8 * (3 * 4 + 16)  # shapes and colours of each cell
    assert ImageEncoder("small_cnn_cells", image_size=36, width=4).grid == 5  # 'same' padding rounds up
    assert ImageEncoder("small_cnn_detectors", image_size=64, width=4).grid is None  # pooled beside its map

    def cells(position):
        scene = (ShapeObject("star", "red", "small", position),)
        image = np.asarray(render_scene(scene, 64, np.random.default_rng(0)), dtype="float32")[None]
        return np.asarray(tower(image)).reshape(8, 8, -1)

    left, right = cells("left"), cells("right")
    changed = np.abs(left - right).max(axis=-1)  # per cell
    # A star moved from left to right changes the cells of both sides: where it is stays in the features.
    assert changed[:, :3].max() > 1e-3 and changed[:, 5:].max() > 1e-3
