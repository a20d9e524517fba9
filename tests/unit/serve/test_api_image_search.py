"""The HTTP API's image queries: an uploaded image, "more like this" an item, mixes with text, and their limits."""

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dual_encoder.config import ServeConfig
from dual_encoder.serve import create_app
from tests.unit.serve.test_api import _assert_json_error


def _upload(client, data: bytes, name: str = "photo.png", **fields):
    return client.post("/api/search", files={"image": (name, data, "image/png")}, data=fields)


def test_an_uploaded_image_of_an_indexed_item_finds_that_item_first(client, searcher):
    item = searcher.index.items[5]
    response = _upload(client, Path(item.path).read_bytes(), name="C:\\Users\\me\\holiday.png", k="4")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["hits"][0]["id"] == item.id and body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert body["image"] == "holiday.png" and body["query"] is None and len(body["hits"]) == 4
    assert set(body) == {"query", "normalized_query", "image", "hits"}  # no like, no weights: not a mix
    assert all("path" not in hit and hit["thumbnail_url"] == f"/api/thumbnails/{hit['id']}" for hit in body["hits"])


def test_an_upload_mixed_with_text_and_an_item_is_the_weighted_search(client, searcher):
    item = searcher.index.items[3]
    data = Path(searcher.index.items[7].path).read_bytes()
    response = _upload(client, data, q="find images of a red circle", like=str(item.id), k="6",
                       image_weight="2", text_weight="0.5", like_weight="0")
    assert response.status_code == 200, response.text
    body = response.json()
    expected = searcher.search("a red circle", image=data, like=item.id, image_weight=2, text_weight=0.5,
                               like_weight=0, k=6)
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected]
    assert body["normalized_query"] == "a red circle" and body["like"] == item.id
    assert body["weights"] == {"text": 0.5, "image": 2.0, "like": 0.0}


def test_more_like_this_by_get_and_by_json_post(client, searcher):
    item = searcher.index.items[10]
    by_get = client.get("/api/search", params={"like": item.id, "k": 5}).json()
    by_post = client.post("/api/search", json={"like": item.id, "k": 5}).json()
    assert by_get == by_post
    assert by_get["hits"][0]["id"] == item.id and by_get["like"] == item.id and by_get["query"] is None
    assert [h["id"] for h in by_get["hits"]] == [h.id for h in searcher.search(like=item.id, k=5)]

    mixed = client.get("/api/search", params={"like": item.id, "q": "a blue star", "like_weight": 3, "k": 5}).json()
    expected = searcher.search("a blue star", like=item.id, like_weight=3, k=5)
    assert [h["id"] for h in mixed["hits"]] == [h.id for h in expected]
    assert mixed["weights"] == {"text": 1.0, "like": 3.0}


def test_text_results_keep_their_shape(client):
    assert set(client.get("/api/search", params={"q": "a red circle"}).json()) == {"query", "normalized_query", "hits"}
    batch = client.post("/api/search", json={"queries": ["a red circle"], "k": 2}).json()
    assert [set(result) for result in batch] == [{"query", "normalized_query", "hits"}]


