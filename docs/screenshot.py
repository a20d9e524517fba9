"""Regenerate docs/screenshot.png: the search page over the demo's held-out index, answering a short query.

    make demo            # writes demo_output/index
    .venv/bin/python docs/screenshot.py [--index demo_output/index] [--query "a red star"]

Serves the index with `dual-encoder serve` on a free local port and photographs the page in Debian's chromium
through Playwright (what the browser tests use).
"""

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=ROOT / "demo_output" / "index")
    parser.add_argument("--query", default="a red star")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "screenshot.png")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "dual_encoder.cli", "serve", "--index", str(args.index), "--port", str(port)]
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start (exit code {server.poll()})")
            time.sleep(0.25)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(base)
            page.get_by_label("Query").fill(args.query)
            page.get_by_label("Query").press("Enter")
            page.wait_for_function("document.querySelector('#status').dataset.state === 'results'")
            page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
            page.screenshot(path=str(args.output))
            browser.close()
    finally:
        server.terminate()
        server.wait()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
