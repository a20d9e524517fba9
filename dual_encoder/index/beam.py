"""Embedding on Apache Beam (optional extra `beam`), one pipeline with two sources: an image gallery (list -> read and
decode -> RunInference -> shards -> one index, written atomically) and a prepared dataset's split (its TFRecords and
captions -> the locked towers -> shards -> the training feature caches, `BeamFeatures`).

The launcher lists the gallery (as `index build` does) and checks the model (its fingerprint, the image input its
tower wants); the workers read every file with
`dual_encoder.files` and decode it with `dual_encoder.images` (EXIF, the pixel limit, countable skip reasons) and
TensorFlow's `decode_and_resize`, exactly as the local path does, then embed batches with RunInference and a
`ModelHandler` of ours that loads our model folder (Beam's TensorFlow handlers load SavedModels with
`tf.keras.models.load_model`, which cannot read Keras 3 models: apache/beam#30616). Results are grouped into a fixed
number of shards by a hash of each file's listing position, so a retried bundle rewrites the same shard file with
the same rows and leaves no duplicate behind; the launcher then merges the shards (keeping one row per path) into
an `ImageIndex` and saves it with the one atomic-directory mechanism.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import shutil
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from dual_encoder import files, images
from dual_encoder.atomic import writer_lock
from dual_encoder.config import DataConfig, IndexConfig
from dual_encoder.errors import DualEncoderError
from dual_encoder.index.errors import GallerySourceError
from dual_encoder.index.items import ImageRecord
from dual_encoder.index.store import ImageIndex, check_replaceable

if TYPE_CHECKING:  # the launcher imports TensorFlow only when it needs it
    from dual_encoder.data.pipeline import ImageResize

ImageSize = Union[int, "ImageResize"]  # a square side, or the model's own resize (`data.pipeline.image_input`)

RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner"}
# The DirectRunner's defaults here: one process per core, each with its own model (tests use 2).
DIRECT_DEFAULTS = {"direct_running_mode": "multi_processing", "direct_num_workers": "2"}
ROWS_PER_SHARD = 5_000
_PNG_COMPRESS_LEVEL = 1  # as the local path: the PNG lives only until TensorFlow decodes it
_SHARD_SUFFIX = ".npz"
TEXT_ENTRIES = frozenset({"text_features"})  # entry points that take strings, not images


class BeamUnavailableError(DualEncoderError, ImportError):
    """Apache Beam (extra `beam`) is needed for `--runner` but is not installed."""


def import_beam():
    try:
        import apache_beam
    except ImportError as error:
        raise BeamUnavailableError("--runner needs Apache Beam: pip install 'dual_encoder[beam]'") from error
    return apache_beam


@dataclasses.dataclass(frozen=True)
class GalleryFile:
    """One listed file, numbered in listing order (the row order of the index)."""

    position: int
    path: str


def pipeline_options(runner: str, options: Sequence[str] = ()):
    """Beam `PipelineOptions` for `runner` (direct, dataflow, flink, spark) and `KEY=VALUE` strings."""
    beam = import_beam()
    if runner not in RUNNERS:
        raise DualEncoderError(f"unknown runner '{runner}'; choose one of {sorted(RUNNERS)}")
    given = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise DualEncoderError(f"--pipeline-option '{option}' is not of the form KEY=VALUE")
        given[key.strip().lstrip("-")] = value
    if runner == "direct":
        given = {**DIRECT_DEFAULTS, **given}
    flags = [f"--{key}={value}" for key, value in given.items()]
    return beam.options.pipeline_options.PipelineOptions(flags, runner=RUNNERS[runner])


# -- the workers' side ------------------------------------------------------------------------------------------


def read_and_decode(item: GalleryFile, image_size: ImageSize, max_pixels: int) -> tuple[str, Any]:
    """`("image", (record, pixels))` for a readable image, else `("skipped", (position, path, reason, detail))`.

    The same checks as `open_gallery` + `FileGallery` (regular file, UTF-8 name, size and pixel limits, EXIF
    orientation via `images.tf_readable`) and the same TensorFlow resize as the local path.
    """
    from dual_encoder.data.pipeline import decode_and_resize

    path = item.path
    try:
        if files.name_problem(path):
            raise files.FileRefusedError(files.Refused.BAD_NAME)
        info = files.check_regular(path)
        data = files.read_bytes(path)
        readable = images.tf_readable(data, max_pixels, _PNG_COMPRESS_LEVEL)[0]
    except files.FileRefusedError as refused:
        return "skipped", (item.position, files.printable(path), refused.reason, refused.detail)
    try:
        pixels = decode_and_resize(readable, image_size).numpy()
    except Exception:  # TensorFlow's decoders raise InvalidArgumentError and others
        return "skipped", (item.position, path, files.Refused.CORRUPT, "TensorFlow could not decode it")
    record = {"position": item.position, "path": path, "sha256": hashlib.sha256(data).hexdigest(),
              "size": len(data), "mtime": info.st_mtime}  # fmt: skip
    return "image", (record, pixels)


@dataclasses.dataclass(frozen=True)
class DatasetRecord:
    """One image of a prepared split: its TFRecord, as workers see it, and where in it (the item table's offsets)."""

    position: int
    shard: str
    offset: int
    length: int


def read_record_and_decode(item: DatasetRecord, image_size: ImageSize) -> tuple[str, Any]:
    """`("image", ({"position": …}, pixels))` for one record of a prepared split, decoded as `make_image_dataset`
    decodes it; `("skipped", (position, where, reason, detail))` if it cannot be read."""
    import tensorflow as tf
    from apache_beam.io.filesystems import FileSystems

    from dual_encoder.data import tfrecords
    from dual_encoder.data.pipeline import decode_and_resize

    where = f"{item.shard}@{item.offset}"
    try:
        with FileSystems.open(item.shard, compression_type="uncompressed") as stream:
            stream.seek(item.offset)
            serialized = stream.read(item.length)
        if len(serialized) != item.length:
            return "skipped", (item.position, where, files.Refused.CORRUPT, "the TFRecord file is truncated")
        encoded = tfrecords.parse_example(tf.constant(serialized))["image/encoded"]
        pixels = decode_and_resize(encoded, image_size).numpy()
    except Exception as error:  # a missing shard, a corrupt record or image: the cache cannot be complete
        return "skipped", (item.position, where, files.Refused.CORRUPT, f"{type(error).__name__}: {error}"[:200])
    return "image", ({"position": item.position}, pixels)


def _model_handler_class():
    beam = import_beam()
    from apache_beam.ml.inference.base import ModelHandler

    class TowerHandler(ModelHandler):
        """RunInference's handle on one entry point of our model (`models.compiled`): loads a model folder and runs
        `entry` on batches: uint8 images for `encode_image` / `image_features`, strings for `text_features`.

        Args:
            model_dir: the model folder, local or on a file system Beam reads (`gs://…`; copied to the worker).
            batch_size: largest batch RunInference gives the tower.
            entry: the tower entry point to run.
        """

        def __init__(self, model_dir: str, batch_size: int, entry: str = "encode_image"):
            super().__init__(min_batch_size=1, max_batch_size=batch_size)
            self.model_dir = str(model_dir)
            self.entry = entry

        def load_model(self):
            from dual_encoder.models import load_model
            from dual_encoder.models.compiled import compiled

            return compiled(load_model(_local_copy(self.model_dir)), self.entry)

        def run_inference(self, batch: Sequence[Any], model, inference_args=None) -> Iterable[np.ndarray]:
            if self.entry in TEXT_ENTRIES:
                import tensorflow as tf

                return list(np.asarray(model(tf.constant(list(batch), dtype=tf.string))))
            return list(np.asarray(model(np.stack(batch))))

        def get_metrics_namespace(self) -> str:
            return f"dual_encoder_{self.entry}"

    del beam
    return TowerHandler


def make_model_handler(model_dir: str, batch_size: int, entry: str = "encode_image"):
    """A keyed RunInference handler for the tower entry point `entry` (the key carries each row's record)."""
    from apache_beam.ml.inference.base import KeyedModelHandler

    return KeyedModelHandler(_model_handler_class()(model_dir, batch_size, entry))


def _local_copy(model_dir: str) -> str:
    """`model_dir` itself if it is local, else a copy in a temporary folder (workers of a cloud runner)."""
    if "://" not in model_dir:
        return model_dir
    from apache_beam.io.filesystems import FileSystems

    target = Path(tempfile.mkdtemp(prefix="dual-encoder-model-"))
    prefix = model_dir.rstrip("/") + "/"
    for match in FileSystems.match([prefix + "**"])[0].metadata_list:
        relative = match.path[len(prefix) :]
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        with FileSystems.open(match.path) as source, open(target / relative, "wb") as sink:
            shutil.copyfileobj(source, sink)
    return str(target)


def shard_of(position: int, shards: int) -> int:
    """A file's shard: fixed by its listing position, so a retried bundle's rows land where they did before."""
    return zlib.crc32(position.to_bytes(8, "little")) % shards


def write_shard(keyed: tuple[int, Iterable[tuple[str, Any]]], directory: str) -> str:
    """Write one shard's rows (`("image" | "text", (record, embedding))` / `("skipped", ...)`) to
    `directory/shard-K.npz`.

    The content depends only on which files are in the shard, and the write replaces the whole file, so a
    retried bundle leaves exactly one copy of each row.
    """
    from apache_beam.io.filesystems import FileSystems

    shard, rows = keyed[0], list(keyed[1])
    embedded, texts = (sorted((row for kind, row in rows if kind == wanted), key=lambda row: row[0]["position"])
                       for wanted in ("image", "text"))  # fmt: skip
    skipped = sorted(row for kind, row in rows if kind == "skipped")
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=_stacked(embedded), records=json.dumps([row[0] for row in embedded]),
             skipped=json.dumps(skipped), text_embeddings=_stacked(texts),
             text_records=json.dumps([row[0] for row in texts]))  # fmt: skip
    path = FileSystems.join(directory, f"shard-{shard:05d}{_SHARD_SUFFIX}")
    staging = f"{path}.{uuid.uuid4().hex}.tmp"
    with FileSystems.create(staging) as stream:
        stream.write(buffer.getvalue())
    FileSystems.rename([staging], [path])  # whole, or not at all: a killed attempt leaves only its .tmp
    return path


