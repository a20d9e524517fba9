"""The real server (`run_server` in its own process) driven by Debian's chromium through Playwright."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.tiny import build_tiny_index

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
STARTUP_SECONDS = 180
CHROMIUM_INSTALL_SECONDS = 600


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(predicate, seconds: float, what: str, process=None) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the server exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {seconds} s")
        time.sleep(0.25)


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`run_server` on a free loopback port, in a subprocess like `dual-encoder serve`."""
    index_dir = build_tiny_index(tmp_path_factory.mktemp("browser"))
    port = _free_port()
    code = textwrap.dedent(
        f"""
        from dual_encoder.serve import run_server
        run_server({str(index_dir)!r}, host="127.0.0.1", port={port})
        """
    )
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with open(log, "wb") as stream:
        process = subprocess.Popen([sys.executable, "-c", code], stdout=stream, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _healthy(base_url), STARTUP_SECONDS, "server start-up", process)
        yield base_url
    except (RuntimeError, TimeoutError) as error:
        raise RuntimeError(f"{error}\n{log.read_text(errors='replace')[-3000:]}") from None
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    # apt may still be installing chromium on a fresh machine: wait for it rather than fail.
    _wait_for(lambda: CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK), CHROMIUM_INSTALL_SECONDS, "chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(server)
    yield page
    context.close()


def _search(page, query: str) -> None:
    page.get_by_label("Query").fill(query)
    page.get_by_label("Query").press("Enter")


def _state(page) -> str:
    return page.locator("#status").get_attribute("data-state")


def test_search_shows_loaded_thumbnails_with_scores_and_captions(page):
    assert _state(page) == "empty"
    assert "Type a query" in page.locator("#status").inner_text()
    assert "36 images" in page.locator("#index-info").inner_text()
    # The page's k is the server's default (serve.default_k), the one the CLI and the API use.
    page.wait_for_function("document.querySelector('#k').value === '10'")

    page.get_by_label("Number of results").fill("8")
    _search(page, "find images of a red circle")
    page.wait_for_function("document.querySelector('#status').dataset.state === 'results'")
    images = page.locator("#results img")
    assert images.count() == 8
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')].every(img => img.complete && img.naturalWidth > 0)"
    )
    assert images.first.evaluate("img => img.naturalWidth") > 0
    assert page.locator("#query-echo q").inner_text() == "a red circle"  # the normalised query
    alt = images.first.get_attribute("alt")
    assert alt and alt == page.locator("#results .caption").first.inner_text()
    assert float(page.locator("#results .score").first.inner_text()) >= float(
        page.locator("#results .score").last.inner_text()
    )
    assert "q=find+images+of+a+red+circle" in page.url  # the search is bookmarkable

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search-page.png"), full_page=True)


def test_over_long_query_shows_the_apis_error(page):
    _search(page, "a" * 600)
    page.wait_for_function("document.querySelector('#status').dataset.state === 'error'")
    status = page.locator("#status")
    assert status.get_attribute("role") == "alert"
    assert "at most 512 characters" in status.inner_text()
    assert page.locator("#results img").count() == 0


def test_request_phrase_alone_shows_the_apis_message_then_clearing_returns_to_empty(page):
    _search(page, "show me pictures of")
    page.wait_for_function("document.querySelector('#status').dataset.state === 'error'")
    assert "nothing to search for" in page.locator("#status").inner_text()
    _search(page, "   ")
    page.wait_for_function("document.querySelector('#status').dataset.state === 'empty'")


def test_query_in_the_url_searches_on_load(page, server):
    page.goto(f"{server}/?q=a%20blue%20star&k=3")
    page.wait_for_function("document.querySelector('#status').dataset.state === 'results'")
    assert page.locator("#results img").count() == 3
    assert page.get_by_label("Query").input_value() == "a blue star"


def _raw_get(base_url: str, target: str) -> bytes:
    """Send a request line exactly as written: HTTP clients would normalise the `..` segments away."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "target",
    [
        "/api/images/../../../../../../etc/passwd",
        "/api/images/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/thumbnails/%2Fetc%2Fpasswd",
        "/api/images/0%00",
        "/static/../../../../../../etc/passwd",
        "/static/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/static/../app.py",
        "/static/..%2Fapp.py",
    ],
)
def test_real_server_rejects_unnormalised_traversal(server, target):
    response = _raw_get(server, target)
    status = int(response.split(b" ", 2)[1])
    assert status in (400, 404, 422), response[:200]
    assert b"root:" not in response and b"create_app" not in response
