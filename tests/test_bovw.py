"""Tests of the bag-of-visual-words descriptor (``bovw``).

It learns a vocabulary from the collection, so every test fits it on views generated here from
scikit-image's bundled pictures (random crops, scales and quarter turns of five textures and
photos): the contract (shape, norm, determinism, saved state), the idf it promises, images without
keypoints, the errors a user meets, and the invariance and retrieval it is for.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from cbir.features import create_descriptor, describe_descriptors
from cbir.features.base import Descriptor
from cbir.features.registry import metric_applies
from cbir.images import InputSpec
from cbir.metrics import pairwise_distances

DETECTORS = ("orb", "sift")
SIZE = 192  # view side: ORB's 31 px border leaves too few corners in much smaller images
VIEWS = 6  # per class
WORDS = 64


# -- images ----------------------------------------------------------------------------------
@cache
def sources() -> tuple[np.ndarray, ...]:
    """Five grey pictures that look different: three textures and two photos."""
    return (data.brick(), data.grass(), data.gravel(), data.camera(), data.coins())


def view(source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop of 1 to 1.4 x SIZE, shrunk to SIZE and turned by a random quarter turn."""
    h, w = source.shape
    side = int(SIZE * rng.uniform(1.0, 1.4))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = cv2.resize(
        source[y : y + side, x : x + side], (SIZE, SIZE), interpolation=cv2.INTER_AREA
    )
    return np.ascontiguousarray(np.rot90(crop, rng.integers(0, 4)))


@cache
def view_set() -> tuple[list[np.ndarray], np.ndarray]:
    """VIEWS views of each source and their class numbers."""
    rng = np.random.default_rng(0)
    images = [view(source, rng) for source in sources() for _ in range(VIEWS)]
    return images, np.repeat(np.arange(len(sources())), VIEWS)


@cache
def fitted(detector: str) -> Descriptor:
    """A descriptor fitted on the view set (shared: tests must not refit or change it)."""
    return create_descriptor(f"bovw:detector={detector},words={WORDS}").fit(view_set()[0])


@cache
def view_vectors(detector: str) -> np.ndarray:
    return fitted(detector).transform(view_set()[0])


def blank_images() -> list[np.ndarray]:
    return [
        np.zeros((96, 96), np.uint8),  # black
        np.full((64, 80), 128, np.uint8),  # flat
        np.full((33, 20, 3), 255, np.uint8),  # white RGB, non-square
        np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8),  # tiny
        np.random.default_rng(2).integers(0, 256, (1, 1), dtype=np.uint8),  # one pixel
    ]


# -- parameters and errors --------------------------------------------------------------------
def test_defaults_dim_and_metrics_before_fit() -> None:
    d = create_descriptor("bovw")
    assert d.get_params() == {
        "detector": "orb",
        "words": 500,
        "max_keypoints": 500,
        "max_side": 320,
    }
    assert d.dim == 500  # `cbir descriptors` lists the dim of an unfitted instance
    assert d.requires_fit and not d.fitted and d.get_state() == {}
    assert d.input_spec == InputSpec(mode="L", max_side=320)
    assert d.default_metric == "cosine"
    assert metric_applies(d, "hellinger") and metric_applies(d, "chi2")
    assert not metric_applies(d, "hamming")
    row = next(r for r in describe_descriptors() if r["name"] == "bovw")
    assert row["dim"] == 500 and row["requires_fit"]
    assert create_descriptor("bovw:words=64").dim == 64


@pytest.mark.parametrize(
    "spec", ["bovw", "bovw:detector=SIFT,words=64,max_keypoints=200,max_side=256"]
)
def test_spec_round_trips(spec: str) -> None:
    d = create_descriptor(spec)
    again = create_descriptor(d.spec)
    assert again.get_params() == d.get_params()
    assert again.spec == d.spec and again.dim == d.dim
    assert d.detector in ("orb", "sift")  # the spec's case is normalised


@pytest.mark.parametrize(
    ("params", "param", "allowed"),
    [
        ({"detector": "surf"}, "detector", "orb, sift"),
        ({"detector": 3}, "detector", "orb, sift"),
        ({"words": 1}, "words", "2..100000"),
        ({"words": 2.5}, "words", "2..100000"),
        ({"max_keypoints": 0}, "max_keypoints", "1..100000"),
        ({"max_side": 32}, "max_side", "64..4096"),
        ({"max_side": True}, "max_side", "64..4096"),
    ],
)
def test_bad_params_name_the_param_and_what_is_allowed(
    params: dict, param: str, allowed: str
) -> None:
    with pytest.raises(ValueError, match=rf"\b{param}\b.*{allowed}"):
        create_descriptor("bovw", **params)


