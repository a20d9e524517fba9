"""Query normalisation, the Searcher over a real tiny model and index, and the contact sheet."""

import json

import numpy as np
import pytest
from PIL import Image

from dual_encoder.config import IndexConfig
from dual_encoder.index import IndexNotFoundError, ModelMismatchError, QueryError, UnknownItemError, build_index
from dual_encoder.search import Hit, SearchResult, Searcher, normalize_query, write_grid
from tests.unit.index.helpers import save_tiny_model, write_images

NORMALISED = [
    ("find images of a dog on a beach", "a dog on a beach"),
    ("Find me pictures of   a dog", "a dog"),
    ("show me pictures of red cars", "red cars"),
    ("SEARCH FOR PHOTOS OF Snowy Mountains", "Snowy Mountains"),
    ("I want a photo of a sunset", "a sunset"),
    ("i'm looking for pics showing two people", "two people"),
    ("Could you please show me a cat", "a cat"),
    ("images of a bridge at night", "a bridge at night"),
    ("look for\tthe  moon ", "the moon"),
    # Real content is kept: singular "a picture of" describes the image, and verbs need a request form.
    ("a picture of a cat", "a picture of a cat"),
    ("photo of a cat", "photo of a cat"),
    ("show jumping horses", "show jumping horses"),
    ("finding nemo", "finding nemo"),
    ("find a red circle", "find a red circle"),
    ("imagesof", "imagesof"),
    ("a dog showing pictures of cats", "a dog showing pictures of cats"),  # only a leading phrase goes
    ("A Red Circle", "A Red Circle"),
]


@pytest.mark.parametrize("query, expected", NORMALISED)
def test_normalize_query(query, expected):
    assert normalize_query(query) == expected


@pytest.mark.parametrize("query", ["", "   ", "find images of", "show me", "pictures of  "])
def test_a_query_with_nothing_to_search_for_is_an_error(query):
    with pytest.raises(QueryError, match="empty|nothing to search for"):
        normalize_query(query)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    model_dir = save_tiny_model(root / "model", seed=0)
    write_images(root / "photos", 6)
    build_index(model_dir, root / "photos", root / "ix", IndexConfig(), progress=False)
    return root


@pytest.fixture(scope="module")
def searcher(gallery):
    return Searcher.load(gallery / "ix")


def test_search_ranks_by_the_text_image_cosine(searcher):
    result = searcher.search("find images of a red circle", k=4)
    assert isinstance(result, SearchResult) and result.normalized_query == "a red circle"
    assert [hit.rank for hit in result] == [1, 2, 3, 4]
    query = searcher.model.encode_text(["a red circle"]).numpy()[0]
    expected = np.sort(searcher.index.embeddings @ query)[::-1][:4]
    np.testing.assert_allclose([hit.score for hit in result], expected, atol=1e-5)
    assert result[0].path == searcher.image_path(result[0].id)


def test_a_batch_is_one_text_tower_call_with_the_same_hits(searcher, monkeypatch):
    calls = []
    encode = searcher.encode_queries
    monkeypatch.setattr(searcher, "encode_queries", lambda texts: calls.append(list(texts)) or encode(texts))
    batch = searcher.search(["a red circle", "show me two blue squares", "one large yellow star"], k=3)
    assert calls == [["a red circle", "two blue squares", "one large yellow star"]]
    single = searcher.search("one large yellow star", k=3)
    assert [h.id for h in batch[2]] == [h.id for h in single]
    np.testing.assert_allclose([h.score for h in batch[2]], [h.score for h in single], atol=1e-6)


def test_k_is_clamped_and_bad_k_is_a_clear_error(searcher):
    assert len(searcher.search("a red circle", k=1000)) == 6
    for bad in (0, -3, "5", 2.5, None):
        with pytest.raises(QueryError, match="k must be a positive integer"):
            searcher.search("a red circle", k=bad)
    with pytest.raises(QueryError):
        searcher.search([], k=3)


def test_info_and_unknown_ids(searcher, gallery):
    info = searcher.info()
    assert info["count"] == 6 and info["dim"] == 16 and info["kind"] == "exact" and info["dtype"] == "float32"
    assert info["model_dir"] == str(gallery / "model") and len(info["model_fingerprint"]) == 64
    with pytest.raises(UnknownItemError, match="no item with id 99"):
        searcher.image_path(99)


def test_load_refuses_a_model_with_another_fingerprint(gallery):
    other = save_tiny_model(gallery / "other-model", seed=1)
    with pytest.raises(ModelMismatchError, match=r"fingerprint mismatch") as error:
        Searcher.load(gallery / "ix", model_dir=other)
    assert str(other) in str(error.value) and str(gallery / "model") in str(error.value)


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(IndexNotFoundError, match="no index at"):
        Searcher.load(tmp_path / "nothing-here")


def test_contact_sheet_has_every_hit_even_unreadable_ones(searcher, tmp_path):
    result = searcher.search("a red circle", k=6)
    gone = Hit(rank=6, id=99, path=str(tmp_path / "gone.png"), score=0.1)
    broken = SearchResult(result.query, result.normalized_query, result.hits[:5] + [gone])
    path = write_grid(broken, tmp_path / "sheets" / "grid.png", thumb=40, columns=3)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG" and sheet.size == (3 * 44 + 4, 2 * 60 + 20)
        # The missing image is a grey tile, the first hit shows its pixels.
        assert sheet.getpixel((4 + 2 * 44 + 20, 20 + 60 + 4 + 20)) == (211, 211, 211)
        assert sheet.getpixel((4 + 20, 20 + 4 + 20)) != (255, 255, 255)


def test_contact_sheet_thumbnails_are_upright(tmp_path):
    from tests.unit.index.helpers import write_phone_photo

    hit = Hit(rank=1, id=0, path=str(write_phone_photo(tmp_path / "phone.jpg", 6)), score=0.5)
    path = write_grid(SearchResult("q", "q", [hit]), tmp_path / "grid.png", thumb=48, columns=1)
    with Image.open(path) as sheet:
        tile_left, tile_top = 4, 20
        # Upright the photo is 24 x 48, padded to 48 x 48: red on top, blue below (stored, red left, blue right).
        assert sheet.getpixel((tile_left + 24, tile_top + 6))[0] > 200
        assert sheet.getpixel((tile_left + 24, tile_top + 42))[2] > 200


def test_one_json_shape_for_results_with_or_without_paths_and_links():
    result = SearchResult("find a dog", "a dog", [Hit(1, 7, "/p/a.jpg", 0.5, "a dog"), Hit(2, 3, "/p/b.jpg", 0.25)])
    assert result.to_dict() == {
        "query": "find a dog",
        "normalized_query": "a dog",
        "hits": [
            {"rank": 1, "id": 7, "path": "/p/a.jpg", "score": 0.5, "caption": "a dog"},
            {"rank": 2, "id": 3, "path": "/p/b.jpg", "score": 0.25, "caption": None},
        ],
    }
    served = result.to_dict(1, paths=False, links=lambda hit: {"image_url": f"/i/{hit.id}"})
    assert served["hits"] == [{"rank": 1, "id": 7, "score": 0.5, "caption": "a dog", "image_url": "/i/7"}]
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()
