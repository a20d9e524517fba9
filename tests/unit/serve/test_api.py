"""The HTTP API over a real tiny model and index: search, limits, errors, images, thumbnails."""

import concurrent.futures
import hashlib
import io
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dual_encoder.config import ServeConfig
from dual_encoder.search import Searcher
from dual_encoder.serve import create_app


def _assert_json_error(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail
    assert "Traceback" not in response.text
    return detail


# -- search -------------------------------------------------------------------------------------------


def test_search_returns_the_searchers_ranking_with_urls(client, searcher):
    response = client.get("/api/search", params={"q": "find images of a red circle", "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["query"] == "find images of a red circle"
    assert body["normalized_query"] == "a red circle"
    expected = searcher.search("a red circle", k=5)
    assert [hit["id"] for hit in body["hits"]] == [hit.id for hit in expected.hits]
    assert [hit["rank"] for hit in body["hits"]] == [1, 2, 3, 4, 5]
    scores = [hit["score"] for hit in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    for hit in body["hits"]:
        assert hit["image_url"] == f"/api/images/{hit['id']}"
        assert hit["thumbnail_url"] == f"/api/thumbnails/{hit['id']}"
        assert isinstance(hit["caption"], str) and hit["caption"]
        assert "path" not in hit  # server file paths stay on the server


def test_default_k_is_ten(client):
    assert len(client.get("/api/search", params={"q": "a blue square"}).json()["hits"]) == 10


def test_default_k_comes_from_the_config_for_both_routes_and_the_page(searcher):
    with TestClient(create_app(searcher, ServeConfig(default_k=4))) as configured:
        assert len(configured.get("/api/search", params={"q": "a blue square"}).json()["hits"]) == 4
        batch = configured.post("/api/search", json={"queries": ["a blue square", "a red circle"]}).json()
        assert [len(result["hits"]) for result in batch] == [4, 4]
        assert configured.get("/api/info").json()["limits"]["default_k"] == 4  # what the page shows and sends


@pytest.mark.parametrize(
    "query",
    ["ein großer roter Kreis über dem Meer", "犬が浜辺にいる", "🐶 🌊 on a beach", "a   red\tcircle\u00a0😀", "café ñ ü"],
)
def test_unicode_and_emoji_queries_are_searched(client, query):
    response = client.get("/api/search", params={"q": query, "k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == query
    assert body["normalized_query"] == " ".join(query.split())
    assert len(body["hits"]) == 3


def test_query_at_the_length_limit_is_accepted_and_one_more_is_not(client):
    limit = ServeConfig().max_query_chars
    assert client.get("/api/search", params={"q": "a" * limit}).status_code == 200
    detail = _assert_json_error(client.get("/api/search", params={"q": "a" * (limit + 1)}), 422)
    assert detail.startswith("q:") and str(limit) in detail


@pytest.mark.parametrize("k", ["0", "101", "abc", "-1", "1.5", ""])
def test_bad_k_is_a_422_naming_k(client, k):
    detail = _assert_json_error(client.get("/api/search", params={"q": "a red circle", "k": k}), 422)
    assert detail.startswith("k:")


@pytest.mark.parametrize("k", [1, 100])
def test_k_limits_are_inclusive(client, k):
    hits = client.get("/api/search", params={"q": "a red circle", "k": k}).json()["hits"]
    assert len(hits) == min(k, 36)  # clamped to the gallery size


@pytest.mark.parametrize(
    "query, message",
    [("", "empty"), ("   \t ", "empty"), ("find images of", "nothing to search for")],
)
def test_empty_query_is_a_400_with_a_message(client, query, message):
    assert message in _assert_json_error(client.get("/api/search", params={"q": query}), 400)


def test_missing_query_is_a_422(client):
    assert _assert_json_error(client.get("/api/search"), 422).startswith("q:")


def test_concurrent_queries_with_different_k_each_get_their_own_answer(client, searcher):
    queries = [(f"a {colour} {shape}", k) for colour in ("red", "blue", "green", "pink") for shape, k in (("disc", 1), ("star", 7), ("block", 3), ("ring", 12))]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda qk: client.get("/api/search", params={"q": qk[0], "k": qk[1]}), queries))
    for (query, k), response in zip(queries, responses):
        assert response.status_code == 200
        expected = [hit.id for hit in searcher.search(query, k=k).hits]
        assert [hit["id"] for hit in response.json()["hits"]] == expected


def test_without_micro_batching_results_are_the_same(searcher):
    with TestClient(create_app(searcher, ServeConfig(), max_batch=1)) as unbatched:
        body = unbatched.get("/api/search", params={"q": "a red circle", "k": 4}).json()
        assert _assert_json_error(unbatched.get("/api/search", params={"q": " "}), 400)
    assert [hit["id"] for hit in body["hits"]] == [hit.id for hit in searcher.search("a red circle", k=4).hits]


# -- batch search -------------------------------------------------------------------------------------


def test_post_batch_matches_single_searches(client):
    queries = ["a red circle", "show me a blue square", "🐶"]
    response = client.post("/api/search", json={"queries": queries, "k": 3})
    assert response.status_code == 200
    body = response.json()
    assert [result["query"] for result in body] == queries
    for query, result in zip(queries, body):
        single = client.get("/api/search", params={"q": query, "k": 3}).json()
        assert result["normalized_query"] == single["normalized_query"]
        assert [hit["id"] for hit in result["hits"]] == [hit["id"] for hit in single["hits"]]
        # Batch composition changes float rounding in the text tower, not the ranking.
        assert [hit["score"] for hit in result["hits"]] == pytest.approx([hit["score"] for hit in single["hits"]], abs=1e-5)


@pytest.mark.parametrize(
    "payload",
    [
        {"queries": [], "k": 3},
        {"queries": ["a"] * 65, "k": 3},
        {"queries": ["a" * 513], "k": 3},
        {"queries": ["a"], "k": 0},
        {"queries": ["a"], "k": 101},
        {"queries": "a red circle"},
        {"queries": [1, 2]},
        {"k": 3},
    ],
)
def test_post_batch_limits_are_422(client, payload):
    _assert_json_error(client.post("/api/search", json=payload), 422)


def test_post_batch_with_an_empty_query_is_a_400(client):
    assert "empty" in _assert_json_error(client.post("/api/search", json={"queries": ["a red circle", " "]}), 400)


def test_post_batch_that_is_not_json_is_a_422(client):
    response = client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"})
    _assert_json_error(response, 422)


# -- images and thumbnails ----------------------------------------------------------------------------


def test_image_is_the_indexed_file_with_type_etag_and_cache_headers(client, searcher):
    item = searcher.index.items[0]
    response = client.get(f"/api/images/{item.id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == Path(item.path).read_bytes()
    assert response.headers["etag"] == f'"{hashlib.sha256(response.content).hexdigest()}"'
    assert response.headers["cache-control"] == "no-cache"  # the file may change: revalidate by ETag


@pytest.mark.parametrize("route", ["images", "thumbnails"])
def test_matching_if_none_match_is_a_304_without_body(client, searcher, route):
    item_id = searcher.index.items[1].id
    etag = client.get(f"/api/{route}/{item_id}").headers["etag"]
    response = client.get(f"/api/{route}/{item_id}", headers={"If-None-Match": etag})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == etag
    stale = client.get(f"/api/{route}/{item_id}", headers={"If-None-Match": '"something-else"'})
    assert stale.status_code == 200 and stale.content


def test_thumbnail_is_a_jpeg_within_the_configured_size(client, searcher):
    response = client.get(f"/api/thumbnails/{searcher.index.items[2].id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG"
    assert max(image.size) <= ServeConfig().thumbnail_size
    assert response.headers["etag"] != client.get(f"/api/images/{searcher.index.items[2].id}").headers["etag"]


@pytest.mark.parametrize("route", ["images", "thumbnails"])
@pytest.mark.parametrize("item_id", ["999999", "-1", "abc", "1e3", "99999999999999999999999", "0x1", " 1"])
def test_unknown_ids_are_a_404(client, route, item_id):
    _assert_json_error(client.get(f"/api/{route}/{quote(item_id, safe='')}"), 404)


@pytest.mark.parametrize("route", ["images", "thumbnails"])
def test_missing_image_file_is_a_404_not_a_500(client, searcher, route):
    item = searcher.index.items[3]
    moved = Path(item.path + ".moved")
    Path(item.path).rename(moved)
    try:
        assert "missing" in _assert_json_error(client.get(f"/api/{route}/{item.id}"), 404)
    finally:
        moved.rename(item.path)


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("outside") / "secret.txt"
    path.write_text("TOP-SECRET-CONTENT-0451")
    return path


def _traversal_attempts(secret: Path, indexed: Path) -> list[str]:
    return [
        "..%2F..%2Fetc%2Fpasswd",
        "..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "%252e%252e%252fetc%252fpasswd",
        "%2Fetc%2Fpasswd",
        "/etc/passwd",
        "..\\..\\etc\\passwd",
        "..%5C..%5Cetc%5Cpasswd",
        "0%00",
        "%00",
        "0%00..%2F..%2Fetc%2Fpasswd",
        quote(str(secret), safe=""),
        quote(str(indexed), safe=""),
        "0%2F..%2F..%2F" + quote(secret.name),
        "file:%2F%2F%2Fetc%2Fpasswd",
    ]


@pytest.mark.parametrize("route", ["images", "thumbnails"])
def test_path_traversal_attempts_never_leave_the_index(client, searcher, secret_file, route):
    for attempt in _traversal_attempts(secret_file, Path(searcher.index.items[0].path)):
        response = client.get(f"/api/{route}/{attempt}")
        assert response.status_code in (404, 422), (attempt, response.status_code)
        assert response.headers["content-type"] == "application/json", attempt
        assert b"TOP-SECRET" not in response.content
        assert b"root:" not in response.content
        assert b"PNG" not in response.content


def test_static_route_does_not_serve_files_outside_its_folder(client):
    for attempt in ["/static/..%2Fapp.py", "/static/%2e%2e/app.py", "/static/..%2F..%2Fconfig.py", "/static/%2Fetc%2Fpasswd"]:
        response = client.get(attempt)
        assert response.status_code == 404, attempt
        assert b"create_app" not in response.content and b"root:" not in response.content


# -- info, health, page, errors -----------------------------------------------------------------------


def test_info_describes_the_index_and_the_limits(client, searcher):
    body = client.get("/api/info").json()
    assert body["index"]["count"] == len(searcher.index) == 36
    assert body["index"]["dim"] == 16
    assert body["limits"] == {
        "default_k": 10, "max_k": 100, "max_query_chars": 512, "max_upload_bytes": 20 << 20, "max_image_pixels": 64_000_000,
    }


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_page_and_its_assets_are_served_and_load_nothing_from_the_network(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="query"' in page.text and 'for="query"' in page.text and 'for="k"' in page.text
    for asset, content_type in [("/static/app.js", "javascript"), ("/static/style.css", "text/css")]:
        response = client.get(asset)
        assert response.status_code == 200 and content_type in response.headers["content-type"]
        assert "http://" not in response.text and "https://" not in response.text
    assert "http://" not in page.text and "https://" not in page.text


def test_unknown_route_and_method_are_json(client):
    _assert_json_error(client.get("/api/nothing-here"), 404)
    _assert_json_error(client.delete("/api/search"), 405)


def test_unexpected_errors_are_a_json_500_without_internals(searcher):
    class BrokenSearcher(Searcher):
        """A searcher whose text tower fails: stands in for a bug the API cannot foresee."""

        def encode_queries(self, texts):
            raise RuntimeError("secret internal state /srv/models")

    broken = BrokenSearcher(searcher.index, searcher.model)
    with TestClient(create_app(broken, ServeConfig()), raise_server_exceptions=False) as failing:
        for response in (
            failing.get("/api/search", params={"q": "a red circle"}),
            failing.post("/api/search", json={"queries": ["a red circle"]}),
        ):
            assert response.status_code == 500
            assert response.json() == {"detail": "internal server error"}
            assert "secret" not in response.text and "Traceback" not in response.text
