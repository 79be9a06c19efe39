"""The web page in a real browser: Debian's headless chromium driven by Playwright, against a
real server on a loopback port. Each test does what a person does on the page and checks what
they would see; screenshots are kept under tmp/artefacts (CBIR_ARTEFACTS to move them)."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir import Collection
from cbir.config import ServerSettings, Settings
from tests.browser import CHROMIUM, chromium, free_port
from tests.conftest import COLOURS, write_colour_set

ARTEFACTS = Path(os.environ.get("CBIR_ARTEFACTS", Path(__file__).parents[1] / "tmp" / "artefacts"))
#: How long the page may take to show what a test waits for (a loaded 2-core machine).
WAIT_MS = 20_000
K = 6

if not os.path.exists(CHROMIUM):
    if os.environ.get("CBIR_E2E") == "required":  # make test installs it: its absence is a bug
        raise RuntimeError(f"{CHROMIUM} is missing; install it with: apt-get install chromium")
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``cbir serve`` on a loopback port, over a colour collection with a hash descriptor."""
    import uvicorn

    from cbir.server import create_app

    root = tmp_path_factory.mktemp("page")
    write_colour_set(root / "images", per_class=8)
    settings = Settings(
        collection=root / "col",
        workers=1,
        default_descriptors=("color-hist", "phash"),
        server=ServerSettings(port=free_port()),
    )
    with Collection(settings.collection, settings=settings) as col:
        col.add(root / "images", labels="folder")
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=settings.server.port, log_level="warning"
    )
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{settings.server.port}"
    web.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium(viewport={"width": 1280, "height": 900}) as context:
        yield context


@pytest.fixture
def page(browser, server, request):
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server + "/")
    page.wait_for_function("() => document.querySelectorAll('#descriptor option').length > 0")
    yield page
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / f"{request.node.name}.png"), full_page=True)
    page.close()
    assert not errors, f"the page's script failed: {errors}"


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def _solid(colour: str) -> bytes:
    a = np.empty((64, 64, 3), np.uint8)
    a[:] = COLOURS[colour]
    return _png(a)


def _two_colour(left: str, right: str) -> bytes:
    a = np.empty((64, 128, 3), np.uint8)
    a[:, :64] = COLOURS[left]
    a[:, 64:] = COLOURS[right]
    return _png(a)


def _upload(page, data: bytes, name: str = "query.png", k: int = K) -> None:
    page.fill("#k", str(k))
    page.set_input_files("#files", files=[{"name": name, "mimeType": "image/png", "buffer": data}])


def _labels(page) -> list[str]:
    return page.locator("#results .card .label").all_inner_texts()


def _answers(page) -> int:
    return int(page.evaluate("Number(document.body.dataset.answers || 0)"))


def _wait_results(page, before: int = 0) -> None:
    """Until the page has shown more answers than ``before``, and no search runs."""
    page.wait_for_function(
        "n => Number(document.body.dataset.answers || 0) > n"
        " && document.querySelector('#progress').hidden",
        arg=before,
    )


def test_upload_shows_results_then_click_one_to_search_by_it(page):
    _upload(page, _solid("blue"))
    _wait_results(page)
    assert _labels(page) == ["blue"] * K
    assert "results in" in page.inner_text("#result-title")
    first = page.locator("#results .card").first
    assert first.locator(".rank").inner_text() == "#1"
    assert page.locator("#results .card img").first.evaluate("i => i.naturalWidth") > 0
    # click the third result: it becomes the query
    third = page.locator("#results .card").nth(2)
    name = third.locator(".name").inner_text()
    before = _answers(page)
    third.locator(".thumb").click()
    _wait_results(page, before)
    assert page.inner_text("#query-text").startswith(name)
    assert page.locator("#results .card .name").first.inner_text() == name  # itself, first
    assert _labels(page) == ["blue"] * K


def test_mark_relevant_and_refine(page):
    _upload(page, _two_colour("red", "blue"), k=16)
    _wait_results(page)
    labels = _labels(page)
    first = labels[0]
    (other,) = {"red", "blue"} - {first}
    assert other in labels, "the other colour is further down"
    cards = page.locator("#results .card")
    for i, label in enumerate(labels):
        if label == other:
            cards.nth(i).locator(".like").click()
    cards.nth(0).locator(".unlike").click()
    assert cards.nth(0).locator(".unlike").get_attribute("aria-pressed") == "true"
    page.fill("#k", str(K))
    before = _answers(page)
    page.click("#refine")
    _wait_results(page, before)
    assert "refined by" in page.inner_text("#result-title")
    assert _labels(page) == [other] * K


