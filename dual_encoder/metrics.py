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


# --- judged query sets -------------------------------------------------------------------------------------------

# What `judged_metrics` reports, by our name -> the measure as ir_measures (trec_eval) computes it.
JUDGED_MEASURES = {
    "P@10": "P@10",  # precision of the first 10 results
    "R-precision": "Rprec",  # precision of the first R results, R = the query's number of relevant images
    "recall@100": "R@100",  # fraction of the relevant images among the first 100
    "nDCG@10": "nDCG@10",
    "MAP": "AP",  # mean (over queries) average precision over the whole ranking
}
JUDGED_DEPTH = 1000  # results per query handed to trec_eval (its usual run depth)


def judged_metrics(scores: np.ndarray, qrels: list[dict[int, int]], depth: int = JUDGED_DEPTH) -> dict[str, np.ndarray]:
    """Per-query IR measures of a score matrix, computed by trec_eval (through `ir_measures`).

    Args:
        scores: [Q, N] query-to-image scores (higher is better).
        qrels: for each query, gallery row -> relevance (rows not listed are not relevant).
        depth: how many of the best-scoring rows per query form the run.

    Returns:
        measure name (`JUDGED_MEASURES` keys) -> [Q] values, in query order.

    Example:
        >>> judged_metrics(np.array([[0.9, 0.1, 0.5]]), [{0: 1, 2: 1}])["R-precision"]
        array([1.])
    """
    import ir_measures  # pytrec_eval underneath: the measures as the field computes them

    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(scores) != len(qrels):
        raise MetricsInputError(f"need [Q, N] scores for {len(qrels)} queries, got shape {scores.shape}")
    depth = min(depth, scores.shape[1])
    top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth] if depth < scores.shape[1] else None
    run, judged = [], []
    for q, relevant in enumerate(qrels):
        rows = top[q] if top is not None else np.arange(scores.shape[1])
        run.extend(ir_measures.ScoredDoc(str(q), str(int(r)), float(scores[q, r])) for r in rows)
        judged.extend(ir_measures.Qrel(str(q), str(int(r)), int(rel)) for r, rel in relevant.items())
    measures = {name: ir_measures.parse_measure(spec) for name, spec in JUDGED_MEASURES.items()}
    names = {measure: name for name, measure in measures.items()}
    values = {name: np.zeros(len(qrels)) for name in measures}
    for metric in ir_measures.iter_calc(list(measures.values()), judged, run):
        values[names[metric.measure]][int(metric.query_id)] = metric.value
    return values


def chance_judged_metrics(
    num_images: int, qrels: list[dict[int, int]], runs: int = 5, seed: int = 0, depth: int = JUDGED_DEPTH
) -> dict[str, np.ndarray]:
    """`judged_metrics` of random rankings, averaged over `runs` seeded shuffles: each measure's chance level."""
    rng = np.random.default_rng(seed)
    totals = None
    for _ in range(runs):
        values = judged_metrics(rng.random((len(qrels), num_images)), qrels, depth)
        totals = values if totals is None else {name: totals[name] + values[name] for name in values}
    return {name: total / runs for name, total in totals.items()}
