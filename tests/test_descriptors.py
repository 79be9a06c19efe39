"""Tests of the hand-crafted descriptors: colour histograms, GLCM, first-order stats, LBP, HOG.

Every registered descriptor gets the generic contract checks; each family then gets its promised
properties, hand-checked values, agreement with scikit-image's reference implementation where we
reimplement it for speed, and a retrieval sanity check on a synthetic set with known answers.
"""

from __future__ import annotations

import math
from functools import cache

import cv2
import numpy as np
import pytest
from scipy import stats
from skimage import data
from skimage.feature import graycomatrix, graycoprops, hog, local_binary_pattern

from cbir.features import (
    Descriptor,
    DescriptorUnavailableError,
    create_descriptor,
    describe_descriptors,
    descriptor_names,
    get_descriptor_class,
    shape,
    texture,
)
from cbir.features.color import REGIONS, region_labels
from cbir.features.shape import hog_features
from cbir.features.texture import (
    FOTF_FEATURES,
    GLCM_PROPS,
    glcm_properties,
    lbp_codes,
    pair_counts,
    ror_lut,
)
from cbir.metrics import get_metric, pairwise_distances

NAMES = descriptor_names()

#: A non-default spec per built-in descriptor, to check that parameters round-trip too.
NON_DEFAULT = {
    "color-hist": "color-hist:space=lab,bins=4x5x6,max_side=128",
    "color-regional": "color-regional:space=rgb,bins=4x4x4",
    "glcm": "glcm:levels=16,distances=1x3,angles=8",
    "fotf": "fotf",
    "lbp": "lbp:P=16,R=2.5,method=ror",
    "hog": "hog:size=64,orientations=6,pixels_per_cell=8,cells_per_block=3,block_norm=L1",
}


# -- images ----------------------------------------------------------------------------------
@cache
def astronaut() -> np.ndarray:
    """A 128 px natural RGB image (cached: skimage's PNG takes a while to decode)."""
    return cv2.resize(data.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)


