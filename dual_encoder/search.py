"""Search over an image index: query normalisation, the `Searcher` (text, image, "more like this" and weighted
mixes of them) and contact sheets."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from dual_encoder import files, images
from dual_encoder.config import DataConfig
from dual_encoder.contact_sheet import Section, Tile, write_sheet
from dual_encoder.data.pipeline import decode_and_resize, image_input
from dual_encoder.index.errors import QueryError, QueryImageError, UnknownItemError
from dual_encoder.index.store import ImageIndex
from dual_encoder.index.store import validate_k
from dual_encoder.models import load_checked_model
from dual_encoder.models.compiled import compiled

# What an image query may be: a file path, the encoded bytes of an image file, a Pillow image, or an RGB array.
QueryImage = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

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

    A query is text, an image, an indexed item ("more like this"), or a weighted mix of them; the fields of the
    parts it did not have are None.

    Args:
        query: the text as given.
        normalized_query: the text sent to the text tower.
        hits: best first.
        image: the query image (its path, or the name it was uploaded with).
        like: the id of the indexed item whose embedding the query used.
        weights: the weight of each part (`text`, `image`, `like`) of a mix of two or more.
    """

    query: Optional[str]
    normalized_query: Optional[str]
    hits: list[Hit]
    image: Optional[str] = None
    like: Optional[int] = None
    weights: Optional[dict[str, float]] = None

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, position: int) -> Hit:
        return self.hits[position]

    def describe(self) -> str:
        """The query in words, e.g. `a red star`, `image photo.jpg + "at night"`, `like #17`."""
        parts = []
        if self.image is not None:
            parts.append(f"image {os.path.basename(self.image) or self.image}")
        if self.like is not None:
            parts.append(f"like #{self.like}")
        if self.normalized_query is not None:
            parts.append(f'"{self.normalized_query}"' if parts else self.normalized_query)
        return " + ".join(parts)

    def to_dict(
        self,
        k: Optional[int] = None,
        *,
        paths: bool = True,
        links: Optional[Callable[[Hit], dict[str, str]]] = None,
    ) -> dict[str, Any]:
        """The one JSON shape of a result — `search --json`, the HTTP API, the demo's summary:
        `{query, normalized_query, hits: [{rank, id, path, score, caption}]}`, plus `image`, `like` and `weights`
        for a query that had them (`query` and `normalized_query` are null for a query without text).

        Args:
            k: keep only the first `k` hits (a micro-batch of the server searches with the largest k asked in it).
            paths: include each hit's file path, and the query image's (the HTTP API keeps server paths to itself).
            links: more fields per hit, e.g. the API's image and thumbnail URLs.
        """
        shape: dict[str, Any] = {"query": self.query, "normalized_query": self.normalized_query}
        if self.image is not None:
            shape["image"] = self.image if paths else os.path.basename(self.image)
        if self.like is not None:
            shape["like"] = self.like
        if self.weights is not None:
            shape["weights"] = dict(self.weights)
        shape["hits"] = [{**hit.to_dict(paths), **(links(hit) if links else {})} for hit in self.hits[:k]]
        return shape


# -- the searcher -----------------------------------------------------------------------------------


