"""Debian's chromium for the page's end-to-end tests and the README's screenshot: how it is
launched (headless, fresh profile, no downloads, no network but ours) and a loopback port."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

CHROMIUM = "/usr/bin/chromium"
#: A fresh, quiet browser: no GPU, no updates, no sync, no first-run pages.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def chromium(**context_options: Any) -> Iterator[Any]:
    """A Playwright browser context on Debian's chromium, with a fresh user-data directory
    (removed afterwards); Playwright downloads no browser."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="cbir-chromium-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                **context_options,
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
