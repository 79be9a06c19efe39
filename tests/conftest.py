"""Synthetic image sets whose right answers are known, made fresh for each test."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.config import Settings

#: class name -> dominant RGB colour; each class's images are noisy shapes in that colour.
COLOURS = {
    "red": (200, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 50, 200),
    "yellow": (220, 210, 40),
}


def colour_image(
    rgb: tuple[int, int, int], rng: np.random.Generator, size: int = 96
) -> Image.Image:
    """A background of ``rgb`` with noise and a random darker rectangle: same class, new look."""
    h = w = size
    base = np.empty((h, w, 3), dtype=np.float64)
    base[:] = rgb
    base += rng.normal(0, 18, size=base.shape)
    y0, x0 = rng.integers(0, h // 2, size=2)
    y1, x1 = y0 + rng.integers(h // 6, h // 2), x0 + rng.integers(w // 6, w // 2)
    base[y0:y1, x0:x1] *= rng.uniform(0.4, 0.8)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def write_colour_set(
    root: Path, per_class: int = 5, seed: int = 0, size: int = 96
) -> dict[str, list[Path]]:
    """``root/<colour>/<n>.png|jpg`` for every colour; returns the paths per class."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[Path]] = {}
    for name, rgb in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        out[name] = []
        for i in range(per_class):
            path = folder / (f"{i:02d}.jpg" if i % 2 else f"{i:02d}.png")
            colour_image(rgb, rng, size).save(path, quality=92)
            out[name].append(path)
    return out


@pytest.fixture
def colour_set(tmp_path: Path) -> tuple[Path, dict[str, list[Path]]]:
    root = tmp_path / "images"
    return root, write_colour_set(root)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """In-process extraction (fast for small sets) into a collection under tmp_path."""
    return Settings(collection=tmp_path / "col", workers=1)


@pytest.fixture
def sigint_default():
    """Ctrl-C handled as Python does by default, whatever the runner set: a shell starts
    background jobs with SIGINT ignored, which a test of Ctrl-C must not inherit."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def sigint_default_in_child() -> None:
    """``preexec_fn`` for a child process whose Ctrl-C a test sends (see ``sigint_default``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
