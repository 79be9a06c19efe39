"""The fusion descriptor: several descriptors' blocks, each normalised and weighted, concatenated.

Specs must survive the registry's ``name:k=v,k=v`` parsing and be canonical; each block must be
the part's own vector (as the pipeline extracts it alone) after the documented embedding; the
squared distance must be the weighted sum of the blocks' distances; and on a set whose classes
are colour AND texture, fusion must find what neither part finds alone.
"""

from __future__ import annotations

import math
from functools import cache
from typing import ClassVar

import cv2
import numpy as np
import pytest
from skimage import data

from cbir import images
from cbir.extraction import Task, extract_chunk
from cbir.features import Descriptor, create_descriptor, metrics_for
from cbir.features import registry as registry_module
from cbir.features.fusion import Fusion
from cbir.images import InputSpec
from cbir.metrics import pairwise_distances


# -- images ------------------------------------------------------------------------------------
@cache
def natural(name: str, side: int) -> np.ndarray:
    """A skimage sample picture (RGB) with its longer side ``side`` px (cached)."""
    rgb = getattr(data, name)()
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def sample_images() -> list[np.ndarray]:
    """A few different RGB images of different sizes, all at most 128 px a side."""
    rng = np.random.default_rng(7)
    return [
        natural("astronaut", 128),
        natural("coffee", 120),
        natural("chelsea", 100),
        natural("astronaut", 128)[::-1, ::-1].copy(),
        rng.integers(0, 256, (90, 70, 3), dtype=np.uint8),
        np.full((64, 64, 3), 128, np.uint8),  # flat: HOG gives a zero vector
    ]


def pipeline_vectors(specs: list[str], image: np.ndarray) -> dict[str, np.ndarray]:
    """What indexing stores for ``image`` under each spec (one decode, arrays per descriptor)."""
    task = Task(path="x", specs=tuple(specs), array=image)
    (update,) = extract_chunk([task], images.Limits(max_pixels=10**9))
    assert update.status == "ok", update.reason
    return update.vectors


