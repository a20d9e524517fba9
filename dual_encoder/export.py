"""SavedModels for serving: text encoder, image encoder, and a searcher with the index baked in.

Each loads with only `tensorflow` (plus `tensorflow_text` where a KerasHub tokenizer runs in the graph)
imported, not this package. Every artifact also has a token-id signature built from core TF ops only, for
stock TF Serving, whose bundled TF Text is too old for newer tokenizer ops (tensorflow/serving#2267).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import tensorflow as tf

from dual_encoder.atomic import EXPORT, atomic_directory, check_replaceable, writer_lock
from dual_encoder.config import DataConfig
from dual_encoder.data.pipeline import decode_and_resize, image_input
from dual_encoder.search import REQUEST_PREFIX, Searcher

TEXT_ENCODER, IMAGE_ENCODER, SEARCHER = "text_encoder", "image_encoder", "searcher"


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    output: Path
    artifacts: dict[str, Path]
    signatures: dict[str, list[str]]
    needs_tensorflow_text: bool


class _IndexTables(tf.Module):
    """The gallery baked into the searcher: embeddings (as stored), item ids and paths."""

    def __init__(self, searcher: Searcher):
        super().__init__(name="index")
        index = searcher.index
        self.embeddings = tf.Variable(index.embeddings, trainable=False, name="embeddings")
        self.ids = tf.Variable(index.items.ids, trainable=False, dtype=tf.int64, name="ids")
        self.paths = tf.Variable(list(index.items.paths), trainable=False, dtype=tf.string, name="paths")


def _normalize_queries(queries: tf.Tensor) -> tf.Tensor:
    """In-graph twin of `search.normalize_query` (RE2 has no look-ahead: the trailing space is consumed)."""
    collapsed = tf.strings.strip(tf.strings.regex_replace(queries, r"\s+", " "))
    stripped = tf.strings.strip(tf.strings.regex_replace(collapsed, rf"^(?i)(?:{REQUEST_PREFIX})(?: |$)", ""))
    tf.debugging.Assert(
        tf.reduce_all(tf.strings.length(stripped) > 0),
        ["a query is empty, or only a request phrase such as 'find images of'", queries],
    )
    return stripped


def _top_k(tables: _IndexTables, query_embeddings: tf.Tensor, k: tf.Tensor) -> dict:
    count = tf.shape(tables.embeddings, out_type=tf.int32)[0]
    tf.debugging.Assert(k > 0, ["k must be a positive integer, got", k])
    k = tf.minimum(k, count)
    scores = tf.matmul(query_embeddings, tf.cast(tables.embeddings, tf.float32), transpose_b=True)
    top = tf.math.top_k(scores, k=k)  # ties: the lower row first, as in the Python index
    return {"scores": top.values, "ids": tf.gather(tables.ids, top.indices), "paths": tf.gather(tables.paths, top.indices)}


def _token_spec(model):
    length = model.sequence_length
    return [
        tf.TensorSpec([None, length], tf.int32, name="token_ids"),
        tf.TensorSpec([None, length], tf.int32, name="padding_mask"),
    ]


def _write(archive: keras.export.ExportArchive, path: Path) -> None:
    archive.write_out(str(path), verbose=False)


def export_text_encoder(model, path: Path) -> list[str]:
    """strings -> embeddings (`serving_default`), token ids -> embeddings (`encode_token_ids`), `tokenize`."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        lambda texts: {"embeddings": tf.cast(model.encode_text(texts), tf.float32)},
        input_signature=[tf.TensorSpec([None], tf.string, name="texts")],
    )
    archive.add_endpoint(
        "encode_token_ids",
        lambda ids, mask: {"embeddings": tf.cast(model.encode_token_ids(ids, tf.cast(mask, tf.bool)), tf.float32)},
        input_signature=_token_spec(model),
    )
    archive.add_endpoint(
        "tokenize",
        lambda texts: {name: tf.cast(value, tf.int32) for name, value in model.tokenize(texts).items()},
        input_signature=[tf.TensorSpec([None], tf.string, name="texts")],
    )
    _write(archive, path)
    return ["serving_default", "serve", "encode_token_ids", "tokenize"]