def _stacked(rows: list) -> np.ndarray:
    return np.stack([row[1] for row in rows]).astype(np.float32) if rows else np.zeros((0, 0), np.float32)


def build_pipeline(pipeline, items: list, read, image_handler, shards_dir: str, shards: int,
                   captions: Sequence[tuple[int, str]] = (), text_handler=None):  # fmt: skip
    """Add the embedding steps to `pipeline`; returns the PCollection of written shard paths.

    Args:
        items: the source's elements (`GalleryFile`s of a gallery, `DatasetRecord`s of a prepared split); none
            with `image_handler` None (a split's captions only).
        read: turns one item into `("image", (record, pixels))` or `("skipped", (position, path, reason, detail))`.
        image_handler: the keyed RunInference handler the images go through.
        captions: `(row, text)` pairs for `text_handler` (a prepared split's captions), rows written as "text".
    """
    beam = import_beam()
    from apache_beam.ml.inference.base import RunInference

    branches = []
    if image_handler is not None:
        decoded = pipeline | "List" >> beam.Create(items) | "Spread" >> beam.Reshuffle() | "ReadAndDecode" >> beam.Map(read)
        images_only = decoded | "Images" >> beam.Filter(lambda out: out[0] == "image") | beam.Map(lambda out: out[1])
        branches += [
            decoded | "Skipped" >> beam.Filter(lambda out: out[0] == "skipped"),
            images_only
            | "KeyByRecord" >> beam.Map(lambda pair: (json.dumps(pair[0]), pair[1]))
            | "Embed" >> RunInference(image_handler)
            | "Rows" >> beam.MapTuple(lambda record, vector: ("image", (json.loads(record), np.asarray(vector)))),
        ]
    if captions:
        branches.append(
            pipeline
            | "ListCaptions" >> beam.Create([(json.dumps({"position": row}), text) for row, text in captions])
            | "SpreadCaptions" >> beam.Reshuffle()
            | "EmbedCaptions" >> RunInference(text_handler)
            | "TextRows" >> beam.MapTuple(lambda record, vector: ("text", (json.loads(record), np.asarray(vector))))
        )
    return (
        tuple(branches)
        | "Together" >> beam.Flatten()
        | "KeyByShard" >> beam.Map(lambda row: (shard_of(_position(row), shards), row))
        | "Shards" >> beam.GroupByKey()
        | "WriteShards" >> beam.Map(write_shard, directory=shards_dir)
    )


