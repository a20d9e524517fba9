"""Does a model trained on the synthetic shapes world bind colour to shape? Three probes of one model.

1. **Pairs**: "a red star" scored on an image of {red star, blue circle} and one of {red circle, blue star} (same
   places and sizes): how often the right image scores higher (chance 0.5; 500 random colour/shape draws); the
   same for "a red star and a blue circle" (the text must bind too), "a red star and a circle", and "a small red
   star" on {small red star, large blue circle} against {large red star, small blue circle}.
2. **Additivity**: single large objects of every colour and shape, and the queries "a <colour> <shape>". The
   score matrix of query (c, s) against object (c', s') is split into its colour part, its shape part and the
   rest; `interaction` = score(c s | c s) + score(c s | c' s') - score(c s | c s') - score(c s | c' s), averaged:
   0 for a bag of words (a score that is a colour term plus a shape term), which cannot tell the two images of
   probe 1 apart. `non-additive share`: the fraction of each tower's embedding variance over the 56 single
   objects / queries that is not a colour effect plus a shape effect.
3. **Errors**: each wrong image in the top 10 of the held-out query set's one-object queries, by what it lacks
   (the colour and the shape on different objects = binding; the right object at the wrong size or place).

Usage: python benchmarks/probe_binding.py --model demo_output/run/model --data demo_output/shapes-prepared
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

from dual_encoder.data.pipeline import read_split
from dual_encoder.data.shape_queries import make_query_set, parse_query
from dual_encoder.data.synthetic import COLOURS, SHAPES, ShapeObject, render_scene, split_scenes
from dual_encoder.evaluation import split_gallery, text_encoder
from dual_encoder.models import load_model


def pairs(model, encode, draws: int = 500, seed: int = 0) -> dict:
    """How often the right image of a pair that differs only in which attribute goes with which object scores
    higher (chance 0.5), for four queries: one object ("a red star" on {red star, blue circle} against {red
    circle, blue star}), both objects ("a red star and a blue circle", the same pair), both with the second bare
    ("a red star and a circle"), and size ("a small red star" on {small red star, large blue circle} against
    {large red star, small blue circle})."""
    rng = np.random.default_rng(seed)
    wins = collections.Counter()
    for _ in range(draws):
        c1, c2 = rng.choice(list(COLOURS), 2, replace=False)
        s1, s2 = rng.choice(list(SHAPES), 2, replace=False)
        scenes = [
            (ShapeObject(s1, c1, "large", "left"), ShapeObject(s2, c2, "large", "right")),
            (ShapeObject(s2, c1, "large", "left"), ShapeObject(s1, c2, "large", "right")),
            (ShapeObject(s1, c1, "small", "left"), ShapeObject(s2, c2, "large", "right")),
            (ShapeObject(s1, c1, "large", "left"), ShapeObject(s2, c2, "small", "right")),
        ]
        images = model.encode_image(np.stack([np.asarray(render_scene(scene, 64, rng)) for scene in scenes])).numpy()
        queries = [f"a {c1} {s1}", f"a {c1} {s1} and a {c2} {s2}", f"a {c1} {s1} and a {s2}", f"a small {c1} {s1}"]
        scores = encode(queries) @ images.T
        for name, row, (right, wrong) in zip(PAIRS, scores, [(0, 1), (0, 1), (0, 1), (2, 3)]):
            wins[name] += row[right] > row[wrong]
    return {name: wins[name] / draws for name in PAIRS}


PAIRS = ("one object", "two objects", "two objects, second bare", "size")


def _non_additive_share(x: np.ndarray) -> float:
    """x [colours, shapes, D]: share of the variance left after a colour effect plus a shape effect."""
    mean = x.mean((0, 1), keepdims=True)
    rest = x - (x.mean(1, keepdims=True) + x.mean(0, keepdims=True) - mean)
    return float((rest**2).sum() / ((x - mean) ** 2).sum())


def additivity(model, encode, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    colours, shapes = list(COLOURS), list(SHAPES)
    images = np.stack([
        model.encode_image(np.stack([np.asarray(render_scene((ShapeObject(s, c, "large", "centre"),), 64, rng))
                                     for s in shapes])).numpy()
        for c in colours
    ])
    queries = np.stack([encode([f"a {c} {s}" for s in shapes]) for c in colours])
    m = np.einsum("csd,kld->cskl", queries, images)
    nc, ns = len(colours), len(shapes)
    cells = [
        (c, s, k, l) for c in range(nc) for s in range(ns) for k in range(nc) for l in range(ns) if k != c and l != s
    ]
    return {
        "right object": float(np.mean([m[c, s, c, s] for c in range(nc) for s in range(ns)])),
        "same colour": float(np.mean([m[c, s, c, l] for c, s, _, l in cells])),
        "same shape": float(np.mean([m[c, s, k, s] for c, s, k, _ in cells])),
        "neither": float(np.mean([m[c, s, k, l] for c, s, k, l in cells])),
        "interaction": float(
            np.mean([m[c, s, c, s] + m[c, s, k, l] - m[c, s, c, l] - m[c, s, k, s] for c, s, k, l in cells])
        ),
        "non-additive share, text": _non_additive_share(queries),
        "non-additive share, image": _non_additive_share(images),
    }


def errors(model, encode, data: str, min_relevant: int) -> dict:
    held = read_split(data, "validation")
    scenes = split_scenes(held.image_ids, held.metadata)
    query_set = make_query_set(scenes, min_relevant=min_relevant)
    embeddings, keys = split_gallery(model, data, "validation")
    ids = [q for q in query_set.queries if query_set.groups[q] not in ("shape", "two objects")]
    scores = encode([query_set.queries[q] for q in ids]) @ embeddings.T
    counts = collections.defaultdict(collections.Counter)
    for row, query in enumerate(ids):
        group, mention = query_set.groups[query], parse_query(query_set.queries[query])[0]
        for index in np.argsort(-scores[row])[:10]:
            doc = keys[index][0]
            if query_set.qrels[query].get(doc):
                counts[group]["right"] += 1
                continue
            scene = scenes[doc]
            shape, colour = mention.obj.shape, mention.obj.colour
            same = [o for o in scene if o.shape == shape and (not mention.colour or o.colour == colour)]
            if same:
                wrong_size = mention.size and not any(o.size == mention.obj.size for o in same)
                counts[group]["wrong size" if wrong_size else "wrong place" if mention.region else "other"] += 1
            elif any(o.colour == colour for o in scene) and any(o.shape == shape for o in scene):
                counts[group]["binding"] += 1
            else:
                counts[group]["colour or shape missing"] += 1
    return {group: dict(count) for group, count in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo_output/run/model")
    parser.add_argument("--data", default="demo_output/shapes-prepared")
    parser.add_argument("--min-relevant", type=int, default=10)
    args = parser.parse_args()
    model = load_model(args.model)
    encode = text_encoder(model)
    for name, value in pairs(model, encode).items():
        print(f"pairs, {name}: right image preferred in {value:.3f} of 500 (chance 0.5)")
    for name, value in additivity(model, encode).items():
        print(f"additivity: {name} {value:.3f}")
    for group, count in errors(model, encode, args.data, args.min_relevant).items():
        print(f"top-10 images, {group}: {count}")


if __name__ == "__main__":
    main()
