"""The one feature spec: serialize/parse round trip, sharding, the item table's record offsets, manifests."""

import dataclasses
import json

import pytest
import tensorflow as tf

from dual_encoder.data import tfrecords
from dual_encoder.data.sources import DataError
from dual_encoder.data.tfrecords import Example, decode_example, parse_example, read_items, serialize_example

EXAMPLES = [
    Example(
        image_id=f"id-{i}",
        source_path=f"/photos/{i}.jpg",
        image_bytes=bytes(range(i, i + 50)) * (i + 1),
        image_format="jpeg",
        captions=tuple(f"caption {j} — café" for j in range(i % 3 + 1)),
    )
    for i in range(5)
]


def test_serialize_and_parse_round_trip_eagerly_and_in_tf_data():
    serialized = [serialize_example(e) for e in EXAMPLES]
    assert [decode_example(s) for s in serialized] == EXAMPLES
    parsed = list(tf.data.Dataset.from_tensor_slices(serialized).map(parse_example).as_numpy_iterator())
    for example, features in zip(EXAMPLES, parsed, strict=True):
        assert features["image/encoded"] == example.image_bytes
        assert [c.decode() for c in features["captions"]] == list(example.captions)
        assert features["image/id"].decode() == example.image_id


def test_write_shards_splits_by_size_and_indexes_every_record(tmp_path):
    written = tfrecords.write_shards(iter(EXAMPLES), tmp_path, "train", shard_size=2)
    assert [s["file"] for s in written.shards] == [f"train-0000{i}.tfrecord" for i in range(3)]
    assert [s["images"] for s in written.shards] == [2, 2, 1]
    assert (written.images, written.captions) == (5, sum(len(e.captions) for e in EXAMPLES))
    assert list(tfrecords.read_examples(tmp_path / s["file"] for s in written.shards)) == EXAMPLES

    items = read_items(tmp_path / written.items.file)
    assert [(i["image_id"], i["source_path"], tuple(i["captions"])) for i in items] == [
        (e.image_id, e.source_path, e.captions) for e in EXAMPLES
    ]
    for item, example in zip(items, EXAMPLES):  # the offsets address each serialized record
        with open(tmp_path / written.shards[item["shard"]]["file"], "rb") as handle:
            handle.seek(item["offset"])
            assert decode_example(handle.read(item["length"])) == example
    assert written.items.sha256 == tfrecords.file_sha256(tmp_path / "train.jsonl")


def test_write_shards_of_nothing_writes_an_empty_item_table(tmp_path):
    written = tfrecords.write_shards(iter([]), tmp_path, "validation", shard_size=2)
    assert (written.images, written.shards) == (0, [])
    assert read_items(tmp_path / "validation.jsonl") == []


def test_read_manifest_errors_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        tfrecords.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{", encoding="utf-8")
    with pytest.raises(DataError, match="unreadable manifest"):
        tfrecords.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}), encoding="utf-8")
    with pytest.raises(DataError, match="unsupported format_version 99"):
        tfrecords.read_manifest(tmp_path)


def test_verify_dataset_finds_missing_and_changed_files(tmp_path):
    written = tfrecords.write_shards(iter(EXAMPLES), tmp_path, "train", shard_size=3)
    split = {"shards": written.shards, "items": dataclasses.asdict(written.items)}
    tfrecords.write_manifest(tmp_path, {"format_version": tfrecords.FORMAT_VERSION, "splits": {"train": split}})
    tfrecords.verify_dataset(tmp_path)

    shard = tmp_path / written.shards[1]["file"]
    shard.write_bytes(b"X" + shard.read_bytes()[1:])
    tfrecords.verify_dataset(tmp_path, checksums=False)  # same size: only the checksum can tell
    with pytest.raises(DataError, match="checksum mismatch"):
        tfrecords.verify_dataset(tmp_path)
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        tfrecords.verify_dataset(tmp_path, checksums=False)
