"""Embed a whole split (images and all captions) and score retrieval over its full gallery: caption metrics, and
judged query sets (short queries with relevance judgements) scored by trec_eval."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from dual_encoder.data.judgements import QuerySet, QuerySetError
from dual_encoder.data.pipeline import image_input, make_image_dataset, read_split
from dual_encoder.metrics import JUDGED_MEASURES, chance_judged_metrics, judged_metrics, retrieval_metrics
from dual_encoder.models.compiled import compiled

FULL_CAPTIONS_KEY = "full_captions"  # item metadata: the captions that describe the whole image


def embed_split(model, data_dir, split: str, *, batch_size: int = 64, features=None):
    """Return (image_embeddings, text_embeddings, text_to_image) for every image and caption of a split.

    With `features` (a `SplitFeatures` from the feature cache) only the heads run on the cached side(s); a side
    the cache does not hold (a trained tower) runs whole, on decoded images or caption strings.
    """
    image_features = None if features is None else features.image_features
    text_features = None if features is None else features.text_features
    if image_features is not None:
        image_embeddings = _batched(compiled(model, "encode_image_features"), image_features, batch_size)
    else:
        image_embeddings = _embed_images(model, data_dir, split, batch_size)
    if text_features is not None:
        text_embeddings = _batched(compiled(model, "encode_text_features"), text_features, batch_size)
        return image_embeddings, text_embeddings, features.text_to_image
    info = read_split(data_dir, split)
    captions = np.array([c for image_captions in info.captions for c in image_captions], dtype=object)
    text_embeddings = _batched(compiled(model, "encode_text"), captions, batch_size)
    text_to_image = np.repeat(np.arange(len(info.captions)), [len(c) for c in info.captions])
    return image_embeddings, text_embeddings, text_to_image


def full_caption_mask(info) -> np.ndarray | None:
    """Over a split's captions (flattened in order): True for those its item metadata marks as full — describing
    the whole image, as the synthetic generator marks them — or None when no item marks any."""
    if not any(meta and FULL_CAPTIONS_KEY in meta for meta in info.metadata):
        return None
    return np.array(
        [c in set((meta or {}).get(FULL_CAPTIONS_KEY, ())) for meta, caps in zip(info.metadata, info.captions) for c in caps],
        dtype=bool,
    )


def evaluate_split(model, data_dir, split: str, *, batch_size: int = 64, features=None) -> dict:
    """Caption retrieval metrics (recall@K both ways, median ranks, top-100 accuracy) over a split's gallery.

    Where the dataset marks full captions (item metadata `full_captions`) only those are queries: a partial
    caption ("a star") fits many images, so "its" image ranking first measures luck, not search. `captions` in
    the result says which were used; judged query sets (`evaluate_query_set`) measure the short ones.
    """
    image_embeddings, text_embeddings, text_to_image = embed_split(
        model, data_dir, split, batch_size=batch_size, features=features
    )
    mask = full_caption_mask(read_split(data_dir, split))
    if mask is not None and mask.any():
        text_embeddings, text_to_image = text_embeddings[mask], text_to_image[mask]
    metrics = retrieval_metrics(image_embeddings, text_embeddings, text_to_image)
    used = "full" if mask is not None and mask.any() else "all"
    return {**metrics, "captions": used, "num_captions": int(len(text_to_image))}


def split_gallery(model, data_dir, split: str, *, batch_size: int = 64):
    """(image embeddings, keys) of a split's images for `evaluate_query_set`: keys are image id and source path."""
    info = read_split(data_dir, split)
    embeddings = _embed_images(model, data_dir, split, batch_size)
    return embeddings, [[image_id, str(path)] for image_id, path in zip(info.image_ids, info.paths)]


def text_encoder(model) -> Callable[[list[str]], np.ndarray]:
    """Texts -> [Q, D] float32 embeddings through the model's one traced text path (for `evaluate_query_set`)."""
    encode = compiled(model, "encode_text")
    return lambda texts: _as_numpy(encode(tf.constant(list(texts), dtype=tf.string)))


def match_documents(doc_ids, gallery_keys: Sequence[Sequence[str]]) -> dict[str, int]:
    """Judged doc id -> gallery row. A doc id matches a row's key exactly, or as the trailing part of its path
    ("000123.png" matches ".../images/000123.png"); docs not in the gallery are left out. A doc id that matches
    several rows raises `QuerySetError`."""
    owners: dict[str, set[int]] = {}
    for row, keys in enumerate(gallery_keys):
        for key in keys:
            parts = PurePosixPath(str(key).replace("\\", "/")).parts
            for start in range(len(parts)):
                owners.setdefault("/".join(parts[start:]).lstrip("/") or "/", set()).add(row)
            owners.setdefault(str(key), set()).add(row)
    matched = {}
    for doc in doc_ids:
        rows = owners.get(doc.replace("\\", "/"))
        if rows is None:
            continue
        if len(rows) > 1:
            raise QuerySetError(f"judged image '{doc}' matches {len(rows)} gallery images: give a longer path")
        matched[doc] = next(iter(rows))
    return matched


