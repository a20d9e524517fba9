"""Gallery embedding on Apache Beam (optional extra `beam`): list -> read and decode -> RunInference -> shards ->
one index, written atomically.

The launcher lists the gallery (as `index build` does) and fingerprints the model; the workers read every file with
`dual_encoder.files` and decode it with `dual_encoder.images` (EXIF, the pixel limit, countable skip reasons) and
TensorFlow's `decode_and_resize`, exactly as the local path does, then embed batches with RunInference and a
`ModelHandler` of ours that loads our model folder (Beam's TensorFlow handlers load SavedModels with
`tf.keras.models.load_model`, which cannot read Keras 3 models: apache/beam#30616). Results are grouped into a fixed
number of shards by a hash of each file's listing position, so a retried bundle rewrites the same shard file with
the same rows and leaves no duplicate behind; the launcher then merges the shards (keeping one row per path) into
an `ImageIndex` and saves it with the one atomic-directory mechanism.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from dual_encoder import files, images
from dual_encoder.atomic import writer_lock
from dual_encoder.config import DataConfig, IndexConfig
from dual_encoder.errors import DualEncoderError
from dual_encoder.index.errors import GallerySourceError
from dual_encoder.index.items import ImageRecord
from dual_encoder.index.store import ImageIndex, ModelRecord, check_replaceable

RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner"}
# The DirectRunner's defaults here: one process per core, each with its own model (tests use 2).
DIRECT_DEFAULTS = {"direct_running_mode": "multi_processing", "direct_num_workers": "2"}
ROWS_PER_SHARD = 5_000
_PNG_COMPRESS_LEVEL = 1  # as the local path: the PNG lives only until TensorFlow decodes it
_SHARD_SUFFIX = ".npz"


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


def read_and_decode(item: GalleryFile, image_size: int, max_pixels: int) -> tuple[str, Any]:
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


def _model_handler_class():
    beam = import_beam()
    from apache_beam.ml.inference.base import ModelHandler

    class ImageTowerHandler(ModelHandler):
        """RunInference's handle on our image tower: loads a model folder, embeds batches of uint8 images.

        Args:
            model_dir: the model folder, local or on a file system Beam reads (`gs://…`; copied to the worker).
            batch_size: largest batch RunInference gives the tower.
        """

        def __init__(self, model_dir: str, batch_size: int):
            super().__init__(min_batch_size=1, max_batch_size=batch_size)
            self.model_dir = str(model_dir)

        def load_model(self):
            from dual_encoder.models import load_model
            from dual_encoder.models.compiled import compiled

            return compiled(load_model(_local_copy(self.model_dir)), "encode_image")

        def run_inference(self, batch: Sequence[np.ndarray], model, inference_args=None) -> Iterable[np.ndarray]:
            return list(np.asarray(model(np.stack(batch))))

        def get_metrics_namespace(self) -> str:
            return "dual_encoder_image_tower"

    del beam
    return ImageTowerHandler


def make_model_handler(model_dir: str, batch_size: int):
    """A keyed RunInference handler (the key carries each image's record through inference)."""
    from apache_beam.ml.inference.base import KeyedModelHandler

    return KeyedModelHandler(_model_handler_class()(model_dir, batch_size))


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
    """Write one shard's rows (`("image", (record, embedding))` / `("skipped", ...)`) to `directory/shard-K.npz`.

    The content depends only on which files are in the shard, and the write replaces the whole file, so a
    retried bundle leaves exactly one copy of each row.
    """
    from apache_beam.io.filesystems import FileSystems

    shard, rows = keyed
    embedded = sorted((row for kind, row in rows if kind == "image"), key=lambda row: row[0]["position"])
    skipped = sorted(row for kind, row in rows if kind == "skipped")
    buffer = io.BytesIO()
    vectors = np.stack([row[1] for row in embedded]).astype(np.float32) if embedded else np.zeros((0, 0), np.float32)
    np.savez(buffer, embeddings=vectors, records=json.dumps([row[0] for row in embedded]),
             skipped=json.dumps(skipped))  # fmt: skip
    path = FileSystems.join(directory, f"shard-{shard:05d}{_SHARD_SUFFIX}")
    staging = f"{path}.{uuid.uuid4().hex}.tmp"
    with FileSystems.create(staging) as stream:
        stream.write(buffer.getvalue())
    FileSystems.rename([staging], [path])  # whole, or not at all: a killed attempt leaves only its .tmp
    return path


def build_pipeline(pipeline, listed: list[GalleryFile], model_dir: str, image_size: int, config: IndexConfig,
                   max_pixels: int, shards_dir: str, shards: int):  # fmt: skip
    """Add the embedding steps to `pipeline`; returns the PCollection of written shard paths."""
    beam = import_beam()
    from apache_beam.ml.inference.base import RunInference

    decoded = (
        pipeline
        | "List" >> beam.Create(listed)
        | "Spread" >> beam.Reshuffle()
        | "ReadAndDecode" >> beam.Map(read_and_decode, image_size=image_size, max_pixels=max_pixels)
    )
    images_only = decoded | "Images" >> beam.Filter(lambda out: out[0] == "image") | beam.Map(lambda out: out[1])
    skipped = decoded | "Skipped" >> beam.Filter(lambda out: out[0] == "skipped")
    embedded = (
        images_only
        | "KeyByRecord" >> beam.Map(lambda pair: (json.dumps(pair[0]), pair[1]))
        | "Embed" >> RunInference(make_model_handler(model_dir, config.embed_batch_size))
        | "Rows" >> beam.MapTuple(lambda record, vector: ("image", (json.loads(record), np.asarray(vector))))
    )
    return (
        (embedded, skipped)
        | "Together" >> beam.Flatten()
        | "KeyByShard" >> beam.Map(lambda row: (shard_of(_position(row), shards), row))
        | "Shards" >> beam.GroupByKey()
        | "WriteShards" >> beam.Map(write_shard, directory=shards_dir)
    )


def _position(row: tuple[str, Any]) -> int:
    kind, value = row
    return value[0]["position"] if kind == "image" else value[0]


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
        model_dir: the model folder (read here for its fingerprint and image size).
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
    from dual_encoder.models import model_fingerprint
    from dual_encoder.models.io import model_image_size, resolve_model_dir

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
        model_record = ModelRecord(os.path.abspath(model_dir), model_fingerprint(model_dir))
        resolved = resolve_model_dir(model_dir).absolute()
        image_size = model_image_size(resolved)
        local_shards = shards_dir is None
        shards_dir = shards_dir or tempfile.mkdtemp(prefix=f".{output.name}.shards-", dir=output.parent)
        try:
            beam = import_beam()
            with beam.Pipeline(options=options_) as pipeline:
                build_pipeline(
                    pipeline, listed, worker_model_dir or str(resolved), image_size, config, max_image_pixels, shards_dir,
                    max(1, -(-len(listed) // ROWS_PER_SHARD)),
                )  # fmt: skip
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

