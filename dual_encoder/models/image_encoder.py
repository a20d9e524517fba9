"""Image towers: a registry of backbones, each with its own preprocessing and resizing inside the tower."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable, Optional

import keras
from keras import ops

from dual_encoder.models.layers import ModelConfigError

IMAGENET = "imagenet"


def _conv_stages(inputs, width: int):
    """Three stages (widths `width`, `2 * width`, `3 * width`) of a stride-2 conv and a conv, ReLU: the map at 1/8."""
    x = inputs
    for stage, filters in enumerate((width, 2 * width, 3 * width)):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", name=f"stage{stage}_down")(x)
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"stage{stage}_conv")(x)
    return x


def build_small_cnn(image_size: int, width: int, pooled: bool = False) -> keras.Model:
    """A small conv net trainable from scratch: three stages (widths `width`, `2 * width`, `3 * width`) of a
    stride-2 conv and a conv, ReLU, then the feature map flattened (and, with `pooled`, its global max beside).

    Output size is `(image_size / 8)^2 * 3 * width` (`+ 3 * width` with `pooled`). Choices that matter for
    contrastive training from scratch: no batch normalisation, because batch statistics let a batch's images
    see each other and the loss can then fall without the images being learnt (the train loss drops while
    retrieval stays near chance); flattening instead of global pooling, because where an object is ("on the
    left") is part of what captions say; and, with `pooled`, a global max beside it, because "a red star"
    means one anywhere: a max-pooled channel says "there is one" whatever the place, where the flattened map
    must learn that once for every place (measured: short queries stay near chance without it).
    """
    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = _conv_stages(inputs, width)
    outputs = keras.layers.Flatten(name="flatten")(x)
    if pooled:
        anywhere = keras.layers.GlobalMaxPooling2D(name="anywhere")(x)
        outputs = keras.layers.Concatenate(name="anywhere_and_where")([anywhere, outputs])
    return keras.Model(inputs, outputs, name="small_cnn_pooled" if pooled else "small_cnn")


PIXEL_COLOURS = 16  # per-pixel colour detectors of `small_cnn_detectors`
DETECTORS_PER_WIDTH = 8  # `small_cnn_detectors` has 8 * width detectors at each cell of its last map


def _shapes_and_colours(inputs, width: int):
    """`_conv_stages`' map beside per-pixel colour detectors (a 1x1 conv on the input) max-pooled to its cells."""
    shapes = _conv_stages(inputs, width)
    colours = keras.layers.Conv2D(PIXEL_COLOURS, 1, activation="relu", name="pixel_colours")(inputs)
    colours = keras.layers.MaxPooling2D(8, padding="same", name="colours_per_cell")(colours)
    return keras.layers.Concatenate(name="shapes_and_colours")([shapes, colours])


def build_small_cnn_detectors(image_size: int, width: int) -> keras.Model:
    """`small_cnn`'s three stages, then a bank of `8 * width` detectors at each cell of the 1/8 map that see
    the cell's shapes and its pixels' colours together; their global max (what is anywhere) beside their
    flattened map (what is where).

    Why each part (measured on the synthetic demo, see BENCHMARKS.md): a deep small net trained contrastively
    from scratch learns shapes first and colours last, if ever — by the time the loss needs colour, the
    last stage has kept little of it. Per-pixel colour detectors (a 1×1 conv on the input, max-pooled to the
    last map's grid: "which colours are in this cell") hand colour to the last stage directly; a 1×1 conv
    bank on both can then hold one detector per combination ("a red star here") — binding, which a max over
    separate colour and shape channels loses when an image holds a red circle and a blue star. Output size is
    `8 * width * ((image_size / 8)^2 + 1)`.
    """
    inputs = keras.Input((image_size, image_size, 3), name="images")
    cells = _shapes_and_colours(inputs, width)
    detectors = keras.layers.Conv2D(DETECTORS_PER_WIDTH * width, 1, activation="relu", name="detectors")(cells)
    anywhere = keras.layers.GlobalMaxPooling2D(name="anywhere")(detectors)
    where = keras.layers.Flatten(name="where")(detectors)
    outputs = keras.layers.Concatenate(name="anywhere_and_where")([anywhere, where])
    return keras.Model(inputs, outputs, name="small_cnn_detectors")


def build_small_cnn_cells(image_size: int, width: int) -> keras.Model:
    """`small_cnn`'s three stages and the per-pixel colour detectors of `small_cnn_detectors`, each cell of the
    1/8 map kept apart: the output is the flattened map of `3 * width + 16` features per cell, row by row, for a
    head that scores cells (`heads.kind: second_order`, `models.layers.CellGramHead`). No pooling here: which
    colour goes with which shape is decided per cell by the head, and a pooled vector would have mixed them.
    Output size is `cells_per_side(image_size)^2 * (3 * width + 16)`.
    """
    inputs = keras.Input((image_size, image_size, 3), name="images")
    cells = _shapes_and_colours(inputs, width)
    return keras.Model(inputs, keras.layers.Flatten(name="cells")(cells), name="small_cnn_cells")


def cells_per_side(image_size: int) -> int:
    """Cells along each side of the 1/8 map of the small_cnn family (three stride-2 'same' convolutions)."""
    return -(-image_size // 8)


def _scale_to_symmetric_unit(images):
    return images / 127.5 - 1.0


def _centre_on_image_colour(images):
    """Each image minus its own mean colour, scaled to about [-1, 1]: the background's colour (the bulk of the
    pixels, and in photos the light's cast) is taken out, so what the net sees first is how things differ
    from it — the objects' own colours."""
    return (images - ops.mean(images, axis=(1, 2), keepdims=True)) / 127.5


def _application(constructor) -> Callable[[int, int, Optional[str]], keras.Model]:
    """A `keras.applications` constructor as a registry builder: headless, average-pooled."""

    def build(image_size: int, width: int, weights: Optional[str]) -> keras.Model:
        del width  # only `small_cnn` has a configurable width
        return constructor(include_top=False, weights=weights, pooling="avg", input_shape=(image_size, image_size, 3))

    return build


def _from_scratch(build_net: Callable[[int, int], keras.Model]) -> Callable[[int, int, Optional[str]], keras.Model]:
    def build(image_size: int, width: int, weights: Optional[str]) -> keras.Model:
        if weights == IMAGENET:
            raise ModelConfigError(
                "the small_cnn towers have no ImageNet weights: use image_weights=null or a local .weights.h5 file"
            )
        return build_net(image_size, width)

    return build


@dataclasses.dataclass(frozen=True)
class ImageBackboneSpec:
    """How to build one image backbone.

    Args:
        build: `(image_size, width, weights) -> keras.Model` mapping preprocessed images to pooled features;
            `weights` is "imagenet" or None.
        preprocess: raw 0-255 RGB float images -> what the backbone expects (its own `preprocess_input`).
        min_size: the smallest input size the architecture accepts.
        grid: `image_size -> cells per side` for a backbone whose features are a flattened square map of cells
            (row by row, the same features for each); None for one pooled vector.
    """

    build: Callable[[int, int, Optional[str]], keras.Model]
    preprocess: Callable
    min_size: int
    grid: Optional[Callable[[int], int]] = None


_apps = keras.applications
IMAGE_BACKBONES: dict[str, ImageBackboneSpec] = {
    "xception": ImageBackboneSpec(_application(_apps.Xception), _apps.xception.preprocess_input, 71),
    "efficientnetv2_b0": ImageBackboneSpec(
        _application(_apps.EfficientNetV2B0), _apps.efficientnet_v2.preprocess_input, 32
    ),
    "mobilenetv3_small": ImageBackboneSpec(
        _application(_apps.MobileNetV3Small), _apps.mobilenet_v3.preprocess_input, 32
    ),
    "resnet50": ImageBackboneSpec(_application(_apps.ResNet50), _apps.resnet50.preprocess_input, 32),
    "small_cnn": ImageBackboneSpec(_from_scratch(build_small_cnn), _scale_to_symmetric_unit, 8),
    "small_cnn_pooled": ImageBackboneSpec(
        _from_scratch(functools.partial(build_small_cnn, pooled=True)), _centre_on_image_colour, 8
    ),
    "small_cnn_detectors": ImageBackboneSpec(_from_scratch(build_small_cnn_detectors), _centre_on_image_colour, 8),
    "small_cnn_cells": ImageBackboneSpec(
        _from_scratch(build_small_cnn_cells), _centre_on_image_colour, 8, grid=cells_per_side
    ),
}


def build_image_backbone(name: str, image_size: int, width: int, weights: Optional[str]) -> keras.Model:
    """Build a registered backbone; `weights` is "imagenet", a local `.weights.h5` file, or None."""
    if name not in IMAGE_BACKBONES:
        raise ModelConfigError(f"unknown image_backbone '{name}'; choose one of {sorted(IMAGE_BACKBONES)}")
    spec = IMAGE_BACKBONES[name]
    if image_size < spec.min_size:
        raise ModelConfigError(f"image_size {image_size} is below the minimum {spec.min_size} of {name}")
    if weights is None or weights == IMAGENET:
        return spec.build(image_size, width, weights)
    path = Path(weights)
    if not path.name.endswith(".weights.h5"):
        raise ModelConfigError(f"image_weights must be 'imagenet', null or a .weights.h5 file, not '{weights}'")
    if not path.is_file():
        raise ModelConfigError(f"image_weights file not found: {path}")
    backbone = spec.build(image_size, width, None)
    try:
        backbone.load_weights(path)
    except ValueError as error:
        raise ModelConfigError(f"{path} does not hold weights of {name} at size {image_size}: {error}") from None
    return backbone


class ImageEncoder(keras.layers.Layer):
    """Image tower without its head: raw 0-255 RGB images -> pooled backbone features.

    Preprocessing lives inside: images (uint8 or float, any size) are cast, resized to `image_size` if
    their size differs, and passed through the backbone's own `preprocess_input`.

    Args:
        backbone: a name in `IMAGE_BACKBONES`.
        image_size: side of the square input the backbone is built for.
        weights: "imagenet", a local `.weights.h5` file of this backbone, or None (random).
        width: base width of `small_cnn` (ignored by the others).
        trainable: False freezes the backbone (and runs batch norm and dropout in inference mode).

    Example:
        >>> tower = ImageEncoder("small_cnn", image_size=32, width=8)
        >>> tower(np.zeros((1, 32, 32, 3), "uint8")).shape
        TensorShape([1, 384])
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        image_size: int = 64,
        weights: Optional[str] = None,
        width: int = 32,
        trainable: bool = True,
        **kwargs,
    ):
        super().__init__(trainable=trainable, **kwargs)
        self.backbone_name = backbone
        self.image_size = image_size
        self.weights_source = weights
        self.width = width
        self.backbone = build_image_backbone(backbone, image_size, width, weights)
        self.backbone.trainable = trainable
        self._preprocess = IMAGE_BACKBONES[backbone].preprocess
        self.output_dim = int(self.backbone.output.shape[-1])
        grid = IMAGE_BACKBONES[backbone].grid
        self.grid = None if grid is None else grid(image_size)  # cells per side of a backbone that keeps its cells
        self.built = True

    def call(self, images, training=False):
        images = ops.cast(images, "float32")
        if tuple(images.shape[1:3]) != (self.image_size, self.image_size):
            images = ops.image.resize(images, (self.image_size, self.image_size))
        return self.backbone(self._preprocess(images), training=training and self.trainable)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "backbone": self.backbone_name,
            "image_size": self.image_size,
            "weights": self.weights_source,
            "width": self.width,
        }


def build_image_encoder(section) -> ImageEncoder:
    """The image tower of a `SmallCnnConfig` or `ApplicationConfig` section (`dual_encoder.model_config`)."""
    return ImageEncoder(
        section.backbone,
        image_size=section.size,
        weights=section.weights,
        width=getattr(section, "width", 32),  # only the small_cnn family has a width
        trainable=section.trainable,
        name="image_encoder",
    )
