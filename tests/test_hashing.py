"""Perceptual hashes (ahash, dhash, phash, whash) and the hamming metric.

The hashes must equal the ``imagehash`` library's for the same grayscale input, keep a
re-encoded or resized copy within a few bits and put different pictures far apart; hamming must
equal a brute-force bit count and refuse anything that is not 0/1.
"""

from __future__ import annotations

import io
from functools import cache

import cv2
import imagehash
import numpy as np
import pytest
from PIL import Image
from skimage import data

from cbir import images
from cbir.duplicates import default_threshold
from cbir.features import create_descriptor, get_descriptor_class, metrics_for
from cbir.features.hashing import MIN_INPUT_SIDE
from cbir.index import ExactIndex
from cbir.metrics import get_metric, pairwise_distances, take_rows
from cbir.metrics.binary import pack_bits, table_popcount

HASHES = ["ahash", "dhash", "phash", "whash"]
#: imagehash's function for each descriptor with our default parameters.
REFERENCE = {
    "ahash": lambda im: imagehash.average_hash(im, hash_size=8),
    "dhash": lambda im: imagehash.dhash(im, hash_size=8),
    "phash": lambda im: imagehash.phash(im, hash_size=8, highfreq_factor=4),
    "whash": lambda im: imagehash.whash(im, hash_size=8, image_scale=32),
}
PICTURES = ["astronaut", "coffee", "camera", "chelsea"]


@cache
def picture(name: str) -> np.ndarray:
    """A skimage picture as RGB, shrunk to 256 px (the full-size PNGs are slow to re-encode)."""
    rgb = getattr(data, name)()
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=-1)
    h, w = rgb.shape[:2]
    scale = 256 / max(h, w)
    return cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)


def encode(rgb: np.ndarray, fmt: str, **options: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt, **options)
    return buffer.getvalue()


def resized(rgb: np.ndarray, factor: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    size = (round(w * factor), round(h * factor))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))


def hash_file(name: str, blob: bytes) -> np.ndarray:
    """The hash of encoded image bytes through the real pipeline (draft decode, resize, grey)."""
    d = create_descriptor(name)
    image = images.decode(blob, max_side=d.input_spec.decode_side, shrink=False)
    return d.transform_one(images.to_array(image, d.input_spec))


def bits_apart(a: np.ndarray, b: np.ndarray) -> int:
    return int((a != b).sum())


def gray_inputs() -> list[np.ndarray]:
    """Natural, noisy, smooth, flat and odd-sized grey arrays."""
    rng = np.random.default_rng(3)
    out = [cv2.cvtColor(picture(n), cv2.COLOR_RGB2GRAY) for n in PICTURES]
    out += [rng.integers(0, 256, (h, w), dtype=np.uint8) for h, w in [(64, 48), (7, 90), (1, 1)]]
    out += [
        cv2.GaussianBlur(rng.integers(0, 256, (48, 64), dtype=np.uint8), (0, 0), 4)
        for _ in range(20)
    ]
    out += [np.full((40, 50), 128, np.uint8), np.zeros((64, 64), np.uint8)]
    return out


# -- the hashes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", HASHES)
def test_shape_dtype_bits_and_determinism(name: str) -> None:
    d = create_descriptor(name)
    inputs = [cv2.cvtColor(picture(n), cv2.COLOR_RGB2GRAY) for n in PICTURES]
    X = d.transform(inputs)
    assert d.dim == 64 and X.shape == (len(inputs), 64) and X.dtype == np.float32
    assert set(np.unique(X)) <= {0.0, 1.0}
    np.testing.assert_array_equal(X, create_descriptor(name).transform(inputs))
    for row, image in zip(X, inputs, strict=True):
        np.testing.assert_array_equal(d.transform_one(image), row)
    assert d.transform([]).shape == (0, 64)
    bigger = create_descriptor(name, hash_size=16)
    assert bigger.dim == 256 and bigger.transform(inputs[:1]).shape == (1, 256)


@pytest.mark.parametrize("name", HASHES)
def test_equals_imagehash_for_the_same_grey_input(name: str) -> None:
    d = create_descriptor(name)
    inputs = gray_inputs()
    X = d.transform(inputs)
    for image, row in zip(inputs, X, strict=True):
        expected = REFERENCE[name](Image.fromarray(image)).hash.ravel()
        np.testing.assert_array_equal(row, expected.astype(np.float32))


def test_other_hash_sizes_equal_imagehash() -> None:
    image = Image.fromarray(cv2.cvtColor(picture("coffee"), cv2.COLOR_RGB2GRAY))
    gray = np.asarray(image)
    cases = [
        ("ahash:hash_size=12", imagehash.average_hash(image, hash_size=12)),
        ("dhash:hash_size=5", imagehash.dhash(image, hash_size=5)),
        ("phash:hash_size=16,highfreq_factor=2", imagehash.phash(image, 16, 2)),
        ("whash:hash_size=4,image_scale=64", imagehash.whash(image, 4, image_scale=64)),
    ]
    for spec, expected in cases:
        got = create_descriptor(spec).transform_one(gray)
        np.testing.assert_array_equal(got, expected.hash.ravel().astype(np.float32), err_msg=spec)


@pytest.mark.parametrize("name", HASHES)
def test_rgb_input_hashes_like_its_pillow_grey_version(name: str) -> None:
    rgb = picture("chelsea")
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    d = create_descriptor(name)
    np.testing.assert_array_equal(d.transform_one(rgb), d.transform_one(gray))


