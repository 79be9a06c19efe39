"""Near-duplicate grouping: pigeonhole candidates must find exactly the brute-force components,
and a collection's exact and near duplicates come out by path, through the API and the CLI."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from skimage import data
from typer.testing import CliRunner

import cbir.duplicates as dup
from cbir.cli import app
from cbir.collection import Collection
from cbir.config import Settings
from cbir.duplicates import collection_duplicates, find_duplicates, max_distance


def brute_force(H: np.ndarray, threshold: int) -> list[list[int]]:
    """Components of the dense "within threshold" graph, as find_duplicates orders them."""
    B = (np.asarray(H) != 0).astype(np.float32)
    ones = B.sum(axis=1)
    dist = ones[:, None] + ones[None, :] - 2 * (B @ B.T)  # |x| + |y| - 2 x.y, exact in float32
    _, labels = connected_components(csr_matrix(dist <= threshold), directed=False)
    groups = [np.flatnonzero(labels == k).tolist() for k in range(labels.max() + 1)]
    return sorted((g for g in groups if len(g) >= 2), key=lambda g: g[0])


def flip(h: np.ndarray, positions: list[int] | np.ndarray) -> np.ndarray:
    out = h.copy()
    out[positions] = 1 - out[positions]
    return out


def random_bits(rows: int, bits: int = 64, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((rows, bits)) < 0.5).astype(np.float32)


def clustered(n: int, bits: int, flip_rate: float, seed: int) -> np.ndarray:
    """Hashes around n // 5 centres, each bit flipped with ``flip_rate``: many near pairs."""
    rng = np.random.default_rng(seed)
    centres = rng.random((max(1, n // 5), bits)) < 0.5
    H = centres[rng.integers(0, len(centres), n)] ^ (rng.random((n, bits)) < flip_rate)
    return H.astype(np.float32)


# -- find_duplicates -------------------------------------------------------------------------------
def test_planted_groups_are_found_exactly() -> None:
    rng = np.random.default_rng(1)
    H = random_bits(300, seed=2)  # unrelated hashes: ~32 bits apart, never within 6
    H[10] = flip(H[3], rng.choice(64, 6, replace=False))  # at the threshold
    H[200] = flip(H[3], rng.choice(64, 2, replace=False))
    H[50] = H[40]  # identical hashes
    H[51] = flip(H[40], [0])
    H[120] = flip(H[7], rng.choice(64, 7, replace=False))  # one bit too far: no group
    assert find_duplicates(H, 6) == [[3, 10, 200], [40, 50, 51]]
    assert find_duplicates(H, 7) == [[3, 10, 200], [7, 120], [40, 50, 51]]


def test_chains_are_joined() -> None:
    H = random_bits(50, seed=3)
    H[20] = flip(H[5], [0, 1, 2, 3])  # a~b: 4 bits
    H[30] = flip(H[20], [10, 11, 12, 13])  # b~c: 4 bits, but a and c are 8 apart
    assert find_duplicates(H, 5) == [[5, 20, 30]]
    assert max_distance(H[[5, 20, 30]]) == 8
    assert find_duplicates(H, 3) == []


def test_no_false_groups_among_unrelated_hashes() -> None:
    H = random_bits(3000, seed=4)
    assert find_duplicates(H, 6) == brute_force(H, 6) == []


def test_threshold_zero_groups_identical_hashes_only() -> None:
    H = random_bits(100, seed=5)
    H[[9, 60, 99]] = H[1]
    H[70] = flip(H[1], [5])
    assert find_duplicates(H, 0) == [[1, 9, 60, 99]]
    assert find_duplicates(H, 1) == [[1, 9, 60, 70, 99]]


@pytest.mark.parametrize("threshold", [0, 1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize(("n", "bits", "rate"), [(300, 64, 0.05), (250, 100, 0.08), (120, 16, 0.1)])
def test_equals_brute_force(n: int, bits: int, rate: float, threshold: int) -> None:
    H = clustered(n, bits, rate, seed=n + bits + threshold)
    assert find_duplicates(H, threshold) == brute_force(H, threshold)


def test_long_blocks_span_several_words() -> None:
    """130 bits at threshold 1: two pigeonhole blocks of 65 bits, keys of two 64-bit words."""
    H = clustered(200, 130, 0.006, seed=6)
    for threshold in (0, 1, 2):
        assert find_duplicates(H, threshold) == brute_force(H, threshold)


def test_big_bucket_is_compared_densely_and_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashes that all agree on one pigeonhole block form one bucket above DENSE_BUCKET."""
    rng = np.random.default_rng(7)
    n = 400
    H = random_bits(n, seed=8)
    H[:, ::2] = 0  # threshold 1 -> blocks are the even and the odd bits: one bucket of 400
    for i, j in [(3, 150), (10, 399), (200, 201)]:
        H[j] = flip(H[i], [2 * rng.integers(0, 32) + 1])  # one odd bit apart
    assert n > dup.DENSE_BUCKET
    expected = brute_force(H, 1)
    assert [3, 150] in expected and [10, 399] in expected
    assert find_duplicates(H, 1) == expected
    monkeypatch.setattr(dup, "_DENSE_CHUNK", 1000)  # many small dense steps
    assert find_duplicates(H, 1) == expected
    monkeypatch.setattr(dup, "DENSE_BUCKET", 10**6)  # the pair-by-pair path instead
    assert find_duplicates(H, 1) == expected


def test_many_identical_hashes_are_one_node() -> None:
    H = np.zeros((20000, 64), np.float32)  # e.g. 20,000 black frames
    H[-1] = 1
    groups = find_duplicates(H, 6)
    assert len(groups) == 1 and len(groups[0]) == 19999


def test_component_merges_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dup, "_MERGE_EDGES", 1)  # merge after every batch of edges
    H = clustered(300, 64, 0.05, seed=9)
    assert find_duplicates(H, 6) == brute_force(H, 6)


def test_threshold_at_least_the_hash_length_joins_everything() -> None:
    H = random_bits(10, bits=8, seed=10)
    assert find_duplicates(H, 8) == [list(range(10))]
    assert find_duplicates(H[:1], 3) == []


@pytest.mark.parametrize(
    ("hashes", "threshold", "message"),
    [
        (np.full((3, 8), 0.5), 2, "binary vectors"),
        (np.zeros(8), 2, r"\(n, bits\)"),
        (np.zeros((3, 8)), -1, "non-negative"),
        (np.zeros((3, 8)), 2.5, "non-negative"),
        (np.zeros((3, 8)), True, "non-negative"),
    ],
)
def test_bad_input_is_refused(hashes: np.ndarray, threshold: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        find_duplicates(hashes, threshold)  # type: ignore[arg-type]


# -- a collection's duplicates, through the API and the CLI ----------------------------------------
def _small(rgb: np.ndarray, side: int = 160) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = side / max(h, w)
    return cv2.resize(rgb, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)


def _save(rgb: np.ndarray, path: Path, **options: int) -> None:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG" if path.suffix == ".jpg" else "PNG", **options)
    path.write_bytes(buffer.getvalue())


@pytest.fixture
def copies(tmp_path: Path) -> Path:
    """Originals plus re-encoded, resized and byte-identical copies."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    astronaut = _small(data.astronaut())
    coffee = _small(data.coffee())
    camera = _small(np.stack([data.camera()] * 3, axis=-1))
    chelsea = _small(data.chelsea())
    _save(astronaut, root / "astronaut.png")
    _save(astronaut, root / "sub" / "astronaut-q75.jpg", quality=75)
    _save(_small(astronaut, 128), root / "astronaut-small.png")
    _save(coffee, root / "coffee.png")
    _save(_small(coffee, 200), root / "sub" / "coffee-big.jpg", quality=90)
    _save(camera, root / "camera.png")
    shutil.copy(root / "camera.png", root / "sub" / "camera-copy.png")  # same bytes
    _save(chelsea, root / "chelsea.png")  # no copy
    return root


def _index(root: Path, col_dir: Path, descriptors: list[str]) -> Collection:
    col = Collection(col_dir, settings=Settings(collection=col_dir, workers=1))
    col.add(root, descriptors=descriptors)
    return col


def test_collection_duplicates_finds_the_planted_groups(copies: Path, tmp_path: Path) -> None:
    col = _index(copies, tmp_path / "col", ["phash", "dhash"])
    groups = collection_duplicates(col, "phash")
    found = [(g.kind, [Path(p).relative_to(copies).as_posix() for p in g.paths]) for g in groups]
    assert found == [
        ("exact", ["camera.png", "sub/camera-copy.png"]),
        ("near", ["astronaut-small.png", "astronaut.png", "sub/astronaut-q75.jpg"]),
        ("near", ["coffee.png", "sub/coffee-big.jpg"]),
    ]
    assert groups[0].max_distance == 0
    assert all(0 <= g.max_distance <= 6 for g in groups)
    assert [len(g.ids) for g in groups] == [2, 3, 2]
    # another hash finds the same copies
    assert [g.paths for g in collection_duplicates(col, "dhash")] == [g.paths for g in groups]
    # threshold 0: identical files and copies whose hashes are identical, nothing else
    strict = collection_duplicates(col, "phash", threshold=0)
    assert strict[0] == groups[0] and all(g.max_distance == 0 for g in strict)
    assert [g.paths for g in strict] == [g.paths for g in groups if g.max_distance == 0]
    col.close()


def test_collection_without_hashes_says_how_to_add_them(copies: Path, tmp_path: Path) -> None:
    col = _index(copies, tmp_path / "col", ["ahash"])
    with pytest.raises(ValueError, match="index it with: cbir index DIR -d phash"):
        collection_duplicates(col)
    with pytest.raises(ValueError, match="not a binary hash"):
        collection_duplicates(col, "color-hist")
    assert collection_duplicates(col, "ahash")[0].kind == "exact"
    col.close()


def test_cli_duplicates(copies: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"CBIR_WORKERS": "1"}
    col = tmp_path / "col"
    done = runner.invoke(
        app, ["index", str(copies), "-d", "phash", "-c", str(col), "--json"], env=env
    )
    assert done.exit_code == 0, done.output

    result = runner.invoke(app, ["duplicates", "-c", str(col), "--json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["threshold"] == 6 and report["images"] == 8
    assert report["descriptor"] == "phash"  # its short label: default parameters
    assert (report["exact_groups"], report["near_groups"]) == (1, 2)
    sizes = [(g["kind"], g["size"], len(g["images"])) for g in report["groups"]]
    assert sizes == [("exact", 2, 2), ("near", 3, 3), ("near", 2, 2)]
    assert report["groups"][0]["images"][0]["path"] == str(copies.resolve() / "camera.png")

    text = runner.invoke(app, ["duplicates", "-c", str(col)], env=env)
    assert text.exit_code == 0, text.output
    assert "1 group of identical files and 2 groups of near duplicates" in text.output
    for name in ("camera-copy.png", "astronaut-q75.jpg", "coffee-big.jpg", "astronaut-small.png"):
        assert name in text.output
    assert "chelsea" not in text.output

    missing = runner.invoke(app, ["duplicates", "-c", str(col), "-d", "whash"], env=env)
    assert missing.exit_code == 2
    assert "index it with: cbir index DIR -d whash" in " ".join(missing.output.split())