def _png(width: int, height: int) -> bytes:
    """Random pixels: a PNG of about 3 bytes per pixel (noise does not compress)."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data, status, message",
    [
        (b"%PDF-1.4 not an image at all", 415, "query image photo.png: not an image (readable: JPEG, PNG"),
        (b"", 415, "not an image"),
        (_png(40, 40)[:60], 400, "query image photo.png: corrupt"),
    ],
)
def test_uploads_that_are_not_usable_images_are_4xx_with_a_message(client, data, status, message):
    assert message in _assert_json_error(_upload(client, data), status)


def test_upload_limits_bytes_and_pixels_are_413(searcher):
    config = ServeConfig(max_upload_bytes=8192)
    with TestClient(create_app(searcher, config, max_image_pixels=50 * 50)) as limited:
        detail = _assert_json_error(_upload(limited, _png(60, 60)), 413)
        assert "8192 bytes" in detail
        detail = _assert_json_error(_upload(limited, _png(52, 52)[:4000]), 413)
        assert "too large (52x52 pixels > 2500)" in detail
        assert _upload(limited, _png(50, 50)).status_code == 200
        info = limited.get("/api/info").json()["limits"]
        assert (info["max_upload_bytes"], info["max_image_pixels"]) == (8192, 2500)  # the page checks before sending


def test_the_upload_limit_holds_for_uploads_only(searcher):
    config = ServeConfig(max_request_bytes=2048, max_upload_bytes=1 << 20)
    with TestClient(create_app(searcher, config)) as limited:
        photo = _png(100, 100)
        assert len(photo) > 2048 and _upload(limited, photo).status_code == 200  # a multipart upload
        _assert_json_error(limited.post("/api/search", json={"queries": ["a red circle " * 300]}), 413)
        fake = limited.post("/api/search", content=b"x" * 5000, headers={"content-type": "application/json"})
        _assert_json_error(fake, 413)


_IMAGE = ("image", ("a.png", _png(8, 8), "image/png"))


@pytest.mark.parametrize(
    "parts, message",
    [
        ([("q", (None, "a red circle"))], "image: Field required (an image file, or like=ID)"),
        ([("image", (None, "not a file"))], "image: must be a file"),
        ([_IMAGE, ("colour", (None, "red"))], "colour: unknown field"),
        ([_IMAGE, ("k", (None, "0"))], "k:"),
        ([_IMAGE, ("k", (None, "abc"))], "k:"),
        ([_IMAGE, ("image_weight", (None, "-1"))], "image_weight:"),
        ([_IMAGE, ("text_weight", (None, "nan"))], "text_weight:"),
        ([_IMAGE, ("like", (None, "-3"))], "like:"),
        ([_IMAGE, ("q", (None, "a" * 513))], "q:"),
        ([("q", ("q.txt", b"a file", "text/plain"))], "only the image may be a file"),
    ],
)
def test_bad_upload_fields_are_422_naming_the_field(client, parts, message):
    assert message in _assert_json_error(client.post("/api/search", files=parts), 422)


def test_two_files_and_all_zero_weights_are_clear_errors(client, searcher):
    two = [("image", ("a.png", _png(8, 8), "image/png")), ("image", ("b.png", _png(8, 8), "image/png"))]
    assert "Too many files" in _assert_json_error(client.post("/api/search", files=two), 400)
    zero = _upload(client, _png(8, 8), q="a red circle", image_weight="0", text_weight="0")
    assert "weighted query is zero" in _assert_json_error(zero, 400)


@pytest.mark.parametrize(
    "request_args, status, message",
    [
        ({"method": "GET", "url": "/api/search", "params": {"like": 999999}}, 404, "no item with id 999999"),
        ({"method": "GET", "url": "/api/search", "params": {"like": -1}}, 422, "like:"),
        ({"method": "GET", "url": "/api/search", "params": {"like": "abc"}}, 422, "like:"),
        ({"method": "GET", "url": "/api/search", "params": {"like": 0, "like_weight": -2}}, 422, "like_weight:"),
        ({"method": "GET", "url": "/api/search", "params": {"k": 3}}, 422, "q: Field required"),
        ({"method": "POST", "url": "/api/search", "json": {"like": 999999}}, 404, "no item with id 999999"),
        ({"method": "POST", "url": "/api/search", "json": {"like": "x"}}, 422, "like:"),
        ({"method": "POST", "url": "/api/search", "json": {"like": 0, "k": 1000}}, 422, "k:"),
        ({"method": "POST", "url": "/api/search", "json": {"like": 0, "q": ""}}, 400, "empty"),
        ({"method": "POST", "url": "/api/search", "json": [1, 2]}, 422, "body"),
    ],
)
def test_bad_item_queries_are_4xx_with_a_message(client, request_args, status, message):
    assert message in _assert_json_error(client.request(**request_args), status)


def test_the_openapi_schema_documents_the_upload_and_the_item_query(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/api/search"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert {"like", "q", "k"} <= set(body["application/json"]["schema"]["oneOf"][1]["properties"])
    assert {p["name"] for p in schema["paths"]["/api/search"]["get"]["parameters"]} >= {"q", "k", "like"}


def test_the_page_offers_image_search_and_a_favicon(client):
    page = client.get("/").text
    assert 'id="image-input"' in page and 'for="image-input"' in page and 'id="viewer"' in page
    assert '<link rel="icon" href="/static/favicon.svg"' in page
    for route in ("/static/favicon.svg", "/favicon.ico"):
        response = client.get(route)
        assert response.status_code == 200 and response.headers["content-type"].startswith("image/svg+xml")
        assert response.text.lstrip().startswith("<svg")
