"""The README's screenshot of the page (docs/images/page.jpg), made from the demo collection.

``python benchmarks/page_screenshot.py [WORKDIR]`` runs ``cbir demo``'s steps in WORKDIR (a
temporary folder by default), serves the demo collection on a loopback port, drops the held-out
view of the coffee scene on the page in headless chromium (Debian's, driven by Playwright) and
saves the page with its results and the "why" view of the first one.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.browser import chromium, free_port  # noqa: E402

from cbir.config import ServerSettings, Settings  # noqa: E402
from cbir.demo import DEMO_QUERY, run_demo  # noqa: E402

OUT = REPO / "docs" / "images" / "page.jpg"
#: JPEG quality of the screenshot (a tenth of the PNG's size, no visible loss at this size).
JPEG_QUALITY = 80
RESULTS = 12


def main(workdir: Path) -> Path:
    import uvicorn

    from cbir.server import create_app

    port = free_port()
    settings = Settings.from_env(collection=workdir / ".cbir-demo")
    run = run_demo(workdir / "demo-images", settings.collection, settings=settings)
    settings = Settings.from_env(collection=settings.collection, server=ServerSettings(port=port))
    web = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    while not web.started:
        time.sleep(0.05)
    try:
        with chromium(viewport={"width": 1200, "height": 860}) as context:
            page = context.new_page()
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("() => document.querySelectorAll('#descriptor option').length")
            page.fill("#k", str(RESULTS))
            page.set_input_files("#files", str(run.query))
            page.wait_for_function("() => Number(document.body.dataset.answers || 0) > 0")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results img')].every(i => i.complete)"
            )
            OUT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(OUT), full_page=True, type="jpeg", quality=JPEG_QUALITY)
    finally:
        web.should_exit = True
        thread.join(timeout=30)
    print(f"{OUT}: the page with the results for the held-out {DEMO_QUERY} view")
    return OUT


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="cbir-demo-")))
