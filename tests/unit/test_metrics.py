"""Retrieval metrics on hand-written matrices whose ranks can be read off by eye."""

import numpy as np
import pytest

from dual_encoder import metrics
from dual_encoder.metrics import (
    MetricsInputError,
    image_to_text_ranks,
    median_rank,
    recall_at_k,
    retrieval_metrics,
    text_to_image_ranks,
)

# With identity image embeddings, row j of TEXTS *is* caption j's score against images 0..3.
IMAGES = np.eye(4)
TEXTS = np.array(
    [
        [0.9, 0.1, 0.0, 0.0],  # image 0: best                   -> rank 0
        [0.2, 0.5, 0.1, 0.0],  # image 0: image 1 beats it       -> rank 1
        [0.3, 0.3, 0.1, 0.0],  # image 1: tied with image 0      -> rank 0 (ties optimistic)
        [0.4, 0.3, 0.2, 0.1],  # image 2: images 0, 1 beat it    -> rank 2
        [0.5, 0.4, 0.3, 0.2],  # image 3: three beat it          -> rank 3
    ]
)
TEXT_TO_IMAGE = np.array([0, 0, 1, 2, 3])


def test_text_to_image_ranks():
    np.testing.assert_array_equal(text_to_image_ranks(IMAGES, TEXTS, TEXT_TO_IMAGE), [0, 1, 0, 2, 3])


def test_image_to_text_ranks_use_the_best_of_each_images_captions():
    # Image scores per caption are the columns of TEXTS. Image 0 owns captions 0 and 1 (best 0.9 -> 0);
    # image 1 owns caption 2 (0.3; 0.5 and 0.4 beat it -> 2); image 2: 0.2, beaten by 0.3 -> 1; image 3 -> 0.
    np.testing.assert_array_equal(image_to_text_ranks(IMAGES, TEXTS, TEXT_TO_IMAGE), [0, 2, 1, 0])


def test_retrieval_metrics():
    result = retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE)
    assert result == pytest.approx(
        {
            "t2i_recall@1": 2 / 5,
            "t2i_recall@5": 1.0,
            "t2i_recall@10": 1.0,
            "i2t_recall@1": 2 / 4,
            "i2t_recall@5": 1.0,
            "i2t_recall@10": 1.0,
            "t2i_median_rank": 2.0,  # 1-based ranks 1, 2, 1, 3, 4
            "i2t_median_rank": 1.5,  # 1-based ranks 1, 3, 2, 1
            "top100_accuracy": 1.0,
            "mean_recall": (0.4 + 1 + 1 + 0.5 + 1 + 1) / 6,
        }
    )


def test_recall_at_k_and_median_rank():
    ranks = np.array([0, 4, 5, 9, 10])
    assert recall_at_k(ranks, 1) == 0.2
    assert recall_at_k(ranks, 5) == 0.4
    assert recall_at_k(ranks, 10) == 0.8
    assert median_rank(ranks) == 6.0


def test_top100_accuracy_on_a_gallery_larger_than_100():
    images = np.eye(150)
    descending = np.linspace(1.0, 0.0, 150)  # image 0 scores highest for every caption
    texts = np.stack([descending, descending])
    result = retrieval_metrics(images, texts, np.array([149, 50]))  # ranks 149 and 50
    assert result["top100_accuracy"] == 0.5
    assert result["t2i_recall@10"] == 0.0


def test_images_without_captions_are_left_out_of_image_to_text():
    ranks = image_to_text_ranks(np.eye(3), np.array([[1.0, 0.5, 0.0], [0.0, 0.2, 0.9]]), np.array([0, 1]))
    np.testing.assert_array_equal(ranks, [0, 1])  # image 2 has no caption: no entry


def test_chunking_does_not_change_results(monkeypatch):
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(7, 5)), rng.normal(size=(20, 5))
    owners = rng.integers(0, 7, 20)
    whole = retrieval_metrics(images, texts, owners)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 9)  # one or two queries per chunk
    assert retrieval_metrics(images, texts, owners) == whole


@pytest.mark.parametrize(
    "images, texts, owners, message",
    [
        (np.eye(3), np.ones((2, 4)), np.array([0, 1]), "embeddings"),
        (np.eye(3), np.ones((2, 3)), np.array([0]), "2 integer indices"),
        (np.eye(3), np.ones((2, 3)), np.array([0, 3]), r"\[0, 3\)"),
        (np.eye(3), np.ones((2, 3)), np.array([0.0, 1.0]), "integer"),
        (np.eye(3), np.ones((0, 3)), np.array([], dtype=int), "at least one"),
    ],
)
def test_bad_inputs_raise_a_clear_error(images, texts, owners, message):
    with pytest.raises(MetricsInputError, match=message):
        retrieval_metrics(images, texts, owners)