def test_bad_param_text_names_the_param() -> None:
    with pytest.raises(ValueError, match=r"\bwords\b"):
        create_descriptor("bovw:words=many")


def test_transform_before_fit_says_to_fit_first() -> None:
    d = create_descriptor("bovw:words=8")
    image = view_set()[0][0]
    with pytest.raises(ValueError, match="must be fitted on a collection first"):
        d.transform([image])
    with pytest.raises(ValueError, match="must be fitted on a collection first"):
        d.transform_one(image)


def test_too_few_keypoints_for_the_vocabulary_is_a_clear_error() -> None:
    images = view_set()[0][:2]
    d = create_descriptor("bovw:words=5000")
    with pytest.raises(ValueError, match=r"words=5000.*found \d+ keypoints in 2 images.*smaller"):
        d.fit(images)
    assert not d.fitted  # a failed fit leaves nothing half-learned
    with pytest.raises(ValueError, match=r"found 0 keypoints in 5 images \(5 without any\)"):
        create_descriptor("bovw").fit(blank_images())


def test_vocabulary_as_large_as_the_keypoints_still_fits() -> None:
    one = view_set()[0][:1]
    probe = create_descriptor("bovw:words=2,max_keypoints=60").fit(one)
    found = probe.fit_report_["keypoints"]
    assert 2 < found <= 60
    d = create_descriptor(f"bovw:words={found},max_keypoints=60").fit(one * 3)  # repeated points
    v = d.transform_one(one[0])
    assert v.shape == (found,) and np.isclose(np.linalg.norm(v), 1.0)
    assert d.get_state()["vocabulary"].shape == (found, 256)


