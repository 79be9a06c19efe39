"""A demo collection made on the spot from images that scikit-image and scikit-learn ship.

Each source picture becomes a class of views of it (crops, flips, small rotations, changes of
light and of JPEG quality), one folder per class, plus one held-out view per class to query with.
Nothing is downloaded, and a search has known right answers: the other views of the same source.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageEnhance

if TYPE_CHECKING:
    from cbir.config import Settings
    from cbir.ingest import IndexReport, ProgressCallback
    from cbir.search.result import SearchResult

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


#: The held-out query of the demo and the scene it shows.
DEMO_QUERY = "coffee"


@dataclass(frozen=True)
class DemoRun:
    """What ``cbir demo`` did: where the images are, what indexing reported, the answer."""

    images: Path
    query: Path
    expected_label: str
    report: IndexReport
    result: SearchResult

    @property
    def right(self) -> int:
        """How many of the hits are views of the query's scene."""
        return sum(h.label == self.expected_label for h in self.result)


def run_demo(
    folder: str | Path,
    collection: str | Path,
    *,
    descriptor: str | None = None,
    metric: str | None = None,
    k: int = 10,
    progress: ProgressCallback | None = None,
    settings: Settings | None = None,
) -> DemoRun:
    """Make the demo images, index them into ``collection`` (labelled by folder; with
    ``descriptor``, that descriptor, else the defaults) and search with the held-out view of
    the coffee scene."""
    from cbir.collection import Collection

    images_dir, queries = make_demo_images(folder)
    query = queries / f"{DEMO_QUERY}.jpg"
    with Collection(collection, settings=settings) as col:
        # a descriptor named for the search is the one indexed (else the defaults are)
        wanted = [descriptor] if descriptor else None
        report = col.add(images_dir, descriptors=wanted, labels="folder", progress=progress)
        result = col.search(query, k, descriptor=descriptor, metric=metric)
    return DemoRun(images_dir, query, DEMO_QUERY, report, result)