def evaluate_query_set(
    encode_queries: Callable[[list[str]], np.ndarray],
    image_embeddings: np.ndarray,
    gallery_keys: Sequence[Sequence[str]],
    query_set: QuerySet,
    *,
    normalize: bool = True,
    chance_runs: int = 5,
) -> dict:
    """Score a judged query set against a gallery: each measure of `metrics.JUDGED_MEASURES` per group and over
    all queries, each beside its chance level (the same measure of random rankings).

    Args:
        encode_queries: texts -> [Q, D] L2-normalised embeddings (a model's text tower or `Searcher.encode_queries`).
        image_embeddings: [N, D] the gallery.
        gallery_keys: per gallery row, the ids/paths a judgement may name it by (`match_documents`).
        query_set: queries, groups and judgements.
        normalize: strip request phrases from queries as search does.

    Returns:
        {"groups": {group: {"queries", measure..., "chance": {measure...}}}, "all": {...}, "per_query": [...],
        "queries_without_relevant": n (left out: no relevant image in this gallery),
        "gallery": N}.
    """
    from dual_encoder.search import normalize_query

    matched = match_documents({d for judged in query_set.qrels.values() for d in judged}, gallery_keys)
    ids, qrels = [], []
    for query_id in query_set.queries:
        rows = {matched[d]: rel for d, rel in query_set.qrels[query_id].items() if d in matched}
        if any(rel > 0 for rel in rows.values()):
            ids.append(query_id)
            qrels.append(rows)
    if not ids:
        raise QuerySetError("no query has a relevant image in this gallery: do the qrels name its images?")
    texts = [normalize_query(query_set.queries[q]) if normalize else query_set.queries[q] for q in ids]
    scores = np.asarray(encode_queries(texts), dtype=np.float32) @ np.asarray(image_embeddings, dtype=np.float32).T
    values = judged_metrics(scores, qrels)
    chance = chance_judged_metrics(len(image_embeddings), qrels, runs=chance_runs)
    groups = np.array([query_set.groups[q] for q in ids])

    def summarise(selected: np.ndarray) -> dict:
        return {
            "queries": int(selected.sum()),
            **{name: float(values[name][selected].mean()) for name in JUDGED_MEASURES},
            "chance": {name: float(chance[name][selected].mean()) for name in JUDGED_MEASURES},
        }

    return {
        "groups": {g: summarise(groups == g) for g in dict.fromkeys(groups.tolist())},
        "all": summarise(np.ones(len(ids), dtype=bool)),
        "per_query": [
            {"id": q, "group": str(g), "query": t, "relevant": sum(r > 0 for r in rel.values()),
             **{name: float(values[name][i]) for name in JUDGED_MEASURES}}
            for i, (q, g, t, rel) in enumerate(zip(ids, groups, texts, qrels))
        ],
        "queries_without_relevant": len(query_set.queries) - len(ids),
        "gallery": int(len(image_embeddings)),
    }  # fmt: skip


def format_judged_table(result: dict) -> str:
    """The per-group table of `evaluate_query_set`: each measure with its chance level in brackets."""
    names = list(JUDGED_MEASURES)
    width = max(len(g) for g in [*result["groups"], "all queries"])
    lines = [f"{'group':<{width}}  {'queries':>7}  " + "  ".join(f"{n + ' (chance)':>19}" for n in names)]
    rows = [*result["groups"].items(), ("all queries", result["all"])]
    for group, summary in rows:
        cells = "  ".join(f"{summary[n]:>10.3f} ({summary['chance'][n]:.3f})" for n in names)
        lines.append(f"{group:<{width}}  {summary['queries']:>7}  {cells}")
    lines.append(
        f"gallery of {result['gallery']} images; chance = the same measure of random rankings"
        + (f"; {result['queries_without_relevant']} queries with no relevant image here left out"
           if result["queries_without_relevant"] else "")
    )  # fmt: skip
    return "\n".join(lines)


def _embed_images(model, data_dir, split: str, batch_size: int) -> np.ndarray:
    images = make_image_dataset(data_dir, split, image_size=image_input(model), batch_size=batch_size)
    encode = compiled(model, "encode_image")
    return np.concatenate([_as_numpy(encode(batch["images"])) for batch in images])


def _batched(fn, rows, batch_size: int) -> np.ndarray:
    outputs = [_as_numpy(fn(tf.constant(rows[i : i + batch_size]))) for i in range(0, len(rows), batch_size)]
    return np.concatenate(outputs)


def _as_numpy(tensor) -> np.ndarray:
    return np.asarray(tensor, dtype=np.float32)
