"""The real server (`run_server` in its own process) driven by Debian's chromium through Playwright."""

import os
import re
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
def index_dir(tmp_path_factory):
    return build_tiny_index(tmp_path_factory.mktemp("browser"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, index_dir):
    """`run_server` on a free loopback port, in a subprocess like `dual-encoder serve`."""
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
    assert page.locator("link[rel=icon]").get_attribute("href") == "/static/favicon.svg"
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
    assert re.fullmatch(r"8 results in \d+\.\d\d s", page.locator("#status").inner_text())  # count and time

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


# -- photos: search by image, more like this, the viewer, Back --------------------------------------------------


def _wait_for_results(page) -> None:
    page.wait_for_function("document.querySelector('#status').dataset.state === 'results'")


def _result_ids(page) -> list[int]:
    return [int(i) for i in page.locator("#results figure").evaluate_all("cards => cards.map(c => c.dataset.id)")]


def _wait_for_first(page, item_id: int) -> None:
    page.wait_for_function(
        f"document.querySelector('#status').dataset.state === 'results' && "
        f"document.querySelector('#results figure')?.dataset.id === '{item_id}'"
    )


def test_picking_a_photo_searches_with_it_and_finds_that_image_first(page, index_dir):
    from dual_encoder.index import ImageIndex

    item = ImageIndex.load(index_dir).items[7]
    page.get_by_label("Search by image").set_input_files(item.path)
    _wait_for_first(page, item.id)
    assert page.locator("#attachment").is_visible()
    assert page.locator("#attachment-name").inner_text() == Path(item.path).name
    assert f"image {Path(item.path).name}" in page.locator("#query-echo").inner_text()
    assert float(page.locator("#results .score").first.inner_text()) == pytest.approx(1.0, abs=1e-3)
    assert re.fullmatch(r"10 results in \d+\.\d\d s", page.locator("#status").inner_text())
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search-by-image.png"), full_page=True)

    # Text typed beside the attached photo is mixed in; removing the photo makes it a text search again.
    page.get_by_label("Query").fill("a blue star")
    page.get_by_label("Query").press("Enter")
    page.wait_for_function("document.querySelector('#query-echo q')?.textContent === 'a blue star'")
    assert "image" in page.locator("#query-echo").inner_text()
    page.get_by_role("button", name="Remove the image").click()
    page.get_by_label("Query").press("Enter")
    page.wait_for_function("!document.querySelector('#query-echo').textContent.includes('image')")


def test_pasted_and_dropped_photos_search_too(page, index_dir):
    from dual_encoder.index import ImageIndex

    items = ImageIndex.load(index_dir).items
    for event, item in (("paste", items[3]), ("drop", items[4])):
        data = list(Path(item.path).read_bytes())
        page.evaluate(
            """([event, data, name]) => {
                const transfer = new DataTransfer();
                transfer.items.add(new File([new Uint8Array(data)], name, {type: "image/png"}));
                const init = {bubbles: true, cancelable: true};
                const fired = event === "paste"
                    ? new ClipboardEvent("paste", {...init, clipboardData: transfer})
                    : new DragEvent("drop", {...init, dataTransfer: transfer});
                document.body.dispatchEvent(fired);
            }""",
            [event, data, f"{event}.png"],
        )
        _wait_for_first(page, item.id)
        assert page.locator("#attachment-name").inner_text() == f"{event}.png"


def test_a_file_that_is_not_an_image_shows_the_servers_message(page, tmp_path):
    (tmp_path / "notes.png").write_bytes(b"not an image at all")
    page.get_by_label("Search by image").set_input_files(str(tmp_path / "notes.png"))
    page.wait_for_function("document.querySelector('#status').dataset.state === 'error'")
    assert "not an image" in page.locator("#status").inner_text()


def test_more_like_this_ranks_the_item_itself_first_and_back_restores_the_previous_results(page):
    _search(page, "a red circle")
    _wait_for_results(page)
    text_ids = _result_ids(page)
    chosen = text_ids[4]

    page.locator("#results figure").nth(4).get_by_role("button", name="More like this").click()
    _wait_for_first(page, chosen)
    like_ids = _result_ids(page)
    assert like_ids != text_ids and f"like={chosen}" in page.url
    assert f"more like #{chosen}" in page.locator("#query-echo").inner_text()
    assert page.get_by_label("Query").input_value() == ""

    page.go_back()  # the previous search, as it was: its results, its query, its address
    page.wait_for_function(f"document.querySelector('#results figure')?.dataset.id === '{text_ids[0]}'")
    assert _result_ids(page) == text_ids
    assert page.get_by_label("Query").input_value() == "a red circle"
    assert "q=a+red+circle" in page.url and "like=" not in page.url
    page.go_back()  # the page as it was opened: no search
    page.wait_for_function("document.querySelector('#status').dataset.state === 'empty'")
    assert page.locator("#results figure").count() == 0
    page.go_forward()
    page.go_forward()
    _wait_for_first(page, chosen)
    assert _result_ids(page) == like_ids


def test_the_viewer_shows_the_full_image_steps_with_arrow_keys_and_closes_with_escape(page):
    _search(page, "a green triangle")
    _wait_for_results(page)
    ids = _result_ids(page)
    page.locator("#results img").nth(1).click()
    viewer = page.locator("#viewer")
    page.wait_for_function("document.querySelector('#viewer').open")
    image = page.locator("#viewer-image")
    assert image.get_attribute("src") == f"/api/images/{ids[1]}"
    page.wait_for_function("document.querySelector('#viewer-image').complete && document.querySelector('#viewer-image').naturalWidth > 0")
    assert "#2 of 10" in page.locator("#viewer-meta").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer.png"))
    page.keyboard.press("ArrowRight")
    assert image.get_attribute("src") == f"/api/images/{ids[2]}"
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert image.get_attribute("src") == f"/api/images/{ids[0]}"
    page.keyboard.press("ArrowLeft")  # wraps around
    assert image.get_attribute("src") == f"/api/images/{ids[-1]}"
    page.keyboard.press("Escape")
    page.wait_for_function("!document.querySelector('#viewer').open")
    assert not viewer.is_visible()

    page.locator("#results img").nth(3).click()  # more like this from the viewer
    page.get_by_role("button", name="More like this").and_(page.locator("#viewer-more")).click()
    _wait_for_first(page, ids[3])
    assert not viewer.is_visible()
