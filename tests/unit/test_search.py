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


# -- image queries, "more like this" and weighted mixes -----------------------------------------------------------


def _row_of_path(searcher, path):
    return searcher.index.items.paths.index(str(path))


def test_the_file_of_an_indexed_image_finds_itself_first_with_its_stored_embedding(searcher, gallery):
    photo = gallery / "photos" / "003.png"
    result = searcher.search(image=photo, k=3)
    assert result[0].path == str(photo) and result[0].score == pytest.approx(1.0, abs=1e-4)
    assert result.query is None and result.normalized_query is None and result.image == str(photo)
    stored = searcher.index.embeddings[_row_of_path(searcher, photo)]
    np.testing.assert_allclose(searcher.encode_images([photo])[0], stored, atol=1e-5)


def test_paths_bytes_pillow_images_and_arrays_embed_alike(searcher, gallery):
    photo = gallery / "photos" / "001.png"
    with Image.open(photo) as opened:
        pil = opened.convert("RGB")
    by_path, by_bytes, by_pil, by_array = searcher.encode_images([photo, photo.read_bytes(), pil, np.asarray(pil)])
    for other in (by_bytes, by_pil, by_array):
        np.testing.assert_allclose(other, by_path, atol=1e-6)


def test_an_exif_rotated_photo_is_searched_upright(searcher, tmp_path):
    from tests.unit.index.helpers import write_phone_photo

    phone = write_phone_photo(tmp_path / "phone.jpg", 6)
    with Image.open(phone) as opened:
        from PIL import ImageOps

        upright = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    stored_sideways = np.asarray(Image.open(phone).convert("RGB"))
    by_file, by_upright, by_sideways = searcher.encode_images([phone, upright, stored_sideways])
    np.testing.assert_allclose(by_file, by_upright, atol=1e-5)
    assert np.abs(by_file - by_sideways).max() > 1e-3


def test_more_like_this_ranks_the_item_itself_first(searcher):
    item = searcher.index.items[2]
    result = searcher.search(like=item.id, k=6)
    assert result[0].id == item.id and result[0].score == pytest.approx(1.0, abs=1e-5)
    assert result.like == item.id and result.query is None and result.weights is None
    expected = np.sort(searcher.index.embeddings @ searcher.index.embeddings[2])[::-1]
    np.testing.assert_allclose([hit.score for hit in result], expected, atol=1e-5)


def test_a_mix_searches_the_normalised_weighted_sum(searcher, gallery):
    photo = gallery / "photos" / "004.png"
    result = searcher.search("find images of at night", image=photo, like=0, image_weight=2.0, like_weight=0.5, k=6)
    text = searcher.encode_queries(["at night"])[0]
    image = searcher.encode_images([photo])[0]
    like = searcher.index.embeddings[searcher.index.items.row_of(0)]
    mixed = 1.0 * text + 2.0 * image + 0.5 * like
    mixed /= np.linalg.norm(mixed)
    np.testing.assert_allclose([hit.score for hit in result], np.sort(searcher.index.embeddings @ mixed)[::-1], atol=1e-5)
    assert result.normalized_query == "at night" and result.like == 0
    assert result.weights == {"text": 1.0, "image": 2.0, "like": 0.5}
    assert result.describe() == 'image 004.png + like #0 + "at night"'
    # A part with weight 0 counts for nothing: the mix is then the image alone.
    only_image = searcher.search("at night", image=photo, text_weight=0, k=6)
    assert [h.id for h in only_image] == [h.id for h in searcher.search(image=photo, k=6)]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"image": b"not an image"}, "not an image"),
        ({"image": "/nonexistent/photo.jpg"}, "missing"),
        ({"image": np.zeros((4, 4, 3), np.float32)}, "uint8"),
        ({"image": 3.5}, "a path, bytes"),
        ({"like": 999}, "no item with id 999"),
        ({"like": "3"}, "an item id must be an integer"),
        ({"query": ["a", "b"], "like": 0}, "one text, not a list"),
        ({"query": "a red circle", "like": 0, "text_weight": 0, "like_weight": 0}, "weighted query is zero"),
        ({"like": 0, "like_weight": -1}, "like_weight must be at least 0"),
        ({"like": 0, "like_weight": float("nan")}, "like_weight must be a number"),
        ({}, "give a text query, an image or an item id"),
    ],
)
def test_bad_image_item_and_mix_queries_are_clear_errors(searcher, kwargs, error):
    with pytest.raises((QueryError, UnknownItemError), match=error):
        searcher.search(k=3, **kwargs)


def test_a_query_image_over_the_pixel_limit_is_refused_from_its_header(gallery, tmp_path):
    from dual_encoder.search import QueryImageError

    small = Searcher.load(gallery / "ix", max_image_pixels=30 * 30)
    with pytest.raises(QueryImageError, match="too large") as refused:
        small.search(image=gallery / "photos" / "000.png")  # 40 x 40
    assert refused.value.reason == "too large"


def test_image_item_and_mix_results_keep_one_json_shape():
    hits = [Hit(1, 7, "/p/a.jpg", 0.5)]
    by_image = SearchResult(None, None, hits, image="/home/me/beach.jpg")
    assert by_image.to_dict()["image"] == "/home/me/beach.jpg" and by_image.to_dict()["query"] is None
    assert by_image.to_dict(paths=False)["image"] == "beach.jpg"  # the API keeps server paths to itself
    mix = SearchResult("at night", "at night", hits, like=7, weights={"text": 1.0, "like": 2.0})
    assert list(mix.to_dict()) == ["query", "normalized_query", "like", "weights", "hits"]
    assert mix.describe() == 'like #7 + "at night"'
    assert set(SearchResult("q", "q", hits).to_dict()) == {"query", "normalized_query", "hits"}


def test_an_image_pillow_reads_but_tensorflow_cannot_decode_is_a_query_error(searcher, gallery, monkeypatch):
    from dual_encoder import images
    from dual_encoder.search import QueryImageError

    monkeypatch.setattr(images, "tf_readable", lambda data, max_pixels, compress_level=6: (b"\xff\xd8 garbage", "jpeg"))
    with pytest.raises(QueryImageError, match="corrupt \\(TensorFlow could not decode it\\)"):
        searcher.search(image=gallery / "photos" / "000.png")
