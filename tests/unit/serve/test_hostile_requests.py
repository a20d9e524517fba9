"""Hostile requests and files behind the server (issue 12, cases 4, 6 and 10): a FIFO or /dev/zero in place of an
indexed image, a decompression bomb, a huge or endless body, a changed file, HEAD, slow disks.

Every test is bounded in time (pytest-timeout), so a route that hangs fails the test instead of CI.
"""

import contextlib
import hashlib
import io
import os
import stat
import threading
import time
from pathlib import Path

import anyio
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dual_encoder.config import ServeConfig
from dual_encoder.serve import app as app_module
from dual_encoder.serve import create_app
from dual_encoder.serve.limits import BodyLimitMiddleware

ROUTES = ("images", "thumbnails")


def _json_error(response, status: int, index_root: Path) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert detail and "\n" not in detail and "Traceback" not in response.text
    assert str(index_root) not in response.text and "/tmp" not in response.text  # no server paths
    return detail


@contextlib.contextmanager
def replaced(path: Path, make):
    """Swap `path` for whatever `make(path)` creates; the original comes back afterwards (and a FIFO's writer
    end is opened, so a reader stuck on it returns)."""
    saved = path.with_name(path.name + ".saved")
    os.rename(path, saved)
    try:
        make(path)
        yield path
    finally:
        if os.path.lexists(path) and stat.S_ISFIFO(os.lstat(path).st_mode):
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            os.remove(path)
        os.rename(saved, path)


@pytest.fixture()
def item(searcher):
    return searcher.index.items[5]


@pytest.fixture()
def root(item):
    return Path(item.path).parent


# -- case 4: a FIFO or a device in place of an indexed image ---------------------------------------------------


@pytest.mark.timeout(60)
def test_a_fifo_in_place_of_an_image_is_refused_and_never_hangs_the_server(client, item, root):
    with replaced(Path(item.path), os.mkfifo):
        for _ in range(60):  # more than the server has threads: none may be left blocked
            for route in ROUTES:
                detail = _json_error(client.get(f"/api/{route}/{item.id}"), 404, root)
                assert "not a regular file (a named pipe)" in detail
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/api/search", params={"q": "a red circle", "k": 2}).status_code == 200


@pytest.mark.timeout(60)
def test_a_dev_zero_symlink_in_place_of_an_image_is_refused_at_once(client, item, root):
    started = time.monotonic()
    with replaced(Path(item.path), lambda path: path.symlink_to("/dev/zero")):
        for route in ROUTES:
            assert "character device" in _json_error(client.get(f"/api/{route}/{item.id}"), 404, root)
            assert client.head(f"/api/{route}/{item.id}").status_code == 404
    assert time.monotonic() - started < 10