def test_draw_a_box_to_search_by_a_region(page):
    _upload(page, _two_colour("green", "yellow"))
    _wait_results(page)
    canvas = page.locator("#query-canvas")
    box = canvas.bounding_box()
    assert box is not None
    before = _answers(page)
    # a box over the right (yellow) half
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.1)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.95, box["y"] + box["height"] * 0.9, steps=5)
    page.mouse.up()
    _wait_results(page, before)
    assert "boxed part" in page.inner_text("#query-text")
    assert _labels(page) == ["yellow"] * K
    # and with the keyboard: Escape clears the box, arrows make one and move it left
    canvas.focus()
    page.keyboard.press("Escape")
    for _ in range(5):
        page.keyboard.press("ArrowLeft")
    before = _answers(page)
    page.keyboard.press("Enter")
    _wait_results(page, before)
    assert _labels(page) == ["green"] * K


def test_why_view_shows_shared_colours(page):
    _upload(page, _solid("red"))
    _wait_results(page)
    page.locator("#results .card .explain").first.click()
    dialog = page.locator("#why")
    dialog.wait_for(state="visible")
    assert "hellinger distance" in dialog.inner_text()
    chips = page.locator("#why .swatch .chip")
    assert chips.count() >= 1
    colour = chips.first.evaluate("e => getComputedStyle(e).backgroundColor")
    r, g, b = (int(v) for v in colour[colour.index("(") + 1 : -1].split(",")[:3])
    assert r > g and r > b  # a red swatch for red images
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "why-view-open.png"))
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")


def test_browse_pages_and_copies(page):
    page.click("#tab-browse")
    page.wait_for_function("() => document.querySelectorAll('#browse .card').length > 0")
    assert page.inner_text("#page-text").startswith("1–32 of 32")
    assert page.locator("#next").is_disabled() and page.locator("#prev").is_disabled()
    page.select_option("#browse-label", "green")
    page.wait_for_function(
        "() => document.querySelector('#page-text').textContent.endsWith('of 8')"
    )
    assert set(page.locator("#browse .card .label").all_inner_texts()) == {"green"}
    # copies by the hash descriptor: the image itself is never its own copy
    page.locator("#browse .card .dups").first.click()
    _wait_results(page)
    assert "phash" in page.inner_text("#result-title")


def test_paste_and_drop_an_image(page):
    page.fill("#k", str(K))
    data = list(_solid("yellow"))
    page.evaluate(
        """bytes => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], 'pasted.png', {type: 'image/png'}));
            document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt}));
        }""",
        data,
    )
    _wait_results(page)
    assert set(_labels(page)) == {"yellow"}
    before = _answers(page)
    page.evaluate(
        """bytes => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'}));
            document.querySelector('#drop').dispatchEvent(
                new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        list(_solid("green")),
    )
    _wait_results(page, before)
    assert set(_labels(page)) == {"green"}
    assert page.inner_text("#query-text").startswith("dropped.png")


def test_errors_are_shown_clearly(page):
    page.set_input_files(
        "#files", files=[{"name": "photo.png", "mimeType": "image/png", "buffer": b"not a png"}]
    )
    page.locator("#error").wait_for(state="visible")
    assert "not an image" in page.inner_text("#error-text")
    page.click("#error-close")
    assert page.locator("#error").is_hidden()
    page.fill("#k", "0")
    page.click("#search-button")
    page.locator("#error").wait_for(state="visible")
    assert "1 or more" in page.inner_text("#error-text")


def test_keyboard_only(page):
    _upload(page, _solid("blue"))
    _wait_results(page)
    like = page.locator("#results .card .like").first
    like.focus()
    page.keyboard.press("Enter")
    assert like.get_attribute("aria-pressed") == "true"
    assert page.locator("#refine").is_enabled()
    page.keyboard.press("Space")
    assert like.get_attribute("aria-pressed") == "false"
    # Enter on the drop zone opens the file picker (seen as a click on the file input; the
    # picker itself is the browser's)
    page.evaluate(
        "() => document.querySelector('#files').addEventListener('click',"
        " e => { e.preventDefault(); document.body.dataset.picker = 'opened'; })"
    )
    page.locator("#drop").focus()
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.body.dataset.picker === 'opened'")
    assert page.locator("#files").get_attribute("multiple") is not None
