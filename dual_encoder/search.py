"""Natural-language search over an image index: query normalisation, the `Searcher`, contact sheets."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageOps

from dual_encoder import files, images
from dual_encoder.config import DataConfig
from dual_encoder.index.embed import load_checked_model
from dual_encoder.index.errors import QueryError, UnknownItemError
from dual_encoder.index.store import ImageIndex
from dual_encoder.index.store import validate_k

# -- query normalisation ----------------------------------------------------------------------------
# Request phrases people type before what they want to see. Only whole phrases at the start are
# removed; singular "a picture of ..." / "photo of ..." are kept, as they describe the image itself.
_POLITE = ("please", "can you", "could you", "would you", "will you")
_VERBS = (
    "find me", "find", "show me", "show", "search for", "search", "look for", "looking for", "get me",
    "give me", "fetch", "display", "i want", "i'd like", "i would like", "i need", "i'm looking for",
    "i am looking for",
)  # fmt: skip
_STANDALONE_VERBS = (
    "find me", "show me", "search for", "look for", "looking for", "i'm looking for", "i am looking for",
)  # fmt: skip
_DETERMINERS = ("a", "an", "some", "any", "the")
_NOUNS = ("images", "image", "pictures", "picture", "photos", "photo", "photographs", "photograph", "pics", "pic")
_PLURAL_NOUNS = ("images", "pictures", "photos", "photographs", "pics")
_LINKS = ("of", "with", "showing", "that show", "that shows", "containing", "featuring", "depicting")


def _any(phrases: Sequence[str]) -> str:
    # Longest first, so "find me" wins over "find"; spaces match any run of whitespace.
    alternatives = (r"\s+".join(map(re.escape, p.split())) for p in sorted(phrases, key=len, reverse=True))
    return "(?:" + "|".join(alternatives) + ")"


_POLITE_PART = rf"(?:{_any(_POLITE)}\s+)*"
# Each row: a kind of request prefix, as a regex anchored at the start of the query.
REQUEST_PATTERNS: tuple[tuple[str, str], ...] = (
    (
        "verb + image noun",
        rf"{_POLITE_PART}{_any(_VERBS)}\s+(?:{_any(_DETERMINERS)}\s+)?{_any(_NOUNS)}\s+{_any(_LINKS)}",
    ),
    ("request verb", rf"{_POLITE_PART}{_any(_STANDALONE_VERBS)}"),
    ("plural image noun", rf"{_any(_PLURAL_NOUNS)}\s+{_any(_LINKS)}"),
)
# The alternation of every pattern, in the regex subset Python's `re` and RE2 (TensorFlow) share, so the
# exported searcher can strip the same phrases in its graph.
REQUEST_PREFIX = "|".join(f"(?:{pattern})" for _, pattern in REQUEST_PATTERNS)
# Anchored: a request phrase is removed only at the start ("a dog showing pictures of cats" stays whole).
_REQUEST = re.compile(rf"^(?:{REQUEST_PREFIX})(?=\s|$)", re.IGNORECASE)


def normalize_query(text: str) -> str:
    """Strip a leading request phrase ("find images of", "show me", ...) and collapse whitespace.

    The rest is kept verbatim (case included). A query that is empty, or only a request phrase,
    raises `QueryError`.

    Example:
        >>> normalize_query("  Find me pictures of   a dog on a beach")
        'a dog on a beach'
    """
    if not isinstance(text, str):
        raise QueryError(f"a query must be a string, got {type(text).__name__}")
    collapsed = " ".join(text.split())
    if not collapsed:
        raise QueryError("the query is empty")
    stripped = _REQUEST.sub("", collapsed, count=1).strip()
    if not stripped:
        raise QueryError(f"the query '{collapsed}' has nothing to search for once the request phrase is removed")
    return stripped


# -- results ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result.

    Args:
        rank: 1 for the best match.
        id: the item id in the index (stable across adds and removes).
        path: the image file.
        score: cosine similarity between the query and the image.
        caption: the dataset caption, if the image came from a captioned split.
    """

    rank: int
    id: int
    path: str
    score: float
    caption: Optional[str] = None

    def to_dict(self, path: bool = True) -> dict[str, Any]:
        """`{rank, id, path, score, caption}` (without `path` when `path` is False)."""
        fields = {"rank": self.rank, "id": self.id, "path": self.path, "score": self.score, "caption": self.caption}
        if not path:
            del fields["path"]
        return fields


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The hits of one query; iterates (and indexes) like a list of `Hit`.

    Args:
        query: the text as given.
        normalized_query: the text sent to the text tower.
        hits: best first.
    """

    query: str
    normalized_query: str
    hits: list[Hit]

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, position: int) -> Hit:
        return self.hits[position]

    def to_dict(
        self,
        k: Optional[int] = None,
        *,
        paths: bool = True,
        links: Optional[Callable[[Hit], dict[str, str]]] = None,
    ) -> dict[str, Any]:
        """The one JSON shape of a result — `search --json`, the HTTP API, the demo's summary:
        `{query, normalized_query, hits: [{rank, id, path, score, caption}]}`.

        Args:
            k: keep only the first `k` hits (a micro-batch of the server searches with the largest k asked in it).
            paths: include each hit's file path (the HTTP API keeps server paths to itself).
            links: more fields per hit, e.g. the API's image and thumbnail URLs.
        """
        return {
            "query": self.query,
            "normalized_query": self.normalized_query,
            "hits": [{**hit.to_dict(paths), **(links(hit) if links else {})} for hit in self.hits[:k]],
        }


# -- the searcher -----------------------------------------------------------------------------------


class Searcher:
    """Text queries in, ranked images out: the model's text tower plus an image index.

    Args:
        index: the image index.
        model: the `DualEncoder` whose image tower embedded the index.
        normalize: strip request phrases from queries (`normalize_query`).

    Example:
        >>> searcher = Searcher.load("photos.index")
        >>> for hit in searcher.search("find images of a dog on a beach", k=5):
        ...     print(hit.rank, hit.score, hit.path)
    """

    def __init__(self, index: ImageIndex, model: keras.Model, normalize: bool = True):
        self.index = index
        self.model = model
        self.normalize = normalize
        # One traced graph for every batch size: eager Keras calls cost more than the search itself.
        self._encode_text = tf.function(model.encode_text, input_signature=[tf.TensorSpec([None], tf.string)])

    @classmethod
    def load(
        cls, index_dir: Union[str, Path], model_dir: Optional[Union[str, Path]] = None, verify: bool = True
    ) -> "Searcher":
        """Open an index and its model (the one recorded in the index unless `model_dir` is given).

        Raises:
            IndexNotFoundError, IndexCorruptError: see `ImageIndex.load`.
            ModelMismatchError: `model_dir`'s fingerprint is not the one the index was built with.
        """
        index = ImageIndex.load(index_dir, verify=verify)
        model, _ = load_checked_model(model_dir or index.model.directory, expected=index.model)
        return cls(index, model)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """`[Q, D]` float32 query embeddings, in one text-tower call."""
        return keras.ops.convert_to_numpy(self._encode_text(tf.constant(list(texts), dtype=tf.string)))

    def search(self, query: Union[str, Sequence[str]], k: int = 10) -> Union[SearchResult, list[SearchResult]]:
        """The `k` best images for a query (a `SearchResult`), or for each query of a list.

        `k` must be a positive integer and is clamped to the gallery size.
        """
        k = validate_k(k)
        queries = [query] if isinstance(query, str) else list(query)
        if not queries:
            raise QueryError("no queries given")
        texts = [normalize_query(q) if self.normalize else _check_text(q) for q in queries]
        rows, scores = self.index.search(self.encode_queries(texts), k)
        results = [
            SearchResult(q, text, self._hits(row_list, score_list))
            for q, text, row_list, score_list in zip(queries, texts, rows, scores)
        ]
        return results[0] if isinstance(query, str) else results

    def _hits(self, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        hits = []
        for row, score in zip(rows, scores):
            if row < 0:  # an approximate index found fewer than k
                continue
            item = self.index.items[int(row)]
            hits.append(Hit(len(hits) + 1, item.id, item.path, float(score), item.caption))
        return hits

    def image_path(self, item_id: int) -> str:
        """The image file of an item id (e.g. to serve it)."""
        row = self.index.items.row_of(int(item_id))
        if row is None:
            raise UnknownItemError(f"no item with id {item_id} in the index")
        return self.index.items.paths[row]

    def info(self) -> dict[str, Any]:
        """What is being searched: model, counts and index parameters."""
        return {
            "model_dir": self.index.model.directory,
            "model_fingerprint": self.index.model.fingerprint,
            "count": len(self.index),
            "dim": self.index.dim,
            "kind": self.index.kind.value,
            "dtype": self.index.dtype,
            "ann": self.index.ann_params,
        }


def _check_text(query: Any) -> str:
    if not isinstance(query, str) or not query.strip():
        raise QueryError(f"a query must be a non-empty string, got {query!r}")
    return query


# -- contact sheet ----------------------------------------------------------------------------------

_LABEL_HEIGHT = 16
_MARGIN = 4


def write_grid(
    result: SearchResult,
    path: Union[str, Path],
    thumb: int = 128,
    columns: int = 5,
    max_pixels: int = DataConfig.max_image_pixels,
) -> Path:
    """A PNG contact sheet of `result`'s hits: thumbnails labelled with rank and score, query on top.

    Thumbnails are upright (EXIF orientation applied, `images.decode`). Images that cannot be opened — missing,
    not regular files, over `max_pixels`, undecodable — are drawn as grey tiles, so the sheet always has every hit.
    """
    columns = max(1, min(columns, len(result.hits) or 1))
    rows = max(1, -(-len(result.hits) // columns))
    cell_w, cell_h = thumb + _MARGIN, thumb + _LABEL_HEIGHT + _MARGIN
    sheet = Image.new("RGB", (columns * cell_w + _MARGIN, rows * cell_h + _LABEL_HEIGHT + _MARGIN), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((_MARGIN, 2), f"{result.normalized_query}  ({len(result.hits)} hits)", fill="black")
    for position, hit in enumerate(result.hits):
        left = _MARGIN + (position % columns) * cell_w
        top = _LABEL_HEIGHT + _MARGIN + (position // columns) * cell_h
        sheet.paste(_thumbnail(hit.path, thumb, max_pixels), (left, top))
        draw.text((left, top + thumb + 2), f"#{hit.rank}  {hit.score:.3f}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def _thumbnail(image_path: str, size: int, max_pixels: int) -> Image.Image:
    try:
        image = images.decode(files.read_bytes(image_path), max_pixels, draft=(size, size))  # upright, RGB
    except files.FileRefusedError:  # missing, not a regular file, too large, undecodable
        return Image.new("RGB", (size, size), "lightgrey")
    return ImageOps.pad(image, (size, size), color="white")
