"""tf.data pipelines: decode eagerly == in tf.data, epoch order and caption sampling, fixed-order image batches."""

import numpy as np
import pytest
import tensorflow as tf

from dual_encoder.data.pipeline import (
    caption_ids,
    label_arrays,
    decode_and_resize,
    epoch_order,
    make_image_dataset,
    make_train_dataset,
    read_split,
    sample_caption_indices,
    sampled_caption_rows,
)
from dual_encoder.data.prepare import prepare_dataset
from dual_encoder.data.sources import DataError
from dual_encoder.data.tfrecords import read_examples

from .fixtures import TEST_CONFIG, pattern, write_csv, write_image

NUM_IMAGES = 13


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """13 images of mixed formats and sizes, with 1–4 captions each (every caption unique to its image)."""
    root = tmp_path_factory.mktemp("pipeline")
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("gif", "GIF"), ("bmp", "BMP")]
    rows = []
    for i in range(NUM_IMAGES):
        extension, format = formats[i % 4]
        write_image(root / f"{i}.{extension}", pattern(20 + 4 * i, 16 + 2 * i, seed=i), format)
        rows += [(f"{i}.{extension}", f"image {i} caption {j}") for j in range(1 + i % 4)]
    write_csv(root / "pairs.csv", rows)
    return prepare_dataset("csv", root / "pairs.csv", root, root / "prepared", TEST_CONFIG, progress=False).output


def _image_of(caption: bytes) -> int:
    return int(caption.decode().split()[1])


def test_decode_and_resize_gives_the_same_tensor_eagerly_and_in_tf_data(prepared):
    encoded = [example.image_bytes for example in read_examples(read_split(prepared, "train").shards)]
    eager = [decode_and_resize(tf.constant(data), 32).numpy() for data in encoded]
    dataset = tf.data.Dataset.from_tensor_slices(encoded).map(lambda data: decode_and_resize(data, 32))
    mapped = list(dataset.as_numpy_iterator())
    assert len(eager) == len(mapped) > 0
    for one, other in zip(eager, mapped):
        assert one.dtype == np.uint8 and one.shape == (32, 32, 3)
        np.testing.assert_array_equal(one, other)


def test_decode_and_resize_keeps_pixels_at_the_same_size_and_antialiases_when_shrinking():
    pixels = pattern(32, 32)
    png = tf.io.encode_png(pixels)
    np.testing.assert_array_equal(decode_and_resize(png, 32).numpy(), pixels)
    stripes = np.zeros((32, 32, 3), np.uint8)
    stripes[:, ::4] = 255  # every 4th column white: an antialiased 4x shrink averages to 64; sampling misses them
    small = decode_and_resize(tf.io.encode_png(stripes), 8).numpy()
    np.testing.assert_allclose(small[:, 1:-1], 64, atol=2)  # away from the borders, where the kernel is cut


def test_read_split_lists_images_and_captions_in_the_shards_order(prepared):
    for split in ("train", "validation"):
        info = read_split(prepared, split)
        examples = list(read_examples(info.shards))
        assert info.image_ids == [e.image_id for e in examples]
        assert info.captions == [list(e.captions) for e in examples]
        assert [str(p) for p in info.paths] == [e.source_path for e in examples]
    assert read_split(prepared, "train").num_images + read_split(prepared, "validation").num_images == NUM_IMAGES
    with pytest.raises(DataError, match="no split 'test'"):
        read_split(prepared, "test")


