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


# --- judged query sets (trec_eval through ir_measures) -------------------------------------------------------------

# Query 0 ranks rows 3, 1, 0, 2, 4 (scores descending); rows 1 and 2 are relevant.
# Query 1 ranks rows 0, 1, 2, 3, 4; row 4 is relevant.
JUDGED_SCORES = np.array([[0.3, 0.8, 0.2, 0.9, 0.1], [0.9, 0.8, 0.7, 0.6, 0.5]])
JUDGED_QRELS = [{1: 1, 2: 1}, {4: 1}]


def test_judged_metrics_equal_a_hand_computation():
    values = metrics.judged_metrics(JUDGED_SCORES, JUDGED_QRELS)
    # query 0: relevant at ranks 2 and 4. P@10 = 2/10; R-precision = 1 of the first 2; AP = (1/2 + 2/4) / 2;
    # nDCG@10 = (1/log2(3) + 1/log2(5)) / (1 + 1/log2(3)). Query 1: relevant at rank 5.
    np.testing.assert_allclose(values["P@10"], [0.2, 0.1])
    np.testing.assert_allclose(values["R-precision"], [0.5, 0.0])
    np.testing.assert_allclose(values["MAP"], [0.5, 0.2])
    np.testing.assert_allclose(values["recall@100"], [1.0, 1.0])
    ideal = 1 + 1 / np.log2(3)
    np.testing.assert_allclose(values["nDCG@10"], [(1 / np.log2(3) + 1 / np.log2(5)) / ideal, 1 / np.log2(6)])


def test_judged_metrics_equal_the_library_called_directly():
    import ir_measures

    run = [ir_measures.ScoredDoc(str(q), f"{r}", float(JUDGED_SCORES[q, r])) for q in range(2) for r in range(5)]
    qrels = [ir_measures.Qrel(str(q), str(r), rel) for q, judged in enumerate(JUDGED_QRELS) for r, rel in judged.items()]
    expected = ir_measures.calc_aggregate([ir_measures.parse_measure(m) for m in metrics.JUDGED_MEASURES.values()], qrels, run)
    values = metrics.judged_metrics(JUDGED_SCORES, JUDGED_QRELS)
    for name, spec in metrics.JUDGED_MEASURES.items():
        assert values[name].mean() == pytest.approx(expected[ir_measures.parse_measure(spec)])


def test_judged_depth_cuts_the_run():
    values = metrics.judged_metrics(JUDGED_SCORES, JUDGED_QRELS, depth=3)
    np.testing.assert_allclose(values["recall@100"], [0.5, 0.0])  # query 0's rank-4 item is beyond the run


def test_chance_level_is_the_relevant_fraction_for_precision():
    qrels = [{r: 1 for r in range(40)}] * 50  # 40 of 1,000 relevant: P@10 by chance 0.04
    chance = metrics.chance_judged_metrics(1000, qrels, runs=4)
    assert chance["P@10"].mean() == pytest.approx(0.04, abs=0.01)
    assert chance["R-precision"].mean() == pytest.approx(0.04, abs=0.01)