def to_input(d: Descriptor, rgb: np.ndarray) -> np.ndarray:
    """What the images module would hand ``d``: its mode, and its exact size if it has one."""
    image = rgb if d.input_spec.mode == "RGB" else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if d.input_spec.size is not None:
        image = cv2.resize(image, d.input_spec.size, interpolation=cv2.INTER_AREA)
    return image


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def grating(kind: str, period: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """96 px gray sinusoidal stripes (or a checkerboard) with random phase and noise."""
    y, x = np.mgrid[0:96, 0:96].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    if kind == "stripes":
        u = x * np.cos(np.deg2rad(angle)) + y * np.sin(np.deg2rad(angle))
        base = np.sin(2 * np.pi * u / period + phase[0])
    else:
        sx = np.sin(2 * np.pi * x / period + phase[0])
        base = np.sign(sx * np.sin(2 * np.pi * y / period + phase[1]))
    image = 128 + 80 * base + rng.normal(0, 10, base.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def nearest_same_class(d: Descriptor, images: list[np.ndarray], labels: list[int], k: int) -> float:
    """Fraction of each image's k nearest neighbours (default metric) that share its class."""
    X = d.transform(images)
    D = pairwise_distances(X, X, d.default_metric)
    np.fill_diagonal(D, np.inf)
    nn = np.argsort(D, axis=1, kind="stable")[:, :k]
    y = np.asarray(labels)
    return float((y[nn] == y[:, None]).mean())


def ready(spec: str) -> Descriptor:
    """A descriptor that can transform: skipped when its optional extra is missing, and fitted
    on generated images (with two labels) when it learns from a collection."""
    try:
        d = create_descriptor(spec)
    except DescriptorUnavailableError as exc:
        pytest.skip(str(exc))
    if d.requires_fit:
        sample = [to_input(d, random_rgb(96, 96, seed=s)) for s in range(12)]
        sample += [to_input(d, np.roll(astronaut(), 9 * s, axis=1)) for s in range(12)]
        labels = ["noise"] * 12 + ["astronaut"] * 12
        d.fit(sample, labels if d.needs_labels else None)
    return d


# -- the contract every descriptor keeps ------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_batch_shape_dtype_and_determinism(name: str) -> None:
    d = ready(name)
    images = [
        to_input(d, astronaut()),
        to_input(d, random_rgb(128, 128)),
        to_input(d, astronaut()[::-1]),
    ]
    X = d.transform(images)
    assert X.shape == (3, d.dim)
    assert X.dtype == np.float32
    assert np.isfinite(X).all()
    np.testing.assert_array_equal(X, ready(name).transform(images))
    for row, image in zip(X, images, strict=True):
        one = d.transform_one(image)
        assert one.shape == (d.dim,) and one.dtype == np.float32
        # the same vector alone as in a batch, up to the last bits of a matrix product (BLAS
        # splits one row and three rows differently; cnn's neighbour search is one)
        np.testing.assert_allclose(one, row, rtol=0, atol=1e-6)
    assert not np.array_equal(X[0], X[1]), "different images should not give the same vector"
    if d.nonnegative:
        assert (X >= 0).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "rgb",
    [
        np.full((64, 64, 3), 128, np.uint8),  # flat
        np.zeros((40, 40, 3), np.uint8),  # black
        np.full((33, 20, 3), 255, np.uint8),  # white, non-square
        random_rgb(8, 8, seed=1),  # tiny
        random_rgb(1, 1, seed=2),  # a single pixel
        random_rgb(37, 150, seed=3),  # non-square
        random_rgb(300, 41, seed=4),
    ],
    ids=["flat", "black", "white", "8x8", "1x1", "37x150", "300x41"],
)
def test_odd_images_give_finite_vectors(name: str, rgb: np.ndarray) -> None:
    d = ready(name)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    # Fed what the images module sends (mode only: no resize) and also the other mode.
    for image in (rgb if d.input_spec.mode == "RGB" else gray, rgb, gray):
        v = d.transform_one(image)
        assert v.shape == (d.dim,) and v.dtype == np.float32
        assert np.isfinite(v).all()


@pytest.mark.parametrize("name", NAMES)
def test_spec_round_trips(name: str) -> None:
    for spec in (name, NON_DEFAULT.get(name, name)):
        d = create_descriptor(spec)
        again = create_descriptor(d.spec)
        assert type(again) is type(d)
        assert again.get_params() == d.get_params()
        assert again.spec == d.spec
        assert again.dim == d.dim
        # the short label (non-default parameters only) names the same descriptor
        assert create_descriptor(d.short_spec).spec == d.spec
        assert len(d.short_spec) <= len(d.spec)
    assert create_descriptor(name).short_spec == name


@pytest.mark.parametrize("name", NAMES)
def test_summary_and_default_metric_fit(name: str) -> None:
    cls = get_descriptor_class(name)
    assert cls.summary() and len(cls.summary()) < 120
    metric = get_metric(cls.default_metric)
    # a metric for distributions must only be the default of a non-negative descriptor
    assert cls.nonnegative or not metric.nonnegative
    row = next(r for r in describe_descriptors() if r["name"] == name)
    assert row["dim"] == cls().dim


def test_aliases() -> None:
    assert type(create_descriptor("hsv-hist")) is type(create_descriptor("color-hist"))
    assert type(create_descriptor("hsv-regional")) is type(create_descriptor("color-regional"))


def test_non_uint8_images_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        create_descriptor("color-hist").transform_one(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        create_descriptor("lbp").transform_one(np.zeros((8, 8), np.int64))


@pytest.mark.parametrize(
    ("spec", "params", "param"),
    [
        ("color-hist", {"space": "xyz"}, "space"),
        ("color-hist", {"bins": (8, 0, 3)}, "bins"),
        ("color-hist", {"bins": (8, 12)}, "bins"),
        ("color-hist", {"bins": (181, 2, 2)}, "bins"),  # OpenCV hue has 180 values
        ("color-hist", {"max_side": 0}, "max_side"),
        ("color-regional", {"space": "hsl"}, "space"),
        ("color-regional", {"bins": (9, 3, -3)}, "bins"),
        ("glcm", {"levels": 1}, "levels"),
        ("glcm", {"levels": 300}, "levels"),
        ("glcm", {"distances": (0, 1)}, "distances"),
        ("glcm", {"angles": 0}, "angles"),
        ("lbp", {"P": 1}, "P"),
        ("lbp", {"P": 20, "method": "default"}, "P"),
        ("lbp", {"P": 8.5}, "P"),
        ("lbp", {"R": 0.0}, "R"),
        ("lbp", {"R": float("nan")}, "R"),
        ("lbp", {"method": "var"}, "method"),
        ("hog", {"pixels_per_cell": 0}, "pixels_per_cell"),
        ("hog", {"orientations": 0}, "orientations"),
        ("hog", {"block_norm": "L3"}, "block_norm"),
        ("hog", {"size": 16, "pixels_per_cell": 16, "cells_per_block": 2}, "cells_per_block"),
    ],
)
def test_bad_params_name_the_param(spec: str, params: dict, param: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{param}\b"):
        create_descriptor(spec, **params)


def test_bad_param_text_and_allowed_values_in_messages() -> None:
    with pytest.raises(ValueError, match=r"\bP\b"):
        create_descriptor("lbp:P=eight")
    with pytest.raises(ValueError, match="uniform, ror, nri_uniform, default"):
        create_descriptor("lbp:method=fancy")
    with pytest.raises(ValueError, match="hsv, rgb, lab"):
        create_descriptor("color-hist:space=xyz")


# -- colour ------------------------------------------------------------------------------------
def test_color_hist_is_a_distribution_with_the_documented_layout() -> None:
    d = create_descriptor("color-hist")
    assert d.dim == 8 * 12 * 3
    v = d.transform_one(astronaut())
    assert v.sum() == pytest.approx(1.0, abs=1e-6)
    # reference: OpenCV HSV, bin = value * bins // range (H range 180), H-major layout
    h, s, val = cv2.split(cv2.cvtColor(astronaut(), cv2.COLOR_RGB2HSV).astype(np.int64))
    index = (h * 8 // 180) * 36 + (s * 12 // 256) * 3 + val * 3 // 256
    expected = np.bincount(index.ravel(), minlength=288) / index.size
    np.testing.assert_allclose(v, expected, atol=1e-7)
    # pure red: H=0, S=255, V=255 -> bin (0, 11, 2)
    red = np.zeros((10, 10, 3), np.uint8)
    red[..., 0] = 255
    assert d.transform_one(red)[11 * 3 + 2] == 1.0
    # rgb space, bins 4x4x4: (255, 0, 128) -> (3, 0, 2)
    pixel = np.array([[[255, 0, 128]]], np.uint8)
    assert create_descriptor("color-hist:space=rgb,bins=4").transform_one(pixel)[3 * 16 + 2] == 1.0


def test_color_hist_ignores_layout_and_barely_sees_scale() -> None:
    d = create_descriptor("color-hist")
    image = cv2.resize(data.coffee(), (256, 160), interpolation=cv2.INTER_AREA)
    v = d.transform_one(image)
    np.testing.assert_array_equal(v, d.transform_one(image[:, ::-1]))
    np.testing.assert_array_equal(v, d.transform_one(np.rot90(image)))
    half = cv2.resize(image, (128, 80), interpolation=cv2.INTER_AREA)
    assert np.abs(v - d.transform_one(half)).sum() < 0.1
    # but a different image is far away
    assert np.abs(v - d.transform_one(astronaut())).sum() > 0.5


def test_color_hist_retrieves_hue_classes() -> None:
    rng = np.random.default_rng(7)
    images, labels = [], []
    for label, hue in enumerate((10, 55, 100, 145)):  # OpenCV hue units (0..179)
        for _ in range(5):
            hsv = np.empty((48, 48, 3), np.uint8)
            hsv[..., 0] = np.clip(hue + rng.normal(0, 4, (48, 48)), 0, 179)
            hsv[..., 1] = rng.integers(120, 256, (48, 48))
            hsv[..., 2] = rng.integers(90, 256, (48, 48))
            images.append(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
            labels.append(label)
    for spec in ("color-hist", "color-regional"):
        assert nearest_same_class(create_descriptor(spec), images, labels, k=4) == 1.0


def test_color_regional_blocks_and_order() -> None:
    d = create_descriptor("color-regional")
    assert d.dim == 405
    blocks = d.transform_one(astronaut()).reshape(5, 81)
    np.testing.assert_allclose(blocks.sum(axis=1), 0.2, atol=1e-6)
    # one colour per region: each block is a single bin of mass 1/5, in the documented order
    h, w = 90, 120
    labels = region_labels(h, w)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    image = np.zeros((h, w, 3), np.uint8)
    for region, colour in enumerate(colours):
        image[labels == region] = colour
    blocks = d.transform_one(image).reshape(5, 81)
    single = create_descriptor("color-hist:bins=9x3x3")
    for region, colour in enumerate(colours):
        expected = single.transform_one(np.array([[colour]], np.uint8)) / 5
        np.testing.assert_allclose(blocks[region], expected, atol=1e-7, err_msg=REGIONS[region])


def test_color_regional_geometry() -> None:
    labels = region_labels(100, 200)
    assert labels[50, 100] == 0 and labels[0, 0] == 1 and labels[0, 199] == 2
    assert labels[99, 199] == 3 and labels[99, 0] == 4
    # the ellipse's axes are 75% of the sides
    row = labels[50]
    assert np.count_nonzero(row == 0) == pytest.approx(150, abs=2)
    assert np.count_nonzero(labels[:, 100] == 0) == pytest.approx(75, abs=2)
    assert region_labels(100, 200) is labels  # cached per shape
    # an empty region stays zero: a single pixel lies in the centre ellipse only
    v = create_descriptor("color-regional").transform_one(random_rgb(1, 1))
    assert v[:81].sum() == pytest.approx(0.2) and not v[81:].any()


# -- GLCM --------------------------------------------------------------------------------------
def stripes_image() -> np.ndarray:
    """Vertical 1-px stripes 0/255: quantised to 0 and 31 with 32 levels."""
    image = np.zeros((32, 32), np.uint8)
    image[:, 1::2] = 255
    return image


def test_glcm_hand_check_on_stripes() -> None:
    d = create_descriptor("glcm")
    f = dict(zip(d.feature_names, d.transform_one(stripes_image()).tolist(), strict=True))
    assert d.dim == len(GLCM_PROPS) * 3 * 2 == 42
    # offsets (row, col): d=1: (0,1) (1,1) (1,0) (1,-1); d=2: (0,2) (1,1) (2,0) (1,-1);
    # d=4: (0,4) (3,3) (4,0) (3,-3). Odd column steps cross a stripe (difference 31).
    crossing = {1: 3, 2: 2, 4: 2}  # how many of the 4 directions cross
    for dist, n in crossing.items():
        contrast = [961.0] * n + [0.0] * (4 - n)
        corr = [-1.0] * n + [1.0] * (4 - n)
        assert f[f"contrast_d{dist}_mean"] == pytest.approx(np.mean(contrast))
        assert f[f"contrast_d{dist}_range"] == pytest.approx(961.0)
        assert f[f"dissimilarity_d{dist}_mean"] == pytest.approx(31 * n / 4)
        assert f[f"correlation_d{dist}_mean"] == pytest.approx(np.mean(corr), abs=1e-6)
        assert f[f"correlation_d{dist}_range"] == pytest.approx(2.0, abs=1e-6)
        # every matrix has two equally likely cells: 1 bit, ASM 1/2
        assert f[f"entropy_d{dist}_mean"] == pytest.approx(1.0, abs=1e-6)
        assert f[f"entropy_d{dist}_range"] == pytest.approx(0.0, abs=1e-6)
        assert f[f"ASM_d{dist}_mean"] == pytest.approx(0.5)
        assert f[f"energy_d{dist}_mean"] == pytest.approx(math.sqrt(0.5))


def test_glcm_matches_skimage() -> None:
    gray = data.camera()[::4, ::4]
    for spec in ("glcm", "glcm:levels=8,distances=1x3x5,angles=6"):
        d = create_descriptor(spec)
        q = ((gray.astype(np.int64) * d.levels) // 256).astype(np.uint8)
        P = graycomatrix(q, d.distances, d.angle_values, d.levels, symmetric=True, normed=True)
        np.testing.assert_allclose(d.matrices(gray), P, rtol=1e-12, atol=1e-15)
        f = dict(zip(d.feature_names, d.transform_one(gray).tolist(), strict=True))
        for prop in ("contrast", "dissimilarity", "homogeneity", "ASM", "energy", "correlation"):
            values = graycoprops(P, prop)
            for i, dist in enumerate(d.distances):
                mean, rng = values[i].mean(), np.ptp(values[i])
                assert f[f"{prop}_d{dist}_mean"] == pytest.approx(mean, rel=1e-5, abs=1e-6)
                assert f[f"{prop}_d{dist}_range"] == pytest.approx(rng, rel=1e-5, abs=1e-6)
        logp = np.log2(P, where=P > 0, out=np.zeros_like(P))
        entropy = -(P * logp).sum(axis=(0, 1))
        assert f[f"entropy_d{d.distances[0]}_mean"] == pytest.approx(entropy[0].mean(), rel=1e-5)


def test_glcm_flat_image_has_zero_correlation() -> None:
    d = create_descriptor("glcm")
    f = dict(zip(d.feature_names, d.transform_one(np.full((20, 30), 77, np.uint8)), strict=True))
    for dist in d.distances:
        assert f[f"correlation_d{dist}_mean"] == 0.0 and f[f"correlation_d{dist}_range"] == 0.0
        assert f[f"contrast_d{dist}_mean"] == 0.0 and f[f"entropy_d{dist}_mean"] == 0.0
        assert f[f"ASM_d{dist}_mean"] == 1.0 and f[f"homogeneity_d{dist}_mean"] == 1.0


def mixed_gray_batch() -> list[np.ndarray]:
    """Small same-size images (counted together by GLCM), other sizes, RGB, degenerate ones."""
    camera = data.camera()
    tiles = [camera[r : r + 32, c : c + 32] for r, c in ((0, 0), (100, 50), (300, 400), (200, 9))]
    return [
        tiles[0],
        camera[::8, ::8],  # 64 x 64
        tiles[1],
        np.full((32, 32), 77, np.uint8),  # flat
        random_rgb(32, 32, seed=5),  # RGB: gray 32 x 32, joins the tiles
        tiles[2],
        random_rgb(37, 150)[..., 0],
        random_rgb(1, 1)[..., 0],
        tiles[3],
        random_rgb(3, 5)[..., 1],
        data.brick()[:100, :90],  # large enough to be counted on its own
    ]


@pytest.mark.parametrize("spec", ["glcm", "glcm:levels=8,distances=1x3x40,angles=6"])
def test_glcm_batch_equals_one_at_a_time(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    d = create_descriptor(spec)
    images = mixed_gray_batch()
    X = d.transform(images)
    assert X.shape == (len(images), d.dim) and X.dtype == np.float32
    np.testing.assert_array_equal(X, np.stack([d.transform_one(image) for image in images]))
    np.testing.assert_array_equal(d.transform(images[1:2]), X[1:2])
    empty = d.transform([])
    assert empty.shape == (0, d.dim) and empty.dtype == np.float32
    # however the batch is chunked: one image per chunk, or all in one
    for cells in (1, 2**30):
        monkeypatch.setattr(texture, "_CHUNK_CELLS", cells)
        np.testing.assert_array_equal(d.transform(images), X)


def test_pair_counts_match_skimage_batched_and_alone() -> None:
    d = create_descriptor("glcm:levels=8,distances=1x3x50,angles=4")  # 50: longer than the images
    camera = data.camera()
    q = np.stack([camera[r : r + 30, r : r + 30] // 32 for r in (0, 120, 250, 400)])
    counts = pair_counts(q, d.offsets, 8)
    assert counts.shape == (4, 12, 8, 8)
    for n, image in enumerate(q):
        np.testing.assert_array_equal(pair_counts(image[None], d.offsets, 8)[0], counts[n])
        ref = graycomatrix(image, d.distances, d.angle_values, 8)  # not symmetric, not normed
        np.testing.assert_array_equal(counts[n], np.moveaxis(ref.reshape(8, 8, -1), 2, 0))
    assert not counts[:, 8:].any()


def test_glcm_properties_of_asymmetric_counts_and_probabilities() -> None:
    gray = data.camera()[::4, ::4] // 32
    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    counts = graycomatrix(gray, [1, 3], angles, 8).astype(np.float64)
    P = counts / counts.sum(axis=(0, 1), keepdims=True)
    from_counts, from_p = glcm_properties(counts), glcm_properties(P)
    for prop in ("contrast", "dissimilarity", "homogeneity", "ASM", "energy", "correlation"):
        np.testing.assert_allclose(from_p[prop], graycoprops(P, prop), rtol=1e-10, err_msg=prop)
        np.testing.assert_allclose(from_counts[prop], from_p[prop], rtol=1e-10, err_msg=prop)
    logp = np.log2(P, where=P > 0, out=np.zeros_like(P))
    np.testing.assert_allclose(from_p["entropy"], -(P * logp).sum(axis=(0, 1)), rtol=1e-10)
    np.testing.assert_allclose(from_counts["entropy"], from_p["entropy"], rtol=1e-10)


# -- first-order statistics --------------------------------------------------------------------
def test_fotf_matches_numpy_and_scipy() -> None:
    d = create_descriptor("fotf")
    assert d.feature_names == list(FOTF_FEATURES)
    for gray in (data.camera()[::3, ::3], random_rgb(31, 17)[..., 0], data.brick()[:50, :70]):
        f = dict(zip(d.feature_names, d.transform_one(gray).tolist(), strict=True))
        x = gray.astype(np.float64).ravel()
        _, counts = np.unique(x, return_counts=True)
        p = counts / x.size
        expected = {
            "mean": x.mean(),
            "variance": x.var(),
            "std": x.std(),
            "skewness": stats.skew(x),
            "kurtosis": stats.kurtosis(x),
            "energy": (p**2).sum(),
            "entropy": -(p * np.log2(p)).sum(),
            "smoothness": 1 - 1 / (1 + x.var() / 255**2),
            "min": x.min(),
            "max": x.max(),
            "p10": np.percentile(x, 10),
            "p25": np.percentile(x, 25),
            "median": np.median(x),
            "p75": np.percentile(x, 75),
            "p90": np.percentile(x, 90),
        }
        assert set(expected) == set(FOTF_FEATURES)
        for key, value in expected.items():
            assert f[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_fotf_flat_and_batch() -> None:
    d = create_descriptor("fotf")
    f = dict(zip(d.feature_names, d.transform_one(np.full((9, 9), 200, np.uint8)), strict=True))
    assert f["mean"] == 200 and f["median"] == 200 and f["min"] == f["max"] == 200
    for key in ("variance", "std", "skewness", "kurtosis", "entropy", "smoothness"):
        assert f[key] == 0.0, key
    assert f["energy"] == 1.0
    images = [data.camera()[::8, ::8], np.zeros((3, 3), np.uint8), random_rgb(20, 9)[..., 1]]
    X = d.transform(images)
    for row, image in zip(X, images, strict=True):
        np.testing.assert_array_equal(row, d.transform_one(image))
    assert d.transform([]).shape == (0, d.dim)


# -- LBP ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("P", "method", "bins"),
    [
        (8, "uniform", 10),
        (16, "uniform", 18),
        (24, "uniform", 26),
        (8, "nri_uniform", 59),
        (16, "nri_uniform", 243),
        (8, "default", 256),
        (4, "ror", 6),  # binary necklaces of length P
        (8, "ror", 36),
        (16, "ror", 4116),
    ],
)
def test_lbp_bin_counts(P: int, method: str, bins: int) -> None:
    d = create_descriptor("lbp", P=P, method=method)
    assert d.dim == bins
    v = d.transform_one(data.brick()[:64, :64])
    assert v.shape == (bins,)
    assert v.sum() == pytest.approx(1.0, abs=1e-6)


def test_lbp_codes_match_skimage() -> None:
    noise = random_rgb(40, 50)[..., 0]  # no exact ties between interpolated neighbours
    for P, R in ((8, 1.0), (16, 2.0), (8, 1.5), (24, 3.0), (4, 1.0)):
        for method in ("uniform", "nri_uniform", "default", "ror"):
            if method in ("default", "ror") and P > 16:
                continue
            ref = local_binary_pattern(noise, P, R, method).astype(np.int64)
            if method == "ror":
                ref = ror_lut(P)[ref]
            np.testing.assert_array_equal(lbp_codes(noise, P, R, method), ref)
            d = create_descriptor("lbp", P=P, R=R, method=method)
            expected = np.bincount(ref.ravel(), minlength=d.dim) / ref.size
            np.testing.assert_allclose(d.transform_one(noise), expected, atol=1e-7)
    # natural images have exact ties, which skimage breaks by float rounding: nearly all agree
    camera = data.camera()[::4, ::4]
    for P, R in ((8, 1.0), (8, 1.5), (16, 2.0)):
        ref = local_binary_pattern(camera, P, R, "uniform")
        assert (lbp_codes(camera, P, R, "uniform") == ref).mean() > 0.99


def test_lbp_flat_image_is_all_ones_pattern() -> None:
    flat = np.full((16, 16), 90, np.uint8)
    codes = lbp_codes(flat, 8, 1.0, "uniform")
    assert (codes[1:-1, 1:-1] == 8).all()  # uniform code P: every neighbour >= centre
    # border pixels see 0 outside the image (as skimage): only the 14 x 14 interior is code P
    v = create_descriptor("lbp").transform_one(flat)
    assert v[8] == pytest.approx(14 * 14 / 256)


def test_lbp_invariances() -> None:
    gray = data.brick()[100:228, 100:228]
    for spec in ("lbp", "lbp:P=16,R=2", "lbp:method=ror"):
        d = create_descriptor(spec)
        v = d.transform_one(gray)
        assert np.abs(v - d.transform_one(np.rot90(gray))).sum() < 0.01, spec
    # an affine gray-level change (brightness and contrast) leaves the codes unchanged
    d = create_descriptor("lbp")
    low = (gray // 2).astype(np.uint8)
    np.testing.assert_array_equal(d.transform_one(low), d.transform_one(low * 2 + 7))
    # not rotation invariant by construction: nri_uniform sees the rotation
    nri = create_descriptor("lbp:method=nri_uniform")
    stripes = grating("stripes", 6, 0, np.random.default_rng(0))
    rotated = np.rot90(stripes)
    assert np.abs(nri.transform_one(stripes) - nri.transform_one(rotated)).sum() > 0.2


# -- HOG ---------------------------------------------------------------------------------------
def test_hog_dim_and_input_spec() -> None:
    d = create_descriptor("hog")
    assert d.dim == 7 * 7 * 2 * 2 * 9 == 1764
    assert d.input_spec.mode == "L" and d.input_spec.size == (128, 128)
    assert create_descriptor("hog:size=64,pixels_per_cell=8,cells_per_block=3").dim == 6 * 6 * 9 * 9


def test_hog_matches_skimage() -> None:
    gray = cv2.cvtColor(astronaut(), cv2.COLOR_RGB2GRAY)
    for spec in ("hog", "hog:orientations=6,pixels_per_cell=13,cells_per_block=3,block_norm=L1"):
        d = create_descriptor(spec)
        ppc, cpb = (d.pixels_per_cell,) * 2, (d.cells_per_block,) * 2
        ref = hog(gray, d.orientations, ppc, cpb, d.block_norm, feature_vector=True)
        np.testing.assert_allclose(d.transform_one(gray), ref, atol=1e-5)
    # another size is resized to size x size first
    d = create_descriptor("hog")
    big = cv2.cvtColor(cv2.resize(data.astronaut(), (300, 200)), cv2.COLOR_RGB2GRAY)
    resized = cv2.resize(big, (128, 128), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(d.transform_one(big), d.transform_one(resized))
    assert not d.transform_one(np.full((128, 128), 50, np.uint8)).any()  # no gradient


@pytest.mark.parametrize("spec", ["hog", NON_DEFAULT["hog"]])
def test_hog_batch_equals_one_at_a_time(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    d = create_descriptor(spec)
    gray = to_input(d, astronaut())
    images = [
        gray,
        gray[::-1],
        to_input(d, random_rgb(128, 128)),
        np.full((d.size, d.size), 50, np.uint8),
        cv2.resize(random_rgb(128, 128, seed=5), (d.size, d.size)),  # RGB
        cv2.cvtColor(cv2.resize(data.astronaut(), (300, 200)), cv2.COLOR_RGB2GRAY),  # resized
        random_rgb(37, 150)[..., 0],  # resized (enlarged)
        gray.T.copy(),
        to_input(d, random_rgb(128, 128, seed=6)),
    ]
    X = d.transform(images)
    assert X.shape == (len(images), d.dim) and X.dtype == np.float32
    np.testing.assert_array_equal(X, np.stack([d.transform_one(image) for image in images]))
    np.testing.assert_array_equal(d.transform(images[5:6]), X[5:6])
    empty = d.transform([])
    assert empty.shape == (0, d.dim) and empty.dtype == np.float32
    # however the batch is chunked: one image per chunk, or all in one
    for pixels in (1, 2**30):
        monkeypatch.setattr(shape, "_CHUNK_PIXELS", pixels)
        np.testing.assert_array_equal(d.transform(images), X)


def test_hog_features_of_a_stack_match_skimage() -> None:
    gray = cv2.cvtColor(astronaut(), cv2.COLOR_RGB2GRAY)
    stack = np.stack([gray[:96, :80], gray[32:, 48:], random_rgb(96, 80)[..., 2]])
    for orientations, cell, block, norm in ((9, 16, 2, "L2-Hys"), (7, 10, 3, "L1-sqrt")):
        out = hog_features(stack, orientations, cell, block, norm)
        assert out.shape[0] == 3 and out.dtype == np.float64
        for row, image in zip(out, stack, strict=True):
            ref = hog(image, orientations, (cell, cell), (block, block), norm, feature_vector=True)
            np.testing.assert_allclose(row, ref, rtol=1e-6, atol=1e-7)  # skimage: float32 sums
            np.testing.assert_array_equal(hog_features(image, orientations, cell, block, norm), row)


# -- texture and shape retrieval on synthetic sets -----------------------------------------------
def texture_set(classes: list[tuple[str, float, float]], seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, spec in enumerate(classes):
        for _ in range(5):
            images.append(grating(*spec, rng))
            labels.append(label)
    return images, labels


@pytest.mark.parametrize("spec", ["lbp", "glcm", "hog"])
def test_textures_of_different_frequency_are_separated(spec: str) -> None:
    classes = [("stripes", 3, 0), ("stripes", 8, 30), ("checker", 6, 0), ("stripes", 24, 60)]
    images, labels = texture_set(classes, seed=1)
    assert nearest_same_class(create_descriptor(spec), images, labels, k=4) == 1.0


def test_hog_separates_orientations() -> None:
    classes = [("stripes", 8, 0), ("stripes", 8, 90), ("stripes", 8, 45), ("checker", 16, 0)]
    images, labels = texture_set(classes, seed=2)
    assert nearest_same_class(create_descriptor("hog"), images, labels, k=4) == 1.0
