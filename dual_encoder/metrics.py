"""Retrieval metrics as pure NumPy functions: recall@K both ways, median rank, the recipe's top-k accuracy.

Ranks are 0-based and count the items scoring strictly higher than the best correct item, so ties
are counted optimistically (a correct item tied with a wrong one counts as ranked first). Scores are
dot products of the (L2-normalised) embeddings, computed in chunks of queries so 25k x 5k problems
stay within a few tens of MB.
"""

from __future__ import annotations

import numpy as np

from dual_encoder.errors import DualEncoderError

RECALL_KS = (1, 5, 10)
TOP_K_ACCURACY = 100  # the Keras recipe's metric: is the caption's image among the top 100 results?
_CHUNK_ELEMENTS = 1 << 22  # scores held at once (16 MB of float32)


class MetricsInputError(DualEncoderError, ValueError):
    """The embeddings and the caption-to-image index do not fit together."""


def text_to_image_ranks(image_embeddings, text_embeddings, text_to_image) -> np.ndarray:
    """For each caption, how many images score strictly higher than its own image ([N_txt], 0-based)."""
    images, texts, owners = _validate(image_embeddings, text_embeddings, text_to_image)
    ranks = np.empty(len(texts), dtype=np.int64)
    for start, stop in _chunks(len(texts), len(images)):
        scores = texts[start:stop] @ images.T
        correct = scores[np.arange(stop - start), owners[start:stop]]
        ranks[start:stop] = np.count_nonzero(scores > correct[:, None], axis=1)
    return ranks


def image_to_text_ranks(image_embeddings, text_embeddings, text_to_image) -> np.ndarray:
    """For each image with captions, how many captions score strictly higher than its best-scoring own
    caption ([number of images that have captions], 0-based; images without captions are left out)."""
    images, texts, owners = _validate(image_embeddings, text_embeddings, text_to_image)
    captioned = np.unique(owners)
    ranks = np.empty(len(captioned), dtype=np.int64)
    for start, stop in _chunks(len(captioned), len(texts)):
        queries = captioned[start:stop]
        scores = images[queries] @ texts.T
        own = owners[None, :] == queries[:, None]
        best_own = np.where(own, scores, -np.inf).max(axis=1)
        ranks[start:stop] = np.count_nonzero(scores > best_own[:, None], axis=1)
    return ranks


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Fraction of queries whose correct item is among the top `k` results."""
    return float(np.mean(ranks < k))


def median_rank(ranks: np.ndarray) -> float:
    """Median 1-based rank of the correct item (1.0 is perfect)."""
    return float(np.median(ranks + 1))


def retrieval_metrics(image_embeddings, text_embeddings, text_to_image) -> dict[str, float]:
    """Both directions of retrieval over one gallery.

    Args:
        image_embeddings: [N_img, D] L2-normalised image embeddings.
        text_embeddings: [N_txt, D] L2-normalised caption embeddings.
        text_to_image: [N_txt] index of each caption's image in `image_embeddings`.

    Returns:
        `t2i_recall@K` and `i2t_recall@K` for K in 1, 5, 10; `t2i_median_rank`, `i2t_median_rank`;
        `top100_accuracy` (the recipe's: fraction of captions whose image is in the top 100); and
        `mean_recall`, the mean of the six recalls.

    Example:
        >>> retrieval_metrics(np.eye(2), np.eye(2), np.array([0, 1]))["t2i_recall@1"]
        1.0
    """
    t2i = text_to_image_ranks(image_embeddings, text_embeddings, text_to_image)
    i2t = image_to_text_ranks(image_embeddings, text_embeddings, text_to_image)
    metrics = {}
    for direction, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in RECALL_KS:
            metrics[f"{direction}_recall@{k}"] = recall_at_k(ranks, k)
    metrics["t2i_median_rank"] = median_rank(t2i)
    metrics["i2t_median_rank"] = median_rank(i2t)
    metrics[f"top{TOP_K_ACCURACY}_accuracy"] = recall_at_k(t2i, TOP_K_ACCURACY)
    metrics["mean_recall"] = float(np.mean([metrics[f"{d}_recall@{k}"] for d in ("t2i", "i2t") for k in RECALL_KS]))
    return metrics


def _validate(image_embeddings, text_embeddings, text_to_image):
    images = np.asarray(image_embeddings, dtype=np.float32)
    texts = np.asarray(text_embeddings, dtype=np.float32)
    owners = np.asarray(text_to_image)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise MetricsInputError(f"need [N_img, D] and [N_txt, D] embeddings, got {images.shape} and {texts.shape}")
    if len(images) == 0 or len(texts) == 0:
        raise MetricsInputError("need at least one image and one caption")
    if owners.shape != (len(texts),) or not np.issubdtype(owners.dtype, np.integer):
        raise MetricsInputError(f"text_to_image must be {len(texts)} integer indices, got shape {owners.shape}")
    if owners.min() < 0 or owners.max() >= len(images):
        raise MetricsInputError(f"text_to_image indices must lie in [0, {len(images)}), got {owners.min()}..{owners.max()}")
    return images, texts, owners


def _chunks(num_queries: int, num_items: int):
    """(start, stop) ranges of queries whose score matrix holds about `_CHUNK_ELEMENTS` values."""
    step = max(1, _CHUNK_ELEMENTS // max(1, num_items))
    for start in range(0, num_queries, step):
        yield start, min(start + step, num_queries)
