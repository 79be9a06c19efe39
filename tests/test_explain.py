"""Why a hit matched: each kind of explanation says what a person would check by eye, on
images made here whose answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from cbir import Box, Collection, Region
from cbir.config import Settings
from cbir.features import _backbone
from tests.conftest import write_colour_set

SMALL = "cnn:size=96"
deep = pytest.mark.skipif(
    _backbone.missing_requirements() is not None, reason="the deep extra is not installed"
)


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("explain")
    paths = write_colour_set(root / "images", per_class=3)
    settings = Settings(
        collection=root / "col",
        workers=1,
        default_descriptors=("color-regional", "fusion:parts=color-hist+lbp", "glcm"),
    )
    col = Collection(settings.collection, settings=settings)
    col.add(root / "images", labels="folder")
    yield col, paths
    col.close()


def _id(col: Collection, path: Path) -> int:
    return col.search(str(path), k=1)[0].id


def test_colour_swatches_are_the_colours_both_hold(colours):
    col, paths = colours
    hit = _id(col, paths["green"][1])
    why = col.explain(paths["green"][0], hit)
    assert why.kind == "colours" and why.descriptor == "color-regional"
    top = why.colours[0]
    r, g, b = top.rgb
    assert g > r and g > b  # green images share green above all
    assert top.shared == pytest.approx(min(top.query, top.hit))
    assert all(a.shared >= b.shared for a, b in zip(why.colours, why.colours[1:], strict=False))
    other = col.explain(paths["green"][0], _id(col, paths["red"][0]))
    assert other.overlap < why.overlap  # red shares less of green's colours than green does


def test_fused_blocks_add_up_to_the_distance(colours):
    col, paths = colours
    query = paths["blue"][0]
    hit = col.search(str(query), k=2, descriptor="fusion")[1]
    why = col.explain(query, hit, descriptor="fusion")
    assert why.kind == "blocks" and [b.part for b in why.blocks] == ["color-hist", "lbp"]
    assert sum(b.squared_distance for b in why.blocks) == pytest.approx(why.distance**2, rel=1e-5)
    assert sum(b.share for b in why.blocks) == pytest.approx(1.0)
    # same texture, other colour: the colour block keeps them apart
    red = col.explain(query, _id(col, paths["red"][0]), descriptor="fusion")
    assert red.blocks[0].share > red.blocks[1].share


def test_other_descriptors_give_the_distance(colours):
    col, paths = colours
    why = col.explain(paths["red"][0], _id(col, paths["red"][1]), descriptor="glcm")
    assert why.kind == "distance" and why.distance >= 0 and why.notes
    assert why.to_dict()["metric"] == why.metric


@deep
def test_cnn_heat_map_lights_up_the_matching_place(tmp_path):
    cat = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)))
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    composite = rng.integers(0, 256, size=(224, 448, 3), dtype=np.uint8)
    composite[:, :224] = cat  # the cat on the left, noise on the right
    Image.fromarray(composite).save(folder / "composite.png")
    Image.fromarray(cat).save(tmp_path / "cat.png")
    settings = Settings(collection=tmp_path / "col", workers=1, default_descriptors=(SMALL,))
    with Collection(settings.collection, settings=settings) as col:
        col.add(folder)
        hit = col.search(str(folder / "composite.png"), k=1)[0]
        why = col.explain(tmp_path / "cat.png", hit)
        assert why.kind == "heatmap" and why.heatmaps is not None
        heat = np.asarray(why.heatmaps.hit)
        half = heat.shape[1] // 2
        assert heat[:, :half].mean() > heat[:, half:].mean() + 0.1
        assert heat.min() >= 0.0 and heat.max() <= 1.0
        # a region query: the heat map is of the boxed part
        boxed = col.explain(Region(tmp_path / "cat.png", Box(0, 0, 0.5, 1)), hit)
        assert np.asarray(boxed.heatmaps.query).shape == np.asarray(why.heatmaps.query).shape
        vectors = col.explain(col.vectors()[1][:1], hit)
        assert vectors.kind == "distance" and "vectors" in vectors.notes[0]
