"""Near-duplicate benchmark, side by side in one run: pair precision and recall on a gallery with planted copies,
and the time of the pair search on vectors alone.

    python benchmarks/bench_dedup.py --model random --model demo_output/run/model --skip-speed   # quality only
    python benchmarks/bench_dedup.py                                   # a randomly initialised model only
    python benchmarks/bench_dedup.py --skip-quality --sizes 100000 1000000 --exact-sample 200000
    python benchmarks/bench_dedup.py --quick                           # small sizes, seconds

Quality: `--originals` synthetic images (`dual_encoder.data.synthetic`, drawn at `--image-size`) of which
`--planted` each get four near-duplicates — re-encoded as JPEG (quality 70), resized to 3/4, cropped by 6% on
every side, and stored sideways with an EXIF orientation tag (upright as viewed) — indexed with `index build`
(the real path). Pairs within one original's group are true; any other pair is false. Pairs are counted two ways:
by the embeddings' cosine alone, and as `find_duplicates` counts them by default — candidates by cosine, confirmed
by the pixel check (`dual_encoder.index.pixels`); `find_duplicates` itself then runs at its defaults and the pairs
its groups imply are scored too. `--model DIR` (repeatable) embeds with a model folder; `random` is a randomly
initialised `synthetic-small`-sized model.

Speed: `--sizes` random unit vectors and clustered ones with 1% near copies (D=256), each searched by the exact
chunked self-join and by the FAISS IVF range search. Above `--exact-sample` items the exact time is estimated from
`--sample-blocks` randomly chosen blocks of the self-join (every block costs the same matrix product) times the
number of blocks — the table says which rows are estimates.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dual_encoder.config import IndexConfig, ModelConfig
from dual_encoder.index import build_index, find_duplicates
from dual_encoder.index.dedup import (
    DEFAULT_BLOCK_ROWS,
    DEFAULT_PIXEL_THRESHOLD,
    DEFAULT_THRESHOLD,
    join_block,
    similar_pairs_faiss,
)
from dual_encoder.index.pixels import pixel_scores

DIM = 256
CLUSTERS = 1000
VARIANTS = ("jpeg q70", "resized 3/4", "cropped 6%", "EXIF-rotated")
THRESHOLDS = (0.80, 0.90, 0.95, 0.98, 0.99)  # embeddings alone
CANDIDATE_THRESHOLDS = (0.70, 0.80, 0.90)  # embeddings, then pixels
PIXEL_THRESHOLDS = (0.90, 0.95, 0.97, 0.98)


# -- quality ------------------------------------------------------------------------------------------------------


def plant_copies(original: Path, folder: Path, stem: str) -> list[Path]:
    """Four near-duplicates of `original`, one per `VARIANTS` entry."""
    with Image.open(original) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    copies = [folder / f"{stem}-jpeg.jpg", folder / f"{stem}-resized.png", folder / f"{stem}-cropped.png",
              folder / f"{stem}-rotated.jpg"]  # fmt: skip
    image.save(copies[0], quality=70)
    image.resize((width * 3 // 4, height * 3 // 4), Image.Resampling.LANCZOS).save(copies[1])
    margin_x, margin_y = round(width * 0.06), round(height * 0.06)
    image.crop((margin_x, margin_y, width - margin_x, height - margin_y)).save(copies[2])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view": store it turned the other way
    image.transpose(Image.Transpose.ROTATE_90).save(copies[3], quality=95, exif=exif)
    return copies


def make_gallery(root: Path, originals: int, planted: int, image_size: int, seed: int) -> dict[str, int]:
    """Synthetic originals plus planted copies in `root/gallery`; returns path -> group (its original's number)."""
    from dual_encoder.data.synthetic import generate_synthetic

    generate_synthetic(root / "synthetic", originals, seed=seed, image_size=image_size)
    gallery = root / "gallery"
    gallery.mkdir()
    group_of = {}
    for number, source in enumerate(sorted((root / "synthetic" / "images").glob("*.png"))):
        target = gallery / source.name
        os.replace(source, target)
        group_of[str(target.absolute())] = number
        if number < planted:
            for copy in plant_copies(target, gallery, source.stem):
                group_of[str(copy.absolute())] = number
    return group_of


def random_model(folder: Path) -> Path:
    """A randomly initialised model of the `synthetic-small` image tower's size."""
    import keras

    from dual_encoder.config import Config
    from dual_encoder.models import build_dual_encoder, save_model

    keras.utils.set_random_seed(0)
    config = dataclasses.replace(Config.from_preset("synthetic-small").model, vocabulary_size=50)
    return save_model(build_dual_encoder(config, captions=["a red star", "a blue ring"]), folder)


def quality(model_dir: Path, root: Path, group_of: dict[str, int]) -> dict:
    index_dir = root / f"index-{abs(hash(str(model_dir)))}"
    summary = build_index(model_dir, root / "gallery", index_dir, IndexConfig(), progress=False)
    from dual_encoder.index import ImageIndex

    index = ImageIndex.load(index_dir)
    groups = np.array([group_of[path] for path in index.items.paths])
    embeddings = np.asarray(index.embeddings, np.float32)
    scores = embeddings @ embeddings.T
    a, b = np.triu_indices(len(embeddings), 1)
    pair_scores, same = scores[a, b], groups[a] == groups[b]
    variant_of = np.array([_variant(path) for path in index.items.paths])

    def row(predicted: np.ndarray) -> dict:
        true_positive = int(np.sum(predicted & same))
        return {"pairs": int(predicted.sum()), "precision": true_positive / max(1, int(predicted.sum())),
                "recall": true_positive / max(1, int(same.sum()))}  # fmt: skip

    # Embeddings alone, and candidates from embeddings confirmed by pixels (what find_duplicates does), from one
    # pixel check of the loosest candidates.
    rows = {("cosine", t, None): row(pair_scores >= t) for t in THRESHOLDS}
    loosest = pair_scores >= min(CANDIDATE_THRESHOLDS)
    started = time.perf_counter()
    check = pixel_scores(index.items.paths, a[loosest], b[loosest])
    pixel_seconds = time.perf_counter() - started
    pixel_of = np.full(len(pair_scores), -1.0, np.float32)
    pixel_of[loosest] = np.nan_to_num(check.scores, nan=-1.0)
    for t in CANDIDATE_THRESHOLDS:
        for p in PIXEL_THRESHOLDS:
            rows[("pixels", t, p)] = row((pair_scores >= t) & (pixel_of >= p))
    default = (pair_scores >= DEFAULT_THRESHOLD) & (pixel_of >= DEFAULT_PIXEL_THRESHOLD)

    # The real path, end to end: its groups, and the pairs they imply (every two members of a group).
    report = find_duplicates(index)
    group_id = np.full(len(index), -1)
    for number, group in enumerate(report.groups):
        group_id[[index.items.row_of(item) for item in group.ids]] = number
    in_one_group = (group_id[a] >= 0) & (group_id[a] == group_id[b])

    # Recall of each kind of copy against its original at the defaults.
    original_pairs = same & ((variant_of[a] == "original") | (variant_of[b] == "original"))
    per_variant = {}
    for variant in VARIANTS:
        chosen = original_pairs & ((variant_of[a] == variant) | (variant_of[b] == variant))
        per_variant[variant] = (
            float(np.mean(pair_scores[chosen] >= 0.95)), float(np.mean(default[chosen]))
        ) if chosen.any() else None  # fmt: skip
    false_default = default & ~same
    return {
        "model": str(model_dir),
        "images": summary.count,
        "true_pairs": int(same.sum()),
        "rows": rows,
        "report": report,
        "group_pairs": row(in_one_group),
        "per_variant_recall": per_variant,
        "median_true_pair": float(np.median(pair_scores[same])),
        "p999_other_pair": float(np.quantile(pair_scores[~same], 0.999)),
        "max_other_pair": float(pair_scores[~same].max()),
        "lowest_true_pixels": float(pixel_of[same & loosest].min()),
        "highest_other_pixels": float(pixel_of[~same & loosest].max()),
        "false_pairs_default": [(index.items.paths[i], index.items.paths[j]) for i, j in
                                zip(a[false_default][:5], b[false_default][:5])],  # fmt: skip
        "pixel_check": (int(loosest.sum()), len(np.unique(np.concatenate([a[loosest], b[loosest]]))), pixel_seconds),
    }


def _variant(path: str) -> str:
    stem = Path(path).stem
    for suffix, name in zip(("-jpeg", "-resized", "-cropped", "-rotated"), VARIANTS):
        if stem.endswith(suffix):
            return name
    return "original"


# -- speed --------------------------------------------------------------------------------------------------------


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def random_vectors(count: int, seed: int) -> tuple[np.ndarray, int]:
    return unit(np.random.default_rng(seed).standard_normal((count, DIM), dtype=np.float32)), 0


def clustered_vectors(count: int, seed: int) -> tuple[np.ndarray, int]:
    """Points around 1,000 centres (cosine ~0.7 to their centre, as in bench_search), 1% of them near copies of
    another point (cosine ~0.99). Returns the vectors and the number of planted pairs."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((CLUSTERS, DIM), dtype=np.float32))
    vectors = centres[rng.integers(0, CLUSTERS, count)] + rng.standard_normal((count, DIM), dtype=np.float32) / 16
    vectors = unit(vectors)
    copies = count // 100
    sources = rng.choice(count - copies, copies, replace=False)
    vectors[count - copies :] = unit(vectors[sources] + rng.standard_normal((copies, DIM), dtype=np.float32) / 100)
    return vectors, copies


def exact_seconds(vectors: np.ndarray, threshold: float, sample_blocks: int, full: bool, seed: int) -> tuple[float, int]:
    """Seconds of the exact self-join (measured, or estimated from sampled blocks) and the pairs it found."""
    block = DEFAULT_BLOCK_ROWS
    starts = list(range(0, len(vectors), block))
    if full:
        started, found = time.perf_counter(), 0
        for top in starts:
            rows = np.ascontiguousarray(vectors[top : top + block])
            for left in starts[starts.index(top) :]:
                pairs = join_block(rows, top, vectors, left, threshold, block)
                found += 0 if pairs is None else len(pairs[0])
        return time.perf_counter() - started, found
    blocks = [(top, left) for top in starts for left in starts if left >= top]
    rng = np.random.default_rng(seed)
    chosen = [blocks[i] for i in rng.choice(len(blocks), min(sample_blocks, len(blocks)), replace=False)]
    started = time.perf_counter()
    for top, left in chosen:
        join_block(np.ascontiguousarray(vectors[top : top + block]), top, vectors, left, threshold, block)
    return (time.perf_counter() - started) / len(chosen) * len(blocks), -1


def speed(
    sizes, kinds, exact_max: int, sample_blocks: int, threshold: float, nprobe: int, faiss_max: int, seed: int
) -> list[dict]:
    rows = []
    makers = {"random": random_vectors, "clustered": clustered_vectors}
    for count, kind in itertools.product(sizes, kinds):
        vectors, planted = makers[kind](count, seed)
        full = count <= exact_max
        exact_time, exact_pairs = exact_seconds(vectors, threshold, sample_blocks, full, seed)
        faiss_time, a, b = float("nan"), np.zeros(0, np.int64), np.zeros(0, np.int64)
        if count <= faiss_max:
            started = time.perf_counter()
            a, b, _ = similar_pairs_faiss(vectors, threshold, IndexConfig(ivf_nprobe=nprobe))
            faiss_time = time.perf_counter() - started
        found_planted = int(np.sum(b >= count - planted)) if planted else 0
        rows.append({
            "items": count, "vectors": kind, "exact_s": exact_time, "exact_measured": full, "exact_pairs": exact_pairs,
            "faiss_s": faiss_time, "faiss_pairs": len(a), "planted": planted, "faiss_planted": found_planted,
        })  # fmt: skip
        print(_speed_line(rows[-1]), flush=True)
    return rows


def _speed_line(row: dict) -> str:
    exact = f"{row['exact_s']:.1f} s" + ("" if row["exact_measured"] else " (est.)")
    pairs = row["exact_pairs"] if row["exact_pairs"] >= 0 else "—"
    ran = not np.isnan(row["faiss_s"])
    recall = f"{row['faiss_planted']}/{row['planted']}" if row["planted"] and ran else "—"
    faiss = f"{row['faiss_s']:.1f} s" if ran else "not run"
    return (f"| {row['items']:,} | {row['vectors']} | {exact} | {pairs} | {faiss} | "
            f"{row['faiss_pairs'] if ran else '—'} | {recall} |")  # fmt: skip


# -- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None, help="a model folder, or 'random' (repeatable)")
    parser.add_argument("--originals", type=int, default=1000)
    parser.add_argument("--planted", type=int, default=200, help="originals that get four near-duplicates each")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--exact-sample", type=int, default=200_000, help="above this many items, estimate the exact time")
    parser.add_argument("--sample-blocks", type=int, default=60)
    parser.add_argument("--nprobe", type=int, default=IndexConfig().ivf_nprobe)
    parser.add_argument("--vectors", nargs="*", default=["random", "clustered"], choices=["random", "clustered"])
    parser.add_argument("--faiss-max", type=int, default=10**9, help="skip the FAISS search above this many items")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--quick", action="store_true", help="--originals 120 --planted 30 --sizes 20000")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.originals, args.planted, args.sizes = 120, 30, [20_000]
    models = args.model or ["random"]

    if not args.skip_quality:
        with tempfile.TemporaryDirectory() as temporary:
            root = Path(temporary)
            started = time.perf_counter()
            group_of = make_gallery(root, args.originals, args.planted, args.image_size, args.seed)
            print(f"\ngallery: {args.originals} synthetic images ({args.image_size} px), {args.planted} of them with "
                  f"4 near-duplicates ({len(group_of)} images, {time.perf_counter() - started:.0f} s to make)\n")
            results = []
            for name in models:
                model_dir = random_model(root / "random-model") if name == "random" else Path(name)
                results.append((name, quality(model_dir, root, group_of)))
            print("| model | pairs counted | embedding cosine >= | pixel score >= | pairs found | precision | recall |")
            print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
            for name, result in results:
                for (kind, threshold, pixels), row in result["rows"].items():
                    default = threshold == DEFAULT_THRESHOLD and pixels == DEFAULT_PIXEL_THRESHOLD
                    counted = "candidates confirmed by pixels" if pixels else "embeddings alone"
                    mark = " (default)" if default else ""
                    print(f"| {name} | {counted}{mark} | {threshold:.2f} | {f'{pixels:.2f}' if pixels else '—'} | {row['pairs']:,} | "
                          f"{row['precision']:.3f} | {row['recall']:.3f} |")
            print()
            for name, result in results:
                report, group_pairs = result["report"], result["group_pairs"]
                candidates, images, seconds = result["pixel_check"]
                variants = ", ".join(f"{v} {r[0]:.2f} -> {r[1]:.2f}" for v, r in result["per_variant_recall"].items() if r)
                print(f"{name}: {result['true_pairs']} true pairs; median cosine of a true pair "
                      f"{result['median_true_pair']:.3f}, 99.9th percentile of other pairs {result['p999_other_pair']:.3f} "
                      f"(max {result['max_other_pair']:.3f}); pixel score: lowest true pair "
                      f"{result['lowest_true_pixels']:.3f}, highest other pair {result['highest_other_pixels']:.3f}.\n"
                      f"  find_duplicates at the defaults: {report.candidates} candidates, {report.pairs} confirmed, "
                      f"{len(report.groups)} groups {report.sizes}, {report.seconds:.1f} s; pairs within its groups: "
                      f"{group_pairs['pairs']} (precision {group_pairs['precision']:.3f}, recall "
                      f"{group_pairs['recall']:.3f}).\n"
                      f"  pixel check of the {candidates} candidates at cosine >= {min(CANDIDATE_THRESHOLDS)}: "
                      f"{images} images read in {seconds:.1f} s.\n"
                      f"  recall of copy vs original by kind (cosine >= 0.95 alone -> defaults): {variants}.\n"
                      f"  false pairs at the defaults (first 5): {result['false_pairs_default']}")

    if not args.skip_speed:
        print(f"\nspeed: D={DIM}, threshold {DEFAULT_THRESHOLD}, FAISS IVF nlist 4*sqrt(N), nprobe {args.nprobe}, "
              f"exact blocks {DEFAULT_BLOCK_ROWS}x{DEFAULT_BLOCK_ROWS}, load {os.getloadavg()[0]:.1f}\n")
        print("| items | vectors | exact self-join | exact pairs | FAISS IVF range search (incl. build) | FAISS pairs "
              "| planted pairs FAISS found |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        speed(args.sizes, args.vectors, args.exact_sample, args.sample_blocks, DEFAULT_THRESHOLD, args.nprobe,
              args.faiss_max, args.seed)  # fmt: skip
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