def _position(row: tuple[str, Any]) -> int:
    kind, value = row
    return value[0] if kind == "skipped" else value[0]["position"]


# -- the launcher's side ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MergedShards:
    records: list[ImageRecord]
    embeddings: np.ndarray
    skipped: list  # SkippedFile


def merge_shards(directory: str) -> MergedShards:
    """Read every shard in `directory`: one row per path (the first in listing order), rows in listing order."""
    from apache_beam.io.filesystems import FileSystems

    from dual_encoder.index.embed import SkippedFile

    pattern = FileSystems.join(directory, f"shard-*{_SHARD_SUFFIX}")
    paths = sorted(metadata.path for metadata in FileSystems.match([pattern])[0].metadata_list)
    rows: dict[str, tuple[dict, np.ndarray]] = {}
    skipped: dict[str, tuple] = {}
    for path in paths:
        with FileSystems.open(path) as stream:
            shard = np.load(io.BytesIO(stream.read()))
            for record, vector in zip(json.loads(str(shard["records"])), shard["embeddings"]):
                held = rows.get(record["path"])
                if held is None or record["position"] < held[0]["position"]:
                    rows[record["path"]] = (record, vector)
            for position, file_path, reason, detail in json.loads(str(shard["skipped"])):
                skipped.setdefault(file_path, (position, file_path, reason, detail))
    ordered = sorted(rows.values(), key=lambda row: row[0]["position"])
    records = [ImageRecord(path=r["path"], sha256=r["sha256"], size=r["size"], mtime=r["mtime"]) for r, _ in ordered]
    embeddings = np.stack([vector for _, vector in ordered]) if ordered else np.zeros((0, 0), np.float32)
    return MergedShards(records, embeddings, [SkippedFile(p, r, d) for _, p, r, d in sorted(skipped.values())])