class Searcher:
    """Queries in, ranked images out: the model's towers plus an image index.

    A query is text, an image ("search by image"), an indexed item ("more like this"), or a weighted mix of them:
    the normalised weighted sum of their unit embeddings.

    Args:
        index: the image index.
        model: the `DualEncoder` whose image tower embedded the index.
        normalize: strip request phrases from queries (`normalize_query`).
        max_image_pixels: query images whose header declares more pixels are refused before decoding.

    Example:
        >>> searcher = Searcher.load("photos.index")
        >>> for hit in searcher.search("find images of a dog on a beach", k=5):
        ...     print(hit.rank, hit.score, hit.path)
        >>> searcher.search(image="beach.jpg")                              # search by image
        >>> searcher.search(like=17)                                       # more like item 17
        >>> searcher.search("at night", image="beach.jpg", image_weight=2)  # a weighted mix
    """

    def __init__(
        self,
        index: ImageIndex,
        model: keras.Model,
        normalize: bool = True,
        max_image_pixels: int = DataConfig.max_image_pixels,
    ):
        self.index = index
        self.model = model
        self.normalize = normalize
        self.max_image_pixels = max_image_pixels
        # One traced graph for every batch size (the model's, shared with indexing and evaluation): eager Keras
        # calls cost more than the search itself.
        self._encode_text = compiled(model, "encode_text")

    @classmethod
    def load(
        cls,
        index_dir: Union[str, Path],
        model_dir: Optional[Union[str, Path]] = None,
        verify: bool = True,
        max_image_pixels: int = DataConfig.max_image_pixels,
    ) -> "Searcher":
        """Open an index and its model (the one recorded in the index unless `model_dir` is given).

        Raises:
            IndexNotFoundError, IndexCorruptError: see `ImageIndex.load`.
            ModelMismatchError: `model_dir`'s fingerprint is not the one the index was built with.
        """
        index = ImageIndex.load(index_dir, verify=verify)
        model, _ = load_checked_model(model_dir or index.model.directory, expected=index.model)
        return cls(index, model, max_image_pixels=max_image_pixels)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """`[Q, D]` float32 query embeddings, in one text-tower call."""
        return keras.ops.convert_to_numpy(self._encode_text(tf.constant(list(texts), dtype=tf.string)))

    def encode_images(self, query_images: Sequence[QueryImage]) -> np.ndarray:
        """`[N, D]` float32 embeddings of query images, in one image-tower call.

        Each image is decoded as `index build` decodes a gallery file (`dual_encoder.images`: EXIF orientation
        applied, JPEG/PNG/GIF/BMP/WebP/TIFF, HEIC with pillow-heif; then `decode_and_resize`), so the file of an
        indexed image embeds as its item did. Pillow images and arrays (`uint8` `[H, W]`, `[H, W, 3]` or
        `[H, W, 4]`) are taken as they are, upright.

        Raises:
            QueryImageError: an image that is missing, not an image, corrupt or larger than `max_image_pixels`.
        """
        if not query_images:
            raise QueryError("no query images given")
        return self._encode(query_images, [_image_name(image) for image in query_images])

    def _encode_image(self, image: QueryImage, name: Optional[str]) -> np.ndarray:
        return self._encode([image], [name or _image_name(image)])[0]

    def _encode(self, query_images: Sequence[QueryImage], names: Sequence[str]) -> np.ndarray:
        size = image_input(self.model)
        pixels = []
        for image, name in zip(query_images, names):
            try:
                pixels.append(decode_and_resize(tf.constant(self._tf_bytes(image, name)), size))
            except tf.errors.OpError:  # bytes Pillow read but TensorFlow's decoder does not: still the user's input
                raise QueryImageError(files.Refused.CORRUPT, f"query image {name}: corrupt (TensorFlow could not decode it)") from None
        return keras.ops.convert_to_numpy(compiled(self.model, "encode_image")(tf.stack(pixels)))

    def _tf_bytes(self, image: QueryImage, name: str) -> bytes:
        """Encoded bytes that TensorFlow decodes to the upright pixels of `image`."""
        try:
            if isinstance(image, (str, os.PathLike)):
                data = files.read_bytes(image)
            elif isinstance(image, (bytes, bytearray, memoryview)):
                data = bytes(image)
            elif isinstance(image, (Image.Image, np.ndarray)):
                return _png_of(image, self.max_image_pixels)
            else:
                raise QueryError(f"a query image must be a path, bytes, a Pillow image or an array, got {name}")
            # zlib level 1: a converted image (EXIF-rotated, WebP, HEIC …) lives only until it is decoded.
            return images.tf_readable(data, self.max_image_pixels, compress_level=1)[0]
        except files.FileRefusedError as refused:
            raise QueryImageError.refused(name, refused) from None

    def item_embedding(self, item_id: int) -> np.ndarray:
        """The stored embedding of an indexed item (float32 `[D]`), for "more like this"."""
        if isinstance(item_id, bool) or not isinstance(item_id, (int, np.integer)):
            raise QueryError(f"an item id must be an integer, got {item_id!r}")
        row = self.index.items.row_of(int(item_id))
        if row is None:
            raise UnknownItemError(f"no item with id {item_id} in the index")
        return np.asarray(self.index.embeddings[row], dtype=np.float32)

    def search(
        self,
        query: Union[str, Sequence[str], None] = None,
        k: int = 10,
        *,
        image: Optional[QueryImage] = None,
        like: Optional[int] = None,
        text_weight: float = 1.0,
        image_weight: float = 1.0,
        like_weight: float = 1.0,
        image_name: Optional[str] = None,
    ) -> Union[SearchResult, list[SearchResult]]:
        """The `k` best images for a query (a `SearchResult`), or for each text query of a list.

        Args:
            query: text, or a list of texts (each searched alone, in one text-tower call).
            k: results per query, a positive integer; clamped to the gallery size.
            image: search by this image (see `encode_images` for what it may be).
            like: search by the embedding of this indexed item ("more like this"; the item itself ranks first).
            text_weight, image_weight, like_weight: with two or more of `query`, `image` and `like`, the query
                embedding is the normalised weighted sum of theirs. Weights are finite and at least 0.
            image_name: how the image is named in the result and in errors (default: its path, or its size), e.g.
                the name an upload came with.

        Raises:
            QueryError: no query, an empty text, a bad `k` or weight, a list of texts mixed with an image or item.
            QueryImageError: the image cannot be read (see `encode_images`).
            UnknownItemError: `like` is not an id in the index.
        """
        k = validate_k(k)
        if image is None and like is None:
            return self._search_texts(query, k)
        if query is not None and not isinstance(query, str):
            raise QueryError("a query with an image or an item takes one text, not a list")
        weights = {"text": text_weight, "image": image_weight, "like": like_weight}
        parts: dict[str, np.ndarray] = {}
        text = None
        if query is not None:
            text = normalize_query(query) if self.normalize else _check_text(query)
            parts["text"] = self.encode_queries([text])[0]
        if image is not None:
            parts["image"] = self._encode_image(image, image_name)
        if like is not None:
            parts["like"] = self.item_embedding(like)
        used = {name: _check_weight(name, weights[name]) for name in parts}
        vector = combine_embeddings([parts[name] for name in used], list(used.values()))
        rows, scores = self.index.search(vector[None], k)
        return SearchResult(
            query, text, self._hits(rows[0], scores[0]),
            image=None if image is None else image_name or _image_name(image),
            like=None if like is None else int(like),
            weights=used if len(used) > 1 else None,
        )  # fmt: skip

    def _search_texts(self, query: Union[str, Sequence[str], None], k: int) -> Union[SearchResult, list[SearchResult]]:
        if query is None:
            raise QueryError("give a text query, an image or an item id")
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


