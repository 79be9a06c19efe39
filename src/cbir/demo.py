"""A demo collection made on the spot from images that scikit-image and scikit-learn ship.

Each source picture becomes a class of views of it (crops, flips, small rotations, changes of
light and of JPEG quality), one folder per class, plus one held-out view per class to query with.
Nothing is downloaded, and a search has known right answers: the other views of the same source.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

#: (class name, loader) pairs; every file is bundled with the installed packages.
_SOURCES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "brick",
    "grass",
    "gravel",
    "coins",
)


def _source_images() -> dict[str, np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    out = {name: getattr(data, name)() for name in _SOURCES}
    samples = load_sample_images()
    for fname, img in zip(samples.filenames, samples.images, strict=True):
        out[Path(fname).stem] = img
    return out


def _view(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A plausible different photo of the same thing."""
    w, h = img.size
    scale = rng.uniform(0.6, 0.9)
    cw, ch = int(w * scale), int(h * scale)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    view = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = view.rotate(
        float(rng.uniform(-10, 10)), resample=Image.Resampling.BILINEAR, expand=False
    )
    view = ImageEnhance.Brightness(view).enhance(float(rng.uniform(0.8, 1.2)))
    view = ImageEnhance.Contrast(view).enhance(float(rng.uniform(0.8, 1.2)))
    side = int(rng.integers(160, 320))
    view.thumbnail((side, side), Image.Resampling.LANCZOS)
    return view


def make_demo_images(folder: str | Path, *, views: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """Write ``views`` views of each source image into ``folder/collection/<class>/`` and one
    held-out view per class into ``folder/queries/``; returns the two folders."""
    root = Path(folder)
    collection, queries = root / "collection", root / "queries"
    rng = np.random.default_rng(seed)
    for name, array in sorted(_source_images().items()):
        img = Image.fromarray(array).convert("RGB")
        (collection / name).mkdir(parents=True, exist_ok=True)
        queries.mkdir(parents=True, exist_ok=True)
        for v in range(views + 1):
            view = _view(img, rng)
            buf = io.BytesIO()
            view.save(buf, format="JPEG", quality=int(rng.integers(70, 95)))
            target = queries / f"{name}.jpg" if v == views else collection / name / f"{v:02d}.jpg"
            target.write_bytes(buf.getvalue())
    return collection, queries