def build_index_on_beam(
    model_dir: Union[str, Path],
    source: Union[str, Path],
    output: Union[str, Path],
    config: IndexConfig = IndexConfig(),
    runner: str = "direct",
    options: Sequence[str] = (),
    max_image_pixels: int = DataConfig.max_image_pixels,
    overwrite: bool = False,
    shards_dir: Optional[str] = None,
    worker_model_dir: Optional[str] = None,
):
    """`build_index` with the embedding done by an Apache Beam pipeline on `runner`.

    Args:
        model_dir: the model folder (read here for its fingerprint and image input).
        source: an image folder or a list file, at the same path for the launcher and every worker.
        output: the index directory to write (atomically; an existing index only with `overwrite`).
        config: index settings; `embed_batch_size` is RunInference's largest batch.
        runner: `direct`, `dataflow`, `flink` or `spark`.
        options: `KEY=VALUE` pipeline options (`project=…`, `region=…`, `temp_location=gs://…`,
            `requirements_file=…`, `flink_master=…`, `direct_num_workers=…`).
        max_image_pixels: images larger than this are skipped as too large.
        overwrite: replace an existing index at `output`.
        shards_dir: where workers write shards (must be readable here too); default a hidden folder beside `output`.
        worker_model_dir: where workers read the model (a staged copy, e.g. `gs://bucket/model`); default `model_dir`.

    Returns:
        an `IndexSummary`, with skipped files counted by reason as locally.
    """
    from dual_encoder.index.build import _summary
    from dual_encoder.index.embed import SkippedFile, _list_file, _list_folder
    from dual_encoder.data.pipeline import image_input
    from dual_encoder.models import load_checked_model
    from dual_encoder.models.io import resolve_model_dir

    started = time.perf_counter()
    output = Path(output).absolute()
    check_replaceable(output, overwrite)
    options_ = pipeline_options(runner, options)
    source = Path(source)
    if not source.exists():
        raise GallerySourceError(f"gallery source {source} does not exist")
    with writer_lock(output):
        check_replaceable(output, overwrite)
        paths, skipped = _list_folder(source) if source.is_dir() else _list_file(source)
        listed = [GalleryFile(position, path) for position, path in enumerate(paths)]
        # The model is loaded here only for its image input (a paired preset's converter crops and resizes its own way).
        model, model_record = load_checked_model(model_dir)
        image_size = image_input(model)
        del model
        resolved = resolve_model_dir(model_dir).absolute()
        local_shards = shards_dir is None
        shards_dir = shards_dir or tempfile.mkdtemp(prefix=f".{output.name}.shards-", dir=output.parent)
        try:
            beam = import_beam()
            with beam.Pipeline(options=options_) as pipeline:
                read = functools.partial(read_and_decode, image_size=image_size, max_pixels=max_image_pixels)
                handler = make_model_handler(worker_model_dir or str(resolved), config.embed_batch_size)
                build_pipeline(pipeline, listed, read, handler, shards_dir, _shard_count(len(listed)))
            merged = merge_shards(shards_dir)
        finally:
            if local_shards:
                shutil.rmtree(shards_dir, ignore_errors=True)
        skipped = skipped + merged.skipped
        if not merged.records:
            raise GallerySourceError(f"no images could be indexed from {source} ({len(skipped)} files skipped)")
        index = ImageIndex.create(merged.embeddings, merged.records, config, model_record)
        path = index.save(output, overwrite=overwrite)
        return _summary(index, path, started, embedded=len(merged.records), skipped=skipped)