@pytest.mark.parametrize("name", HASHES)
def test_copies_stay_close_and_different_pictures_far_apart(name: str) -> None:
    """A JPEG (quality 75) and mildly resized copies keep within the default duplicate
    threshold (6 of 64 bits); different pictures are more than 15 bits apart."""
    close = default_threshold(64)
    originals = {}
    for p in PICTURES:
        rgb = picture(p)
        original = hash_file(name, encode(rgb, "PNG"))
        originals[p] = original
        copies = {
            "jpeg75": encode(rgb, "JPEG", quality=75),
            "80%": encode(resized(rgb, 0.8), "PNG"),
            "125% jpeg90": encode(resized(rgb, 1.25), "JPEG", quality=90),
            "80% jpeg75": encode(resized(rgb, 0.8), "JPEG", quality=75),
        }
        for what, blob in copies.items():
            assert bits_apart(original, hash_file(name, blob)) <= close, (p, what)
    for i, a in enumerate(PICTURES):
        for b in PICTURES[i + 1 :]:
            assert bits_apart(originals[a], originals[b]) > 15, (a, b)


@pytest.mark.parametrize("name", HASHES)
def test_input_is_small_grey_and_default_metric_is_hamming(name: str) -> None:
    d = create_descriptor(name)
    assert d.input_spec.mode == "L"
    assert d.input_spec.size is None and d.input_spec.max_side == MIN_INPUT_SIDE == 64
    cls = get_descriptor_class(name)
    assert cls.default_metric == "hamming" and cls.binary and cls.nonnegative
    assert "hamming" in metrics_for(name)
    assert "hamming" not in metrics_for("color-hist")


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        ("ahash:hash_size=1", "hash_size"),
        ("dhash:hash_size=0", "hash_size"),
        ("phash:hash_size=65", "hash_size"),
        ("phash:highfreq_factor=0", "highfreq_factor"),
        ("whash:hash_size=6", "hash_size"),
        ("whash:image_scale=48", "image_scale"),
        ("whash:hash_size=16,image_scale=8", "image_scale"),
    ],
)
def test_bad_parameters_are_refused(spec: str, param: str) -> None:
    with pytest.raises(ValueError, match=param):
        create_descriptor(spec)


# -- the hamming metric ----------------------------------------------------------------------------
def random_bits(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((rows, dim)) < 0.5).astype(np.float32)


@pytest.mark.parametrize("dim", [1, 7, 64, 65, 200])
def test_hamming_equals_brute_force_count(dim: int) -> None:
    X, Y = random_bits(9, dim, seed=1), random_bits(13, dim, seed=2)
    Y[0] = X[0]
    expected = (X[:, None, :] != Y[None, :, :]).sum(axis=2)
    D = get_metric("hamming").pairwise(X, Y)
    assert D.dtype == np.float64 and D.shape == (9, 13)
    np.testing.assert_array_equal(D, expected)
    np.testing.assert_array_equal(pairwise_distances(X, Y, metric="hamming"), expected)
    # float64 and bool input give the same counts
    np.testing.assert_array_equal(get_metric("hamming").pairwise(X.astype(np.float64), Y), D)
    np.testing.assert_array_equal(get_metric("hamming").pairwise(X > 0.5, Y > 0.5), D)


def test_hamming_identity_symmetry_and_blocks() -> None:
    metric = get_metric("hamming")
    X, Y = random_bits(20, 64, seed=3), random_bits(31, 64, seed=4)
    assert np.all(np.diag(metric.pairwise(X)) == 0)
    np.testing.assert_array_equal(metric.pairwise(X, Y), metric.pairwise(Y, X).T)
    PX, PY = metric.prepare(X), metric.prepare(Y)
    full = metric.compare(PX, PY)
    picked = np.array([30, 0, 7])
    np.testing.assert_array_equal(metric.compare(take_rows(PX, slice(5, 9)), PY), full[5:9])
    np.testing.assert_array_equal(metric.compare(PX, take_rows(PY, picked)), full[:, picked])
    assert metric.binary and metric.symmetric


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, 255.0])
def test_hamming_refuses_values_other_than_0_and_1(bad: float) -> None:
    X = random_bits(4, 16)
    X[2, 3] = bad
    with pytest.raises(ValueError, match=r"binary vectors \(0/1") as err:
        get_metric("hamming").pairwise(X)
    assert f"the value {bad}" in str(err.value)


def test_popcount_table_fallback_matches_numpy() -> None:
    W = pack_bits(random_bits(50, 130, seed=5))
    x = W[:, None, :] ^ W[None, :, :]
    expected = (random_bits(50, 130, seed=5)[:, None] != random_bits(50, 130, seed=5)[None]).sum(2)
    np.testing.assert_array_equal(table_popcount(x).sum(axis=2), expected)


def test_exact_index_ranks_by_hamming() -> None:
    X = random_bits(500, 64, seed=6)
    Q = X[[3, 77]].copy()
    Q[0, :5] = 1 - Q[0, :5]  # 5 bits away from row 3
    index = ExactIndex("hamming", dim=64, block_rows=64)
    index.add(np.arange(500), X)
    d, i = index.search(Q, 3)
    assert i[0, 0] == 3 and d[0, 0] == 5
    assert i[1, 0] == 77 and d[1, 0] == 0
    full = (Q[:, None, :] != X[None, :, :]).sum(axis=2)
    np.testing.assert_array_equal(d, np.sort(full, axis=1)[:, :3])