# -- the vectors --------------------------------------------------------------------------------
@pytest.mark.parametrize("detector", DETECTORS)
def test_vectors_are_unit_nonnegative_float32(detector: str) -> None:
    d, X = fitted(detector), view_vectors(detector)
    images = view_set()[0]
    assert X.shape == (len(images), WORDS) and X.dtype == np.float32
    assert np.isfinite(X).all() and (X >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    one = d.transform_one(images[3])
    assert one.shape == (WORDS,) and one.dtype == np.float32
    np.testing.assert_array_equal(one, X[3])
    # an RGB image gives the vector of its grey version (the pipeline sends grey)
    np.testing.assert_array_equal(d.transform_one(np.dstack([images[3]] * 3)), X[3])


def test_larger_images_are_shrunk_to_max_side() -> None:
    small = create_descriptor(f"bovw:words={WORDS},max_side=128")
    small.set_state(fitted("orb").get_state())
    big = view_set()[0][0]
    shrunk = cv2.resize(big, (128, 128), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(small.transform_one(big), small.transform_one(shrunk))
    assert not np.array_equal(small.transform_one(big), fitted("orb").transform_one(big))


def test_idf_is_the_smoothed_document_frequency_of_the_sample() -> None:
    d, X = fitted("orb"), view_vectors("orb")
    idf = d.get_state()["idf"]
    n = len(X)
    df = (X > 0).sum(axis=0)  # a word weighs > 0 in exactly the images that contain it
    np.testing.assert_allclose(idf, np.log((1 + n) / (1 + df)) + 1, rtol=1e-6)
    assert idf.min() >= 1.0  # a word in every image still counts
    # the rarest words weigh most: a vector is tf x idf, normalised
    assert idf[df.argmin()] > idf[df.argmax()]


def test_images_without_keypoints_give_zero_vectors_metrics_handle() -> None:
    d, X = fitted("orb"), view_vectors("orb")
    Z = d.transform(blank_images())
    assert Z.shape == (5, WORDS) and Z.dtype == np.float32
    assert not Z.any()
    both = np.vstack([Z[:2], X[:2]])
    D = pairwise_distances(both, both, "cosine")
    assert D[0, 1] == 0.0  # two blank images are alike
    np.testing.assert_allclose(D[:2, 2:], 1.0)  # and unlike anything with keypoints
    for metric in ("hellinger", "chi2", "euclidean"):
        assert np.isfinite(pairwise_distances(both, both, metric)).all()


def test_blank_images_in_the_sample_are_counted_not_fatal() -> None:
    images = view_set()[0][::VIEWS] + blank_images()
    d = create_descriptor("bovw:words=16").fit(images)
    assert d.fit_report_["images"] == 10
    assert d.fit_report_["images_without_keypoints"] == 5
    X = d.transform(images)
    np.testing.assert_allclose(np.linalg.norm(X[:5], axis=1), 1.0, rtol=1e-5)
    assert not X[5:].any()


@pytest.mark.parametrize("detector", DETECTORS)
def test_fit_is_deterministic(detector: str) -> None:
    images = view_set()[0]
    again = create_descriptor(fitted(detector).spec).fit(images)
    first, second = fitted(detector).get_state(), again.get_state()
    assert first.keys() == second.keys() == {"vocabulary", "idf"}
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    np.testing.assert_array_equal(again.transform(images[::VIEWS]), view_vectors(detector)[::VIEWS])


@pytest.mark.parametrize("detector", DETECTORS)
def test_state_round_trips_through_an_npz_file(detector: str, tmp_path: Path) -> None:
    d = fitted(detector)
    state = d.get_state()
    assert state["vocabulary"].shape == (WORDS, 256 if detector == "orb" else 128)
    assert state["idf"].shape == (WORDS,)
    # ORB centres are bit frequencies (unpacked bits), RootSIFT centres means of unit vectors
    assert state["vocabulary"].min() >= 0.0 and state["vocabulary"].max() <= 1.0
    path = tmp_path / "state.npz"
    np.savez(path, **state)  # as the collection saves it: plain arrays, no pickles
    fresh = create_descriptor(d.spec)
    assert not fresh.fitted
    with np.load(path, allow_pickle=False) as saved:
        fresh.set_state({k: saved[k] for k in saved.files})
    assert fresh.fitted
    images = view_set()[0][::VIEWS]
    np.testing.assert_array_equal(fresh.transform(images), view_vectors(detector)[::VIEWS])


def test_a_state_for_another_vocabulary_is_refused() -> None:
    state = fitted("orb").get_state()
    for spec in ("bovw:words=32", f"bovw:detector=sift,words={WORDS}"):
        with pytest.raises(ValueError, match="does not fit descriptor"):
            create_descriptor(spec).set_state(state)
    with pytest.raises(ValueError, match="does not fit descriptor"):
        create_descriptor(f"bovw:words={WORDS}").set_state({"idf": state["idf"]})


# -- what it is for ------------------------------------------------------------------------------
# the changed image's distance to its original, as a fraction of the original's distance to
# the nearest other picture: at most 0.64 (orb) and 0.22 (sift) here
@pytest.mark.parametrize(("detector", "fraction"), [("orb", 0.8), ("sift", 0.4)])
def test_turned_and_rescaled_images_stay_close(detector: str, fraction: float) -> None:
    d = fitted(detector)
    originals = [np.ascontiguousarray(s[40 : 40 + SIZE, 60 : 60 + SIZE]) for s in sources()]
    base = d.transform(originals)
    others = pairwise_distances(base, base, "cosine")
    np.fill_diagonal(others, np.inf)
    nearest_other = others.min(axis=1)
    changed = {
        "quarter turn": [np.ascontiguousarray(np.rot90(o)) for o in originals],
        "shrunk to 3/4": [
            cv2.resize(o, (144, 144), interpolation=cv2.INTER_AREA) for o in originals
        ],
        "enlarged 4/3": [
            cv2.resize(o, (256, 256), interpolation=cv2.INTER_LINEAR) for o in originals
        ],
    }
    moved = {
        what: np.diag(pairwise_distances(base, d.transform(images), "cosine"))
        for what, images in changed.items()
    }
    for what, distance in moved.items():
        assert (distance < fraction * nearest_other).all(), f"{what}: {distance}, {nearest_other}"
    assert (moved["quarter turn"] < 0.05).all()  # keypoints turn with the image


# what each detector reaches on this set (orb 0.77 / 0.90, sift 0.97 / 1.0), with a margin
@pytest.mark.parametrize(
    ("detector", "precision_at_5", "precision_at_1"), [("orb", 0.65, 0.8), ("sift", 0.85, 0.9)]
)
def test_views_retrieve_their_own_picture(
    detector: str, precision_at_5: float, precision_at_1: float
) -> None:
    X, labels = view_vectors(detector), view_set()[1]
    D = pairwise_distances(X, X, "cosine")
    np.fill_diagonal(D, np.inf)
    nearest = np.argsort(D, axis=1, kind="stable")[:, : VIEWS - 1]
    precision = (labels[nearest] == labels[:, None]).mean()  # chance: 0.2
    assert precision >= precision_at_5
    assert (labels[nearest[:, 0]] == labels).mean() >= precision_at_1