@pytest.mark.timeout(60)
def test_a_slow_file_read_times_out_without_blocking_other_routes(searcher, monkeypatch):
    release = threading.Event()

    def stuck(path, max_pixels):
        release.wait(30)  # a disk that never answers
        raise AssertionError("should have been abandoned")

    monkeypatch.setattr(app_module, "FILE_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(app_module, "read_image_file", stuck)
    try:
        with TestClient(create_app(searcher, ServeConfig())) as client:
            started = time.monotonic()
            response = client.get(f"/api/images/{searcher.index.items[0].id}")
            assert response.status_code == 504 and "timed out" in response.json()["detail"]
            assert time.monotonic() - started < 5
            assert client.get("/healthz").status_code == 200
    finally:
        release.set()


# -- case 6: a decompression bomb in place of an image ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_400_megapixel_png_is_not_served_or_thumbnailed(client, item, root):
    def bomb(path):
        Image.new("1", (20_000, 20_000)).save(path, format="PNG", optimize=True)

    with replaced(Path(item.path), bomb):
        for route in ROUTES:
            assert "too large" in _json_error(client.get(f"/api/{route}/{item.id}"), 404, root)


# -- case 6: request bodies over the limit ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_body_client(searcher):
    with TestClient(create_app(searcher, ServeConfig(max_request_bytes=1000))) as client:
        yield client


@pytest.mark.timeout(60)
def test_a_body_over_the_limit_is_a_413_before_it_is_parsed(small_body_client):
    queries = {"queries": ["a red circle " * 20] * 8}  # ~2 KB of valid JSON
    response = small_body_client.post("/api/search", json=queries)
    assert response.status_code == 413
    assert response.json() == {"detail": "request body too large: the limit is 1000 bytes"}
    assert small_body_client.post("/api/search", json={"queries": ["a red circle"]}).status_code == 200


@pytest.mark.timeout(60)
def test_a_chunked_body_is_cut_off_at_the_limit(small_body_client):
    def endless():
        for _ in range(10_000):  # 10 MB without a Content-Length: sent chunked
            yield b" " * 1000

    response = small_body_client.post("/api/search", content=endless(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "too large" in response.json()["detail"]


@pytest.mark.timeout(60)
def test_a_declared_200_mb_body_is_refused_without_reading_it():
    """The middleware answers from Content-Length alone: the body is never received."""
    received = []

    async def app(scope, receive, send):
        raise AssertionError("the app must not run")

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    messages = []

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "method": "POST", "path": "/api/search", "headers": [(b"content-length", b"200000000")]}
    anyio.run(BodyLimitMiddleware(app, max_bytes=1 << 20), scope, receive, send)
    assert messages[0]["status"] == 413 and not received
    assert b"too large" in messages[1]["body"]


def test_the_default_body_limit_fits_the_largest_valid_batch():
    largest = ServeConfig().max_query_chars * 4 * app_module.MAX_BATCH_QUERIES  # 4 bytes per UTF-8 character
    assert largest < ServeConfig().max_request_bytes <= 1 << 20


# -- case 10: ETags, HEAD, messages ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_file_changed_after_indexing_gets_a_new_etag(client, item):
    old = client.get(f"/api/images/{item.id}")
    old_thumb = client.get(f"/api/thumbnails/{item.id}")
    assert old.headers["etag"] == f'"{hashlib.sha256(old.content).hexdigest()}"' == f'"{item.sha256}"'

    def other_picture(path):
        Image.new("RGB", (40, 40), "purple").save(path, format="PNG")

    with replaced(Path(item.path), other_picture):
        new = client.get(f"/api/images/{item.id}", headers={"If-None-Match": old.headers["etag"]})
        assert new.status_code == 200 and new.content == Path(item.path).read_bytes()
        assert new.headers["etag"] == f'"{hashlib.sha256(new.content).hexdigest()}"' != old.headers["etag"]
        assert new.headers["cache-control"] == "no-cache"
        thumb = client.get(f"/api/thumbnails/{item.id}", headers={"If-None-Match": old_thumb.headers["etag"]})
        assert thumb.status_code == 200 and thumb.content != old_thumb.content
        assert Image.open(io.BytesIO(thumb.content)).convert("RGB").getpixel((5, 5))[1] < 40  # purple, not cached
    assert client.get(f"/api/images/{item.id}", headers={"If-None-Match": old.headers["etag"]}).status_code == 304


@pytest.mark.timeout(60)
@pytest.mark.parametrize("route", ROUTES)
def test_head_gives_the_headers_of_get_without_a_body(client, item, route):
    get = client.get(f"/api/{route}/{item.id}")
    head = client.head(f"/api/{route}/{item.id}")
    assert head.status_code == 200 and head.content == b""
    for header in ("etag", "content-type", "cache-control", "content-length"):
        assert head.headers[header] == get.headers[header], header
    assert int(head.headers["content-length"]) == len(get.content)
    assert client.head(f"/api/{route}/{item.id}", headers={"If-None-Match": get.headers["etag"]}).status_code == 304
    assert client.head(f"/api/{route}/999999").status_code == 404


@pytest.mark.timeout(60)
def test_error_messages_never_show_server_paths(client, item, root):
    def unreadable(path):
        path.write_bytes(b"this is not an image")

    with replaced(Path(item.path), unreadable):
        for route in ROUTES:
            _json_error(client.get(f"/api/{route}/{item.id}"), 404, root)
    with replaced(Path(item.path), lambda path: None):  # missing
        for route in ROUTES:
            assert "missing" in _json_error(client.get(f"/api/{route}/{item.id}"), 404, root)
    with replaced(Path(item.path), lambda path: path.mkdir()):  # a directory
        for route in ROUTES:
            assert "a directory" in _json_error(client.get(f"/api/{route}/{item.id}"), 404, root)
