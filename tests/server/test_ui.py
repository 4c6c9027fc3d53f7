"""The web page at /ui in a real headless browser (Debian's chromium, driven by Playwright):
a streamed chat reply, then the inspector for one of its tokens.

Screenshots go to tests/artifacts/ (not in git) to be looked at. `make test` installs the
browser (`make browser`); without it these tests skip, and fail in CI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from server import ModelPool, create_app
from tests.helpers import unavailable

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = os.environ.get("NUMBALM_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed: pip install -e '.[dev]'")
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        unavailable(f"no chromium at {CHROMIUM}: run `make browser`")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(smollm2_fast):
    from server.http.wsgi import ServerThread

    pool = ModelPool.from_models([smollm2_fast])
    with ServerThread(create_app({"api_keys": ["sekrit"]}, pool=pool)) as s:
        yield s


def test_chat_streams_and_the_inspector_draws(browser, server):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/ui")
    page.fill("#api-key", "sekrit")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    page.fill("#max-tokens", "12")
    page.fill("#input", "What is the capital of France?")
    page.click("#send")

    reply = page.locator(".msg.assistant").first
    page.wait_for_function(  # some text arrived before the reply was done: it streamed
        "(() => { const m = document.querySelector('.msg.assistant');"
        " return m && m.textContent.length > 0; })()", timeout=120_000)
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=120_000)
    page.wait_for_selector("#lens[data-drawn='1']", timeout=180_000)
    assert "Paris" in reply.inner_text()

    # the heatmap: 30 layers x the traced tokens, really painted
    cells = int(page.get_attribute("#lens", "data-cells"))
    n_tokens = page.locator("#tokens .tok").count()
    assert cells == 30 * n_tokens and n_tokens > 20
    painted = page.evaluate("""(() => { const c = document.getElementById('lens');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let dark = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 128) dark++;
        return dark; })()""")
    assert painted > 1000

    # click " Paris" in the reply: the inspector explains it
    reply.locator(".tok", has_text="Paris").first.click()
    summary = page.inner_text("#how-summary")
    assert '" Paris"' in summary and "generated" in summary and "top guess" in summary
    page.wait_for_selector("#attention[data-drawn='1']")
    assert page.get_attribute("#norms", "data-drawn") == "1"
    assert "reads most from" in page.inner_text("#att-note")

    # hovering a cell shows that layer's top tokens
    box = page.locator("#lens").bounding_box()
    page.mouse.move(box["x"] + 60, box["y"] + 8)
    tip = page.inner_text("#tooltip")
    assert tip.startswith("layer 29, position 0")
    page.screenshot(path=str(ARTIFACTS / "ui_inspector.png"), full_page=True)

    # another layer's attention is fetched on demand
    page.select_option("#att-layer", "3")
    page.wait_for_function("!document.getElementById('att-note').textContent"
                           ".startsWith('fetching')")
    page.locator("#norms").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "ui_attention.png"))
    assert errors == []
    page.close()


def test_the_page_is_served_without_a_key_and_has_no_outside_links(server):
    import urllib.request

    with urllib.request.urlopen(server.url + "/ui/") as r:
        html = r.read().decode()
    assert "<canvas id=\"lens\"" in html
    for name in ("app.js", "style.css"):
        with urllib.request.urlopen(f"{server.url}/ui/{name}") as r:
            text = r.read().decode()
        assert "http://" not in text and "https://" not in text  # works offline, no CDN