# -- the embedding as documented, written out independently of the module ----------------------
def hellinger_embedding(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return np.sqrt(v / v.sum()) if v.sum() > 0 else np.full(v.shape, 1 / math.sqrt(v.size))


def l2_embedding(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def sign_embedding(v: np.ndarray) -> np.ndarray:
    return (2.0 * v.astype(np.float64) - 1.0) / math.sqrt(v.size)


EMBEDDING = {"hellinger": hellinger_embedding, "l2": l2_embedding, "sign": sign_embedding}


# -- specs -------------------------------------------------------------------------------------
def test_default_spec_round_trips_and_lists_every_part_parameter() -> None:
    d = create_descriptor("fusion")
    assert isinstance(d, Fusion)
    assert [p.name for p in d.part_descriptors] == ["color-regional", "lbp", "hog"]
    assert d.spec == (
        "fusion:parts=color-regional[space=hsv;bins=9x3x3;max_side=128]"
        "+lbp[P=8;R=1.0;method=uniform]"
        "+hog[size=128;orientations=9;pixels_per_cell=16;cells_per_block=2;block_norm=L2-Hys],"
        "weights=1.0x1.0x1.0,norm=auto"
    )
    again = create_descriptor(d.spec)
    assert again.spec == d.spec and again.get_params() == d.get_params()
    assert d.dim == again.dim == 405 + 10 + 1764 == sum(p.dim for p in d.part_descriptors)
    assert Fusion().dim == d.dim  # `cbir descriptors` instantiates with the defaults


def test_spellings_of_the_same_fusion_give_the_same_spec() -> None:
    spellings = [
        "fusion:parts=hsv-hist+lbp[R=2;P=16],weights=2x1",
        " fusion : parts = color-hist[bins=8x12x3] + lbp[ P=16 ; R=2.0; method=uniform ] ,"
        " weights=1x0.5, norm=AUTO",
        "fusion:parts=color-hist[space=hsv;max_side=128]+lbp[P=16;R=2],weights=4x2",
    ]
    specs = {create_descriptor(s).spec for s in spellings}
    from_python = Fusion(parts=["color-hist", "lbp:P=16,R=2"], weights=(6, 3))
    specs.add(from_python.spec)
    assert specs == {
        "fusion:parts=color-hist[space=hsv;bins=8x12x3;max_side=128]"
        "+lbp[P=16;R=2.0;method=uniform],weights=1.0x0.5,norm=auto"
    }
    (spec,) = specs
    # the label in reports: only what differs from the defaults, still the same fusion
    short = create_descriptor(spec).short_spec
    assert short == "fusion:parts=color-hist+lbp[P=16;R=2.0],weights=1.0x0.5"
    assert create_descriptor(short).spec == spec
    lbp = create_descriptor(spec).part_descriptors[1]
    assert (lbp.P, lbp.R, lbp.method) == (16, 2.0, "uniform")  # part parameters survive
    assert create_descriptor(spec).spec == spec


def test_weights_from_cli_text() -> None:
    # one weight means the same weight for every part, like the default
    assert create_descriptor("fusion:weights=3").weights == (1.0, 1.0, 1.0)
    assert create_descriptor("fusion:weights=3").spec == create_descriptor("fusion").spec
    d = create_descriptor("fusion:parts=color-hist+lbp,weights=0.25x1")
    assert d.weights == (0.25, 1.0)
    assert create_descriptor("fusion:parts=color-hist+lbp,weights=1x3").weights == (0.333333, 1.0)
    assert create_descriptor("fusion:parts=color-hist+lbp,weights=0x2").weights == (0.0, 1.0)
    assert create_descriptor("fusion:parts=lbp+hog,norm=l2").block_kinds == ["l2", "l2"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fusion:parts=lbp", r"at least 2 parts.*parts are separated by '\+'"),
        ("fusion:parts=lbp+sift", r"unknown descriptor 'sift'; registered descriptors: .*hog"),
        ("fusion:parts=lbp++hog", "empty part"),
        ("fusion:parts=lbp[P=16+hog", r"'\[' is never closed"),
        ("fusion:parts=lbp]+hog", r"'\]' without '\['"),
        ("fusion:parts=lbp[P=[16]]+hog", "cannot nest"),
        ("fusion:parts=lbp[P=16]x+hog", r"name\[k=v;k=v\]"),
        ("fusion:parts=lbp[P=1]+hog", r"fusion part 'lbp\[P=1\]': P .*2\.\.32"),
        ("fusion:parts=lbp[Q=1]+hog", r"no parameter 'Q'.*P=8"),
        ("fusion:parts=lbp+fusion", "cannot be a fusion"),
        ("fusion:parts=lbp+fusion[parts=hog+fotf]", "cannot be a fusion"),
        ("fusion:parts=lbp+hog+lbp[R=1]", "listed twice.*weight"),
        ("fusion:parts=lbp+hog,weights=1x2x3", r"3 values but there are 2 parts.*weights=1x1"),
        ("fusion:parts=lbp+hog,weights=0x0", r">= 0, at least one of them > 0; got 0x0"),
        ("fusion:parts=lbp+hog,weights=-1x2", r">= 0.*got -1x2"),
        ("fusion:parts=lbp+hog,weights=nanx1", "finite"),
        ("fusion:parts=lbp+hog,weights=axb", r"'weights'.*a tuple like"),
        ("fusion:parts=lbp+hog,norm=max", "norm must be one of auto, l2"),
    ],
)
def test_bad_specs_say_what_is_wrong_and_what_is_allowed(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_descriptor(spec)


class _NeedsFit(Descriptor):
    """Test-only descriptor that must be fitted unless its fitted step is switched off."""

    name = "needs-fit"
    nonnegative: ClassVar[bool] = False

    def __init__(self, center: bool = True) -> None:
        self.center = bool(center)

    @property
    def requires_fit(self) -> bool:  # type: ignore[override]
        return self.center

    @property
    def dim(self) -> int:
        return 3

    def transform_one(self, image: np.ndarray) -> np.ndarray:
        return np.asarray(image, np.float32).mean(axis=(0, 1))[:3]


def test_parts_that_need_fitting_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry_module._REGISTRY, "needs-fit", _NeedsFit)
    with pytest.raises(ValueError, match=r"needs-fit:center=true.*fitted.*no fitting: .*lbp"):
        create_descriptor("fusion:parts=lbp+needs-fit")
    # with its fitted step off it is a plain descriptor, and a valid part
    d = create_descriptor("fusion:parts=lbp+needs-fit[center=false]")
    assert d.spec.startswith("fusion:parts=lbp[P=8;R=1.0;method=uniform]+needs-fit[center=false]")


def test_input_spec_asks_for_what_every_part_needs() -> None:
    assert create_descriptor("fusion").input_spec == InputSpec(mode="RGB", max_side=256)
    # all grey parts: one grey array is enough
    assert create_descriptor("fusion:parts=lbp+fotf").input_spec == InputSpec("L", 256)
    # an exact size counts its longer side, as the pipeline's decode does
    spec = create_descriptor("fusion:parts=color-hist+hog[size=300]").input_spec
    assert spec == InputSpec(mode="RGB", max_side=300)


def test_class_flags_and_metrics() -> None:
    assert not Fusion.nonnegative and not Fusion.binary and not Fusion.requires_fit
    assert Fusion.default_metric == "euclidean"
    usable = metrics_for("fusion")
    assert {"euclidean", "sqeuclidean", "cosine"} <= set(usable)
    assert "hellinger" not in usable and "hamming" not in usable
    x = create_descriptor("fusion:parts=lbp+fotf").transform([natural("coffee", 96)])
    assert (x < 0).any()  # fotf's skewness block is signed, so the fusion is too


# -- vectors -----------------------------------------------------------------------------------
def test_shape_dtype_determinism_and_unit_length() -> None:
    d = create_descriptor("fusion")
    images = sample_images()
    X = d.transform(images)
    assert X.shape == (len(images), d.dim) and X.dtype == np.float32
    np.testing.assert_array_equal(X, create_descriptor(d.spec).transform(images))
    for row, image in zip(X, images, strict=True):
        np.testing.assert_array_equal(d.transform_one(image), row)
    norms = np.linalg.norm(X.astype(np.float64), axis=1)
    np.testing.assert_allclose(norms[:-1], 1.0, rtol=1e-6)
    # the flat image's HOG block is zero: the two histogram blocks keep their 2/3 of the mass
    np.testing.assert_allclose(norms[-1], math.sqrt(2 / 3), rtol=1e-6)
    assert d.transform([]).shape == (0, d.dim)
    gray = cv2.cvtColor(images[0], cv2.COLOR_RGB2GRAY)  # grey in: parts get grey-as-RGB
    assert d.transform_one(gray).shape == (d.dim,)
    with pytest.raises(ValueError, match="uint8"):
        d.transform_one(images[0].astype(np.float32))


@pytest.mark.parametrize(
    ("spec", "kinds"),
    [
        ("fusion", ["hellinger", "hellinger", "l2"]),
        (
            "fusion:parts=color-hist[space=lab;bins=4x4x4]+glcm+ahash+lbp[P=16;R=2],"
            "weights=1x2x0.5x3",
            ["hellinger", "l2", "sign", "hellinger"],
        ),
        ("fusion:parts=color-hist+hog[size=64;pixels_per_cell=8]+dhash,norm=l2", ["l2"] * 3),
    ],
)
def test_each_block_is_the_parts_own_vector_embedded_and_scaled(
    spec: str, kinds: list[str]
) -> None:
    d = create_descriptor(spec)
    assert d.block_kinds == kinds
    total = sum(d.weights)
    for image in sample_images():
        # images no larger than every part's side: the arrays are the same, so are the vectors
        vectors = pipeline_vectors([d.spec] + [p.spec for p in d.part_descriptors], image)
        fused = vectors[d.spec]
        parts = zip(d.part_descriptors, d.block_slices, kinds, d.weights, strict=True)
        for part, block, kind, w in parts:
            expected = EMBEDDING[kind](vectors[part.spec]) * math.sqrt(w / total)
            np.testing.assert_allclose(fused[block], expected, rtol=1e-5, atol=1e-7)


def test_blocks_stay_close_to_the_parts_own_vectors_on_a_large_image() -> None:
    # 400 px: the fusion gets a 256 px array and shrinks it again for 128 px parts, where a part
    # alone is shrunk from 400 px at once, so the two resampling paths differ slightly
    d = create_descriptor("fusion")
    image = natural("astronaut", 400)[:256]
    vectors = pipeline_vectors([d.spec] + [p.spec for p in d.part_descriptors], image)
    for part, block, kind, scale in zip(
        d.part_descriptors, d.block_slices, d.block_kinds, d.scales, strict=True
    ):
        unit = vectors[d.spec][block] / scale
        distance = np.linalg.norm(unit - EMBEDDING[kind](vectors[part.spec]))
        if part.name == "lbp":  # 256 px, the fusion's own side: the same array
            assert distance < 1e-5
        else:
            assert distance < 0.15  # unit blocks: unrelated images are ~0.5-1.4 apart


def test_zero_weight_ignores_the_part() -> None:
    images = sample_images()
    X = create_descriptor("fusion:parts=color-hist+lbp,weights=1x0").transform(images)
    assert not X[:, 288:].any()
    # the distance is the colour histograms' Hellinger distance (times sqrt 2), texture unseen
    H = pairwise_distances(create_descriptor("color-hist").transform(images), metric="hellinger")
    np.testing.assert_allclose(pairwise_distances(X), math.sqrt(2) * H, atol=1e-6)
    # changing only the texture (a shuffled copy keeps the colours) does not move the vector
    rng = np.random.default_rng(0)
    image = natural("coffee", 100)
    shuffled = rng.permutation(image.reshape(-1, 3)).reshape(image.shape)
    both = create_descriptor("fusion:parts=color-hist+lbp,weights=1x0").transform([image, shuffled])
    np.testing.assert_array_equal(both[0], both[1])


def test_squared_distance_is_the_weighted_sum_of_the_blocks_distances() -> None:
    d = create_descriptor("fusion:parts=color-hist+hog+ahash+glcm,weights=3x1x2x0.5")
    specs = [d.spec] + [p.spec for p in d.part_descriptors]
    # not the flat image: its zero HOG block has no direction
    vectors = [pipeline_vectors(specs, image) for image in sample_images()[:-1]]
    fused, color, hog, ahash, glcm = (np.stack([v[s] for v in vectors]) for s in specs)
    D2 = pairwise_distances(fused, metric="sqeuclidean")
    # each part's squared block distance, from the parts' own vectors and the registered metrics
    block_d2 = [
        2 * pairwise_distances(color, metric="hellinger") ** 2,
        2 * pairwise_distances(hog, metric="cosine"),
        4 * pairwise_distances(ahash, metric="hamming") / ahash.shape[1],
        2 * pairwise_distances(glcm, metric="cosine"),
    ]
    weights = np.array([3, 1, 2, 0.5]) / 6.5
    expected = sum(w * b for w, b in zip(weights, block_d2, strict=True))
    np.testing.assert_allclose(D2, expected, atol=2e-6)
    assert expected.max() > 0.5  # the check is not between near-identical vectors


# -- retrieval ---------------------------------------------------------------------------------
HUES = (12, 100)  # OpenCV hue (0..179): orange and blue
TEXTURES = ("fine", "coarse")


def colour_texture_image(hue: int, texture: str, rng: np.random.Generator) -> np.ndarray:
    """64 px of one hue at two brightness levels laid out as fine noise or 8 px blocks.

    The fraction of bright pixels varies per image, not per class, so a colour histogram sees
    the hue but not the layout, and LBP (grey, brightness-invariant) the layout but not the hue.
    """
    bright = rng.uniform(0.3, 0.7)
    if texture == "fine":
        mask = rng.random((64, 64)) < bright
    else:
        mask = np.kron(rng.random((8, 8)) < bright, np.ones((8, 8), bool))
    hsv = np.empty((64, 64, 3), np.uint8)
    hsv[..., 0] = hue + rng.integers(-3, 4)
    hsv[..., 1] = 200 + rng.integers(-8, 9)
    hsv[..., 2] = np.where(mask, 235, 150) + rng.integers(-5, 6)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def neighbours(spec: str, images: list[np.ndarray], k: int) -> np.ndarray:
    d = create_descriptor(spec)
    X = d.transform(images)
    D = pairwise_distances(X, X, d.default_metric)
    np.fill_diagonal(D, np.inf)
    return np.argsort(D, axis=1, kind="stable")[:, :k]


def test_fusion_separates_classes_that_need_colour_and_texture() -> None:
    rng = np.random.default_rng(0)
    images, hues, textures = [], [], []
    for hue in HUES:
        for texture in TEXTURES:
            for _ in range(5):
                images.append(colour_texture_image(hue, texture, rng))
                hues.append(hue)
                textures.append(texture)
    hue, texture = np.array(hues), np.array(textures)
    labels = np.array([f"{h}-{t}" for h, t in zip(hue, texture, strict=True)])

    def precision(nn: np.ndarray, y: np.ndarray) -> float:  # P@4: 4 right answers per query
        return float((y[nn] == y[:, None]).mean())

    colour = neighbours("color-hist", images, 4)
    assert precision(colour, hue) == 1.0 and precision(colour, labels) < 0.7  # texture unseen
    lbp = neighbours("lbp", images, 4)
    assert precision(lbp, texture) == 1.0 and precision(lbp, labels) < 0.7  # hue unseen
    assert precision(neighbours("fusion:parts=color-hist+lbp", images, 4), labels) == 1.0