def test_sample_caption_indices_cycles_through_every_caption():
    num_captions = np.array([1, 2, 3, 4, 5, 3, 1])
    epochs = [sample_caption_indices(num_captions, epoch, seed=7)[:, 0] for epoch in range(60)]
    for image, count in enumerate(num_captions):
        for cycle in range(60 // count):
            chosen = [epochs[e][image] for e in range(cycle * count, (cycle + 1) * count)]
            assert sorted(chosen) == list(range(count))  # each caption once per `count` epochs
    np.testing.assert_array_equal(sample_caption_indices(num_captions, 3, seed=7)[:, 0], epochs[3])  # deterministic
    varied = [sample_caption_indices(np.full(50, 5), 0, seed)[:, 0] for seed in range(2)]
    assert not np.array_equal(*varied)  # seeded
    with pytest.raises(ValueError, match="at least one caption"):
        sample_caption_indices(np.array([2, 0]), 0, 0)


@pytest.mark.parametrize("epochs, per_image", [(1, 1), (3, 1), (2, 2), (5, 1), (3, 2)])
def test_sampled_caption_rows_are_the_rows_a_run_of_those_epochs_reads(epochs, per_image):
    num_captions = np.array([1, 2, 3, 4, 5, 3, 1])
    start = np.concatenate([[0], np.cumsum(num_captions)[:-1]])
    read = {
        int(start[image] + caption)
        for epoch in range(epochs)
        for image, row in enumerate(sample_caption_indices(num_captions, epoch, 7, per_image))
        for caption in row
    }
    rows = sampled_caption_rows(num_captions, epochs, 7, per_image)
    assert rows.tolist() == sorted(read)
    # Fewer picks than the largest image's captions leave some out; as many or more take every row.
    assert len(rows) == num_captions.sum() if epochs * per_image >= 5 else len(rows) < num_captions.sum()


def test_several_captions_per_image_continue_the_walk_through_each_images_captions():
    num_captions = np.array([1, 2, 3, 4, 5, 3, 1])
    singles = np.stack([sample_caption_indices(num_captions, epoch, seed=7)[:, 0] for epoch in range(6)], axis=1)
    for epoch in range(3):  # epoch e with 2 per image takes the picks of single epochs 2e and 2e + 1
        np.testing.assert_array_equal(sample_caption_indices(num_captions, epoch, 7, per_image=2), singles[:, 2 * epoch : 2 * epoch + 2])
    three = sample_caption_indices(num_captions, 0, 7, per_image=3)
    assert all(len(set(row)) == min(3, n) for row, n in zip(three.tolist(), num_captions))  # distinct when it can
    with pytest.raises(ValueError, match="per_image"):
        sample_caption_indices(num_captions, 0, 7, per_image=0)


def _epoch(prepared, epoch, seed=0, **kwargs):
    dataset = make_train_dataset(prepared, image_size=24, batch_size=3, epoch=epoch, seed=seed, **kwargs)
    return list(dataset.as_numpy_iterator())


def test_train_dataset_batches_images_and_one_caption_per_image(prepared):
    info = read_split(prepared, "train")
    batches = _epoch(prepared, epoch=0)
    assert len(batches) == info.num_images // 3  # drop_remainder
    for batch in batches:
        assert set(batch) == {"images", "captions", "caption_ids"}  # no labels: this dataset has no metadata
        np.testing.assert_array_equal(batch["caption_ids"], caption_ids(batch["captions"]).numpy())
        assert batch["images"].shape == (3, 24, 24, 3) and batch["images"].dtype == np.uint8
        assert batch["captions"].shape == (3,)
        images = [_image_of(c) for c in batch["captions"]]
        assert len(set(images)) == 3  # two captions of one image never share a batch

    # Order and captions are exactly epoch_order + sample_caption_indices (what the feature cache uses).
    order = epoch_order(info.num_images, 0, 0)
    chosen = sample_caption_indices(info.num_captions(), 0, 0)[:, 0]
    expected = [info.captions[i][chosen[i]] for i in order[: len(batches) * 3]]
    assert [c.decode() for b in batches for c in b["captions"]] == expected
    images = {i: decode_and_resize(e.image_bytes, 24).numpy() for i, e in enumerate(read_examples(info.shards))}
    np.testing.assert_array_equal(batches[0]["images"][1], images[order[1]])


def test_train_dataset_with_several_captions_per_image(prepared):
    info = read_split(prepared, "train")
    batches = _epoch(prepared, epoch=1, captions_per_image=2)
    order = epoch_order(info.num_images, 1, 0)
    chosen = sample_caption_indices(info.num_captions(), 1, 0, per_image=2)
    for b, batch in enumerate(batches):
        assert batch["captions"].shape == batch["caption_ids"].shape == (3, 2)
        assert batch["images"].shape == (3, 24, 24, 3) and batch["image_ids"].shape == (3,)
        np.testing.assert_array_equal(batch["caption_ids"], caption_ids(batch["captions"]).numpy())
        for row, image in enumerate(order[3 * b : 3 * b + 3]):
            assert [c.decode() for c in batch["captions"][row]] == [info.captions[image][i] for i in chosen[image]]
            assert {_image_of(c) for c in batch["captions"][row]} == {_image_of(batch["captions"][row][0])}
        assert len(set(batch["image_ids"].tolist())) == 3


def test_train_dataset_is_deterministic_per_epoch_and_covers_every_caption(prepared):
    info = read_split(prepared, "train")
    first = _epoch(prepared, epoch=2, drop_remainder=False)
    again = _epoch(prepared, epoch=2, drop_remainder=False)
    for one, other in zip(first, again, strict=True):
        np.testing.assert_array_equal(one["images"], other["images"])
        np.testing.assert_array_equal(one["captions"], other["captions"])
    assert [c for b in _epoch(prepared, epoch=3) for c in b["captions"]] != [c for b in first for c in b["captions"]]

    seen = set()
    for epoch in range(12):  # 12 = lcm of the caption counts 1..4
        batches = _epoch(prepared, epoch, drop_remainder=False)
        captions = [c.decode() for b in batches for c in b["captions"]]
        assert sorted(_image_of(c.encode()) for c in captions) == sorted(
            int(i.split(".")[0]) for i in info.image_ids
        )  # every image once per epoch
        seen.update(captions)
    assert seen == {c for captions in info.captions for c in captions}


def test_train_dataset_without_shuffle_keeps_the_fixed_order(prepared):
    info = read_split(prepared, "train")
    captions = [c.decode() for b in _epoch(prepared, 0, shuffle=False, drop_remainder=False) for c in b["captions"]]
    assert [_image_of(c.encode()) for c in captions] == [int(i.split(".")[0]) for i in info.image_ids]


def test_train_dataset_smaller_than_one_batch_is_a_data_error(prepared):
    with pytest.raises(DataError, match="fewer than one batch of 64"):
        make_train_dataset(prepared, image_size=24, batch_size=64, epoch=0, seed=0)


def test_image_dataset_is_in_the_fixed_order(prepared):
    info = read_split(prepared, "validation")
    batches = list(make_image_dataset(prepared, "validation", image_size=16, batch_size=2).as_numpy_iterator())
    images = np.concatenate([b["images"] for b in batches])
    assert set(batches[0]) == {"images"} and images.shape == (info.num_images, 16, 16, 3)
    for image, example in zip(images, read_examples(info.shards), strict=True):
        np.testing.assert_array_equal(image, decode_and_resize(example.image_bytes, 16).numpy())


def test_epoch_order_is_a_seeded_permutation():
    order = epoch_order(100, epoch=0, seed=0)
    assert sorted(order) == list(range(100))
    np.testing.assert_array_equal(order, epoch_order(100, epoch=0, seed=0))
    assert not np.array_equal(order, epoch_order(100, epoch=1, seed=0))
    assert not np.array_equal(order, epoch_order(100, epoch=0, seed=1))


def test_caption_ids_are_equal_exactly_for_captions_identical_after_normalisation():
    ids = caption_ids(["A red star", "a  red star.", "a red star ", "a red stars", "Ä star", "ä star"]).numpy()
    assert ids[0] == ids[1] == ids[2] and len({ids[0], ids[3], ids[4]}) == 3 and ids[4] == ids[5]


def test_batches_carry_the_labels_of_their_images_and_captions(tmp_path):
    from dual_encoder.config import DataConfig
    from dual_encoder.data.prepare import prepare_dataset
    from dual_encoder.data.synthetic import SCENES_FILE, generate_synthetic

    captions = generate_synthetic(tmp_path / "shapes", 12, seed=0, image_size=24)
    prepare_dataset("csv", captions, captions.parent / "images", tmp_path / "p", DataConfig(validation_fraction=0.25),
                    progress=False, metadata=captions.parent / SCENES_FILE)  # fmt: skip
    info = read_split(tmp_path / "p", "train")
    labels = label_arrays(info)
    assert labels.image_labels.shape[0] == info.num_images and labels.caption_labels.shape[0] == sum(info.num_captions())
    rows = {caption: i for i, caption in enumerate(c for caps in info.captions for c in caps)}
    for batch in _epoch(tmp_path / "p", epoch=1):
        for caption, image_row, caption_row in zip(batch["captions"], batch["image_labels"], batch["caption_labels"]):
            flat = rows[caption.decode()]
            np.testing.assert_array_equal(caption_row, labels.caption_labels[flat])
            owner = next(i for i, caps in enumerate(info.captions) if caption.decode() in caps)
            np.testing.assert_array_equal(image_row, labels.image_labels[owner])
            assert set(caption_row[caption_row > 0]) <= set(image_row)  # a caption fits its own image
