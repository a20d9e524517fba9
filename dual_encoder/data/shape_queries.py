"""Judged query sets for captioned-shapes galleries: short queries people type, judged against every scene.

A query is a few `Mention`s of objects ("a red star", "a red star and a ring"); an image is relevant when
distinct objects of its scene fit the mentions (`fits_scene`), whatever else it holds. Groups:

    shape                    "a star"
    colour+shape             "a red star"
    size+colour+shape        "a small red star"
    colour+shape+position    "a red star on the left" (a side is three cells; a corner or the centre one)
    two objects              "a star and a ring", "a red star and a ring"
    synonyms                 colour+shape (and size) in other words: "a crimson five-pointed star"

Only queries with at least `min_relevant` relevant images are kept, so that precision@10 can reach 1.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import numpy as np

from dual_encoder.data.judgements import QuerySet, QuerySetError
from dual_encoder.data.synthetic import (
    COLOURS,
    POSITIONS,
    REGIONS,
    SHAPES,
    SIZES,
    Mention,
    Scene,
    ShapeObject,
    fits_scene,
)

GROUPS = ("shape", "colour+shape", "size+colour+shape", "colour+shape+position", "two objects", "synonyms")
MAX_PER_GROUP = 60


def _words(table: Mapping, key: str, rng: np.random.Generator | None) -> str:
    """The first (plainest) word for `key`, or, with `rng`, one of the others (a synonym)."""
    words = table[key][1]
    return words[0] if rng is None else words[1 + int(rng.integers(len(words) - 1))]


def _phrase(mention: Mention, rng: np.random.Generator | None = None) -> str:
    obj = mention.obj
    words = [_words(SIZES, obj.size, rng)] if mention.size else []
    words += [_words(COLOURS, obj.colour, rng)] if mention.colour else []
    words += [_words(SHAPES, obj.shape, rng)]
    noun = " ".join(words)
    article = "an" if noun[0] in "aeiou" else "a"
    place = f" {POSITIONS[mention.region].phrases[0]}" if mention.region else ""
    return f"{article} {noun}{place}"


def _object(shape: str, colour: str = "red", size: str = "small", position: str = "centre") -> ShapeObject:
    return ShapeObject(shape, colour, size, position)


def _candidates(rng: np.random.Generator) -> dict[str, list[tuple[str, list[Mention]]]]:
    """Every query of each group as (text, mentions), before filtering by how many images fit."""
    shapes, colours, sizes = list(SHAPES), list(COLOURS), list(SIZES)
    one = {
        "shape": [[Mention(_object(s), colour=False, size=False)] for s in shapes],
        "colour+shape": [[Mention(_object(s, c), size=False)] for s in shapes for c in colours],
        "size+colour+shape": [[Mention(_object(s, c, z))] for s in shapes for c in colours for z in sizes],
        "colour+shape+position": [
            [Mention(_object(s, c), size=False, region=r)] for s in shapes for c in colours for r in REGIONS
        ],
    }
    groups = {name: [(_phrase(m[0]), m) for m in mentions] for name, mentions in one.items()}
    plain = [Mention(_object(s), colour=False, size=False) for s in shapes]
    coloured = [Mention(_object(s, c), size=False) for s in shapes for c in colours]
    pairs = list(itertools.combinations(plain, 2)) + [(c, p) for c in coloured for p in plain if p.obj.shape != c.obj.shape]
    groups["two objects"] = [(f"{_phrase(a)} and {_phrase(b)}", [a, b]) for a, b in pairs]
    synonyms = [Mention(_object(s, c, z), size=bool(rng.random() < 0.3)) for s in shapes for c in colours for z in sizes[:1]]
    groups["synonyms"] = [(_phrase(m, rng), [m]) for m in synonyms]
    return groups


def make_query_set(
    scenes: Mapping[str, Scene], *, min_relevant: int = 10, max_per_group: int = MAX_PER_GROUP, seed: int = 0
) -> QuerySet:
    """Queries of every group judged against every scene of `scenes` (doc id -> scene); deterministic by seed.

    A group with more than `max_per_group` queries that `min_relevant` images fit keeps a seeded sample of them.
    """
    rng = np.random.default_rng([seed, 7_654_321])
    queries, groups, qrels = {}, {}, {}
    candidates = _candidates(rng)
    for group in GROUPS:
        kept = []
        for text, mentions in candidates[group]:
            relevant = relevant_docs(mentions, scenes)
            if len(relevant) >= min_relevant:
                kept.append((text, relevant))
        if len(kept) > max_per_group:
            kept = [kept[i] for i in sorted(rng.choice(len(kept), size=max_per_group, replace=False))]
        for number, (text, relevant) in enumerate(kept):
            query_id = f"{group.replace('+', '-').replace(' ', '-')}-{number:03d}"
            queries[query_id], groups[query_id] = text, group
            qrels[query_id] = {doc: 1 for doc in relevant}
    if not queries:
        raise QuerySetError(
            f"no query has {min_relevant} relevant images among {len(scenes)}: use a larger gallery or a smaller "
            "--min-relevant"
        )
    return QuerySet(queries, groups, qrels)


def relevant_docs(mentions: Sequence[Mention], scenes: Mapping[str, Scene]) -> list[str]:
    """The doc ids whose scene fits `mentions`."""
    return [doc for doc, scene in scenes.items() if fits_scene(mentions, scene)]


def _longest_word(text: str, table: Mapping) -> tuple[str | None, str]:
    """The key of `table` whose word appears in `text` (longest words first), and `text` without that word."""
    words = sorted(((w, key) for key, (_, ws) in table.items() for w in ws), key=lambda pair: -len(pair[0]))
    for word, key in words:
        padded = f" {text} "
        if f" {word} " in padded:
            return key, padded.replace(f" {word} ", " ", 1).strip()
    return None, text


def parse_query(text: str) -> list[Mention]:
    """Read a short query in the generator's vocabulary back into mentions ("a red star and a ring on the left"
    -> two mentions); [] when some part names no shape or colour."""
    mentions = []
    for part in text.lower().split(" and "):
        places = sorted(((ph, name) for name, p in POSITIONS.items() for ph in p.phrases), key=lambda x: -len(x[0]))
        region = next((name for phrase, name in places if phrase in part), None)
        shape, rest = _longest_word(part, SHAPES)
        colour, rest = _longest_word(rest, COLOURS)
        size, _ = _longest_word(rest, SIZES)
        if shape is None and colour is None:
            return []
        obj = ShapeObject(shape or "circle", colour or "red", size or "small", region or "centre")
        mentions.append(Mention(obj, shape is not None, colour is not None, size is not None, region))
    return mentions