def combine_embeddings(embeddings: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The L2-normalised weighted sum of (unit) embeddings: one query vector for a mix of text, image and item.

    Raises:
        QueryError: the sum is (close to) zero, e.g. every weight is 0.
    """
    total = np.zeros_like(np.asarray(embeddings[0], dtype=np.float32))
    for embedding, weight in zip(embeddings, weights):
        total += float(weight) * np.asarray(embedding, dtype=np.float32)
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise QueryError("the weighted query is zero: give at least one part a weight above 0")
    return total / norm


def _check_weight(name: str, weight: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)) or not math.isfinite(weight):
        raise QueryError(f"{name}_weight must be a number, got {weight!r}")
    if weight < 0:
        raise QueryError(f"{name}_weight must be at least 0, got {weight}")
    return float(weight)


def _image_name(image: Any) -> str:
    """How a query image is named in results and messages."""
    if isinstance(image, (str, os.PathLike)):
        return files.printable(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes>"
    if isinstance(image, np.ndarray):
        return f"<array {list(image.shape)} {image.dtype}>"
    if isinstance(image, Image.Image):
        return f"<Pillow image {image.width}x{image.height}>"
    return type(image).__name__


def _png_of(image: Union[Image.Image, np.ndarray], max_pixels: int) -> bytes:
    """A lossless PNG of an in-memory image, as 8-bit RGB."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise QueryError(f"a query image array must be uint8 [H, W], [H, W, 3] or [H, W, 4], got {_image_name(image)}")
        image = Image.fromarray(image)
    if image.width * image.height > max_pixels:
        raise files.FileRefusedError(files.Refused.TOO_LARGE, f"{image.width}x{image.height} pixels > {max_pixels}")
    buffer = io.BytesIO()
    images.to_rgb(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _check_text(query: Any) -> str:
    if not isinstance(query, str) or not query.strip():
        raise QueryError(f"a query must be a non-empty string, got {query!r}")
    return query


# -- contact sheet ----------------------------------------------------------------------------------


def write_grid(
    result: SearchResult,
    path: Union[str, Path],
    thumb: int = 128,
    columns: int = 5,
    max_pixels: int = DataConfig.max_image_pixels,
) -> Path:
    """A PNG contact sheet of `result`'s hits: thumbnails labelled with rank and score, the query on top.

    Thumbnails are upright (EXIF orientation applied). Images that cannot be opened — missing, not regular files,
    over `max_pixels`, undecodable — are drawn as grey tiles, so the sheet always has every hit.
    """
    tiles = [Tile(hit.path, f"#{hit.rank}  {hit.score:.3f}") for hit in result.hits]
    title = f"{result.describe()}  ({len(result.hits)} hits)"
    return write_sheet(title, [Section(tiles)], path, thumb, columns, max_pixels)