def _header_int(data: tf.Tensor, offset: int, size: int, big_endian: bool) -> tf.Tensor:
    """An unsigned integer of `size` bytes at `offset` of `data` (zero-padded, so short inputs do not fail)."""
    padded = tf.strings.join([data, tf.constant(b"\0" * 32)])
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, offset, size), tf.uint8), tf.int64)
    shifts = tf.range(size - 1, -1, -1, dtype=tf.int64) if big_endian else tf.range(size, dtype=tf.int64)
    return tf.reduce_sum(tf.bitwise.left_shift(raw, shifts * 8))


def declared_pixels(data: tf.Tensor) -> tf.Tensor:
    """Width x height that an encoded JPEG/PNG/GIF/BMP declares in its header (int64), read without decoding.

    The in-graph twin of `files.open_image`'s check: a 50 KB PNG can declare 400 megapixels, and
    `tf.io.decode_image` would allocate them all. Other formats (which the encoder does not accept) give -1.
    """
    magic = tf.strings.substr(tf.strings.join([data, tf.constant(b"\0" * 4)]), 0, 4)

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        return shape[0] * shape[1]

    def png():
        return _header_int(data, 16, 4, True) * _header_int(data, 20, 4, True)

    def gif():
        return _header_int(data, 6, 2, False) * _header_int(data, 8, 2, False)

    def bmp():
        width, height = _header_int(data, 18, 4, False), _header_int(data, 22, 4, False)
        height = tf.where(height >= 1 << 31, (1 << 32) - height, height)  # negative = top-down rows
        return width * height

    branches = [
        (tf.strings.substr(magic, 0, 2) == b"\xff\xd8", jpeg),
        (magic == b"\x89PNG", png),
        (magic == b"GIF8", gif),
        (tf.strings.substr(magic, 0, 2) == b"BM", bmp),
    ]
    return tf.case(branches, default=lambda: tf.constant(-1, tf.int64), exclusive=False)


# Reading a JPEG's EXIF orientation in the graph: how far to look (real files have ~5 segments before the EXIF
# block and ~10 IFD0 entries before the orientation tag), and zero bytes appended so every read is in range.
_MAX_JPEG_SEGMENTS, _MAX_IFD_ENTRIES = 32, 64
_EXIF_PAD = 12 * _MAX_IFD_ENTRIES + 16
_ORIENTATION_TAG = 0x0112


def _bytes_at(padded: tf.Tensor, position: tf.Tensor, count: int) -> tf.Tensor:
    """`count` bytes of `padded` from `position` (clamped into the string) as int64 [count]."""
    position = tf.clip_by_value(tf.cast(position, tf.int64), 0, tf.cast(tf.strings.length(padded), tf.int64) - count)
    return tf.reshape(tf.cast(tf.io.decode_raw(tf.strings.substr(padded, position, count), tf.uint8), tf.int64), [count])


def _uint(raw: tf.Tensor, big_endian: tf.Tensor) -> tf.Tensor:
    """The unsigned integer of the bytes `raw` ([..., n]), big- or little-endian."""
    n = raw.shape[-1]
    weights = tf.constant([1 << (8 * i) for i in range(n)], tf.int64)
    return tf.reduce_sum(raw * tf.where(big_endian, tf.reverse(weights, [0]), weights), axis=-1)


def exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1-8, int32) of an encoded JPEG, read in the graph; 1 for anything else.

    Walks the JPEG's segments to the APP1 `Exif` block and looks the orientation tag up in its first IFD, as
    Pillow's `ImageOps.exif_transpose` does for a JPEG. Only JPEG: PNG `eXIf` chunks are not read.
    """
    length = tf.cast(tf.strings.length(data), tf.int64)
    padded = tf.strings.join([data, tf.constant(b"\0" * _EXIF_PAD)])
    big = tf.constant(True)

    def more(position, tiff, steps):
        return (position + 10 <= length) & (tiff < 0) & (steps < _MAX_JPEG_SEGMENTS)

    def next_segment(position, tiff, steps):
        head = _bytes_at(padded, position, 10)
        is_exif = (head[1] == 0xE1) & tf.reduce_all(head[4:10] == tf.constant(list(b"Exif\0\0"), tf.int64))
        tiff = tf.where(is_exif, position + 10, tiff)
        # A byte that is no marker, or start-of-scan / end-of-image (pixel data follows): stop looking.
        stop = (head[0] != 0xFF) | (head[1] == 0xDA) | (head[1] == 0xD9)
        return tf.where(stop, length, position + 2 + _uint(head[2:4], big)), tiff, steps + 1

    is_jpeg = tf.strings.substr(padded, 0, 2) == b"\xff\xd8"
    start = tf.where(is_jpeg, tf.constant(2, tf.int64), length)
    _, tiff, _ = tf.while_loop(more, next_segment, (start, tf.constant(-1, tf.int64), tf.constant(0)))

    order = _bytes_at(padded, tiff, 8)
    big_endian = tf.reduce_all(order[:2] == 0x4D)  # "MM"; "II" is little-endian
    valid = (tiff >= 0) & (tf.reduce_all(order[:2] == 0x4D) | tf.reduce_all(order[:2] == 0x49))
    ifd = tiff + _uint(order[4:8], big_endian)
    count = _uint(_bytes_at(padded, ifd, 2), big_endian)
    entries = tf.reshape(_bytes_at(padded, ifd + 2, 12 * _MAX_IFD_ENTRIES), [_MAX_IFD_ENTRIES, 12])
    tags, values = _uint(entries[:, 0:2], big_endian), _uint(entries[:, 8:10], big_endian)
    found = (tags == _ORIENTATION_TAG) & (tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64) < count)
    orientation = tf.reduce_max(tf.where(found, values, 0))  # one tag at most; 0 when there is none
    in_range = valid & (orientation >= 1) & (orientation <= 8)
    return tf.cast(tf.where(in_range, orientation, 1), tf.int32)


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """`image` [H, W, C] turned upright for an EXIF `orientation`, as `ImageOps.exif_transpose` turns it.

    Applied to a square, already resized image: flips, quarter turns and transposes commute with the resize and
    with a central crop to the aspect ratio (up to float rounding), so the decoding in `data.pipeline.decode_and_resize` is used unchanged.
    """
    transpose = lambda x: tf.transpose(x, [1, 0, 2])  # noqa: E731
    branches = [
        lambda: image,  # 1 (and anything unknown): as stored
        lambda: image,
        lambda: tf.image.flip_left_right(image),  # 2: mirrored
        lambda: tf.image.rot90(image, 2),  # 3: upside down
        lambda: tf.image.flip_up_down(image),  # 4
        lambda: transpose(image),  # 5
        lambda: tf.image.rot90(image, 3),  # 6: turn 90° clockwise (a phone held upright)
        lambda: tf.image.rot90(transpose(image), 2),  # 7
        lambda: tf.image.rot90(image, 1),  # 8: turn 90° counter-clockwise
    ]
    return tf.switch_case(orientation, branches)


def image_bytes_encoder(model, max_pixels: int = DataConfig.max_image_pixels):
    """A graph function: encoded image bytes (JPEG/PNG/GIF/BMP, string [N]) -> float32 embeddings [N, D].

    Each image's header is checked before it is decoded: another format, or more than `max_pixels` pixels,
    fails the call with an InvalidArgument error naming the limit. An empty batch gives `[0, D]` embeddings.

    A JPEG's EXIF orientation is applied in the graph (`exif_orientation`), so a phone's portrait photo is
    embedded upright, as `index build` embeds it. Not read in the graph: orientation stored in a PNG's `eXIf`
    chunk or in XMP, which Pillow honours: send such images upright, or embed them with `index build`.
    WebP, TIFF and HEIC are not accepted here: decode them (with Pillow, `dual_encoder.images`) and send PNG.
    """
    resize, dim = image_input(model), model.embed_dim

    def decode(data):
        pixels = declared_pixels(data)
        checks = [
            tf.debugging.assert_greater(pixels, tf.constant(0, tf.int64), message="not a JPEG, PNG, GIF or BMP image"),
            tf.debugging.assert_less_equal(
                pixels, tf.constant(max_pixels, tf.int64), message=f"image refused: more than {max_pixels} pixels"
            ),
        ]
        with tf.control_dependencies(checks):
            return apply_orientation(decode_and_resize(data, resize), exif_orientation(data))

    def encode(image_bytes):
        pixels = tf.TensorSpec([resize.size, resize.size, 3], resize.dtype)
        images = tf.map_fn(decode, image_bytes, fn_output_signature=pixels)
        return tf.cast(model.encode_image(images), tf.float32)

    def encode_any(image_bytes):
        empty = lambda: tf.zeros([0, dim], tf.float32)  # noqa: E731 - the model cannot run on zero images
        return tf.cond(tf.size(image_bytes) > 0, lambda: encode(image_bytes), empty)

    return encode_any


def export_image_encoder(model, path: Path, max_pixels: int = DataConfig.max_image_pixels) -> list[str]:
    """Encoded image bytes (JPEG/PNG/GIF/BMP) -> embeddings, decoding and resizing in the graph
    (`image_bytes_encoder`: header checks, EXIF orientation of JPEGs, `[0, D]` for an empty batch)."""
    encode = image_bytes_encoder(model, max_pixels)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        lambda image_bytes: {"embeddings": encode(image_bytes)},
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    _write(archive, path)
    return ["serving_default", "serve"]


def export_searcher(searcher: Searcher, path: Path, max_pixels: int = DataConfig.max_image_pixels) -> list[str]:
    """Query strings and k -> ids, scores, paths of the top k (`serving_default`); `search_token_ids` takes
    token ids instead of strings and needs only core TF ops; `search_by_image` takes encoded image bytes
    (JPEG/PNG/GIF/BMP, as the image encoder) and finds the images most like each."""
    model, tables = searcher.model, _IndexTables(searcher)
    encode_images = image_bytes_encoder(model, max_pixels)

    def search(queries, k):
        normalized = _normalize_queries(queries)
        return {**_top_k(tables, tf.cast(model.encode_text(normalized), tf.float32), k), "normalized_queries": normalized}

    def search_token_ids(ids, mask, k):
        return _top_k(tables, tf.cast(model.encode_token_ids(ids, tf.cast(mask, tf.bool)), tf.float32), k)

    def search_by_image(image_bytes, k):
        return _top_k(tables, encode_images(image_bytes), k)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(tables)
    k_spec = tf.TensorSpec([], tf.int32, name="k")
    archive.add_endpoint("search", search, input_signature=[tf.TensorSpec([None], tf.string, name="queries"), k_spec])
    archive.add_endpoint("search_token_ids", search_token_ids, input_signature=[*_token_spec(model), k_spec])
    archive.add_endpoint(
        "search_by_image", search_by_image, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"), k_spec]
    )
    _write(archive, path)
    return ["serving_default", "search", "search_token_ids", "search_by_image"]


def export_saved_models(
    index_dir: str | Path,
    output: str | Path,
    model_dir: str | Path | None = None,
    max_image_pixels: int = DataConfig.max_image_pixels,
    *,
    overwrite: bool = False,
) -> ExportSummary:
    """Write `text_encoder/`, `image_encoder/` and `searcher/` SavedModels plus `export.json` under `output`.

    The model is the one the index was built with (its fingerprint is checked). The image encoder refuses
    images over `max_image_pixels`. The whole output is written atomically (`dual_encoder.atomic`), so a failed
    export leaves a previous one intact; a previous export is replaced only with `overwrite`, any other folder
    never.
    """
    output = Path(output)
    check_replaceable(output, EXPORT, overwrite=overwrite)  # before loading anything: a refusal touches nothing
    with writer_lock(output):
        return _export(Searcher.load(index_dir, model_dir=model_dir), output, overwrite, max_image_pixels)


def _export(searcher: Searcher, output: Path, overwrite: bool, max_image_pixels: int) -> ExportSummary:
    with atomic_directory(output, EXPORT, overwrite=overwrite) as staging:
        signatures = {
            TEXT_ENCODER: export_text_encoder(searcher.model, staging / TEXT_ENCODER),
            IMAGE_ENCODER: export_image_encoder(searcher.model, staging / IMAGE_ENCODER, max_image_pixels),
            SEARCHER: export_searcher(searcher, staging / SEARCHER, max_image_pixels),
        }
        needs_text = searcher.model.model_config.tower("text").needs_tensorflow_text
        (staging / "export.json").write_text(
            json.dumps(
                {
                    **EXPORT.stamp(),
                    "model": searcher.info(),
                    "signatures": signatures,
                    "needs_tensorflow_text": needs_text,
                    "image_size": searcher.model.image_size,
                    "max_image_pixels": max_image_pixels,
                    "sequence_length": searcher.model.sequence_length,
                },
                indent=2,
                default=str,
            )
        )
    artifacts = {name: output / name for name in signatures}
    return ExportSummary(output, artifacts, signatures, needs_text)