def _shard_count(rows: int) -> int:
    return max(1, -(-rows // ROWS_PER_SHARD))


# -- the second source: a prepared split's feature cache ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BeamFeatures:
    """Computes a prepared split's features of the locked towers on an Apache Beam runner: a drop-in for
    `features.compute_features` (`load_or_compute_features(..., compute=BeamFeatures("direct"))`), so the per-tower
    caches it fills are the local ones, same keys, same files.

    The launcher saves the model it was given as a model folder in `staging_dir`; the workers load it and run only
    the towers asked for: for `image`, they read each image's TFRecord at its offset, decode it as
    `make_image_dataset` does and run `image_features`; for `text`, captions go through `text_features`; rows come
    back as shards, merged in the split's order.

    Args:
        runner: `direct`, `dataflow`, `flink` or `spark`.
        options: `KEY=VALUE` pipeline options, as for `build_index_on_beam`.
        staging_dir: where the model snapshot and the shards go, readable by the workers and here (`gs://…` on
            Dataflow); default a hidden folder in `<data_dir>/features`. The launcher's folder in it is removed after.
        worker_data_dir: the prepared dataset as the workers see it (e.g. a copy at `gs://bucket/prepared`);
            default the dataset's own folder.
    """

    runner: str = "direct"
    options: tuple[str, ...] = ()
    staging_dir: Optional[str] = None
    worker_data_dir: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "options", tuple(self.options))
        pipeline_options(self.runner, self.options)  # a bad runner or option fails before any work

    def __call__(
        self, model, data_dir: Union[str, Path], split: str, towers: Sequence[str] = ("image", "text"), *,
        batch_size: int = 64, progress: bool = True,
    ):  # fmt: skip
        from dual_encoder.data.pipeline import image_input, read_split
        from dual_encoder.features import TEXT_BATCH_FACTOR, SplitFeatures

        beam = import_beam()
        data_dir = Path(data_dir).absolute()
        info = read_split(data_dir, split)
        worker_data = (self.worker_data_dir or str(data_dir)).rstrip("/")
        records = [
            DatasetRecord(position, f"{worker_data}/{info.shards[shard].relative_to(data_dir).as_posix()}", offset, length)
            for position, (shard, offset, length) in enumerate(info.locations.tolist())
        ] if "image" in towers else []  # fmt: skip
        captions = list(enumerate(c for image_captions in info.captions for c in image_captions)) if "text" in towers else []
        with _staging_folder(self.staging_dir, data_dir / "features", f".{split}-beam-") as staging:
            model_dir = _put_model(model, staging)
            shards_dir = f"{staging}/shards"
            read = functools.partial(read_record_and_decode, image_size=image_input(model))
            handlers = {
                "image_handler": make_model_handler(model_dir, batch_size, "image_features") if "image" in towers else None,
                "text_handler": make_model_handler(model_dir, TEXT_BATCH_FACTOR * batch_size, "text_features"),
            }
            with beam.Pipeline(options=pipeline_options(self.runner, self.options)) as pipeline:
                shards = _shard_count(len(records) + len(captions))
                build_pipeline(pipeline, records, read, shards_dir=shards_dir, shards=shards, captions=captions, **handlers)
            image_rows, text_rows, skipped = merge_feature_shards(shards_dir, len(records), len(captions))
        if skipped:
            position, where, reason, detail = skipped[0]
            raise DualEncoderError(
                f"{len(skipped)} images of split '{split}' could not be read on the workers, e.g. image {position} "
                f"({where}): {reason}" + (f" ({detail})" if detail else "")
            )
        return SplitFeatures(
            num_captions=info.num_captions(),
            image_features=image_rows if "image" in towers else None,
            text_features=text_rows if "text" in towers else None,
        )


def merge_feature_shards(directory: str, num_images: int, num_captions: int) -> tuple[np.ndarray, np.ndarray, list]:
    """`(image rows, text rows, skipped)` from a feature pipeline's shards: one row per position, in order."""
    from apache_beam.io.filesystems import FileSystems

    pattern = FileSystems.join(directory, f"shard-*{_SHARD_SUFFIX}")
    found: dict[str, dict[int, np.ndarray]] = {"image": {}, "text": {}}
    skipped = {}
    for path in sorted(metadata.path for metadata in FileSystems.match([pattern])[0].metadata_list):
        with FileSystems.open(path) as stream:
            shard = np.load(io.BytesIO(stream.read()))
            for kind, records, vectors in (("image", "records", "embeddings"), ("text", "text_records", "text_embeddings")):
                for record, vector in zip(json.loads(str(shard[records])), shard[vectors]):
                    found[kind].setdefault(record["position"], vector)
            for row in json.loads(str(shard["skipped"])):
                skipped.setdefault(row[0], tuple(row))
    expected = {"image": num_images - len(skipped), "text": num_captions}
    if any(len(found[kind]) != count for kind, count in expected.items()):
        got = {kind: len(rows) for kind, rows in found.items()}
        raise DualEncoderError(f"the Beam feature shards in {directory} hold {got} rows, not {expected}")
    stacked = [np.stack([found[kind][p] for p in sorted(found[kind])]) if found[kind] else np.zeros((0, 0), np.float32)
               for kind in ("image", "text")]  # fmt: skip
    return stacked[0], stacked[1], [skipped[p] for p in sorted(skipped)]


@contextlib.contextmanager
def _staging_folder(given: Optional[str], default_parent: Path, prefix: str) -> Iterator[str]:
    """A fresh folder for one run (inside `given`, local or `scheme://`, else in `default_parent`), removed after."""
    from apache_beam.io.filesystems import FileSystems

    if given and "://" in given:
        folder = f"{given.rstrip('/')}/{prefix.lstrip('.')}{uuid.uuid4().hex}"
        try:
            yield folder
        finally:
            if FileSystems.exists(folder):
                FileSystems.delete([folder])
        return
    parent = Path(given) if given else default_parent
    parent.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _put_model(model, staging: str) -> str:
    """Save `model` as a model folder at `<staging>/model` (via a local copy when staging is `scheme://`)."""
    from dual_encoder.models import save_model

    target = f"{staging}/model"
    if "://" not in staging:
        return str(save_model(model, target))
    from apache_beam.io.filesystems import FileSystems

    with tempfile.TemporaryDirectory(prefix="dual-encoder-model-") as local:
        saved = save_model(model, Path(local) / "model")
        for path in sorted(p for p in saved.rglob("*") if p.is_file()):
            with open(path, "rb") as source, FileSystems.create(f"{target}/{path.relative_to(saved).as_posix()}") as sink:
                shutil.copyfileobj(source, sink)
    return target
