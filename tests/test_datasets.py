"""Tests for cbir.evaluation.datasets: every file (PNG trees, tables, CIFAR pickles, IDX files,
qrels) is written here under tmp_path; no real dataset is used."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.evaluation.datasets import (
    LabelledSet,
    Relevance,
    from_cifar_batches,
    from_folders,
    from_mnist_idx,
    from_qrels,
    from_table,
    load_labelled,
)

# -- helpers -------------------------------------------------------------------------------------


def write_png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path)
    return path


def cifar_batch(rng: np.random.Generator, labels: list[int]) -> dict[bytes, object]:
    return {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8),
        b"labels": labels,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }


def write_pickle(path: Path, obj: object, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def write_cifar(
    folder: Path, train: list[list[int]], test: list[int] | None, protocol: int = 2, seed: int = 0
) -> dict[str, list[dict[bytes, object]]]:
    """``batches.meta`` with three classes, ``data_batch_<n>`` per list in ``train``, and
    ``test_batch``; returns the written dicts so tests can check pixels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {b"label_names": [b"airplane", b"cat", b"dog"], b"num_vis": 3072}
    write_pickle(folder / "batches.meta", meta, protocol)
    written: dict[str, list[dict[bytes, object]]] = {"train": [], "test": []}
    for n, labels in enumerate(train, 1):
        batch = cifar_batch(rng, labels)
        write_pickle(folder / f"data_batch_{n}", batch, protocol)
        written["train"].append(batch)
    if test is not None:
        batch = cifar_batch(rng, test)
        write_pickle(folder / "test_batch", batch, protocol)
        written["test"].append(batch)
    return written


def expected_image(row: np.ndarray) -> np.ndarray:
    """The CIFAR layout spelled out: 1024 red, then 1024 green, then 1024 blue, row-major."""
    out = np.zeros((32, 32, 3), dtype=np.uint8)
    for channel in range(3):
        for y in range(32):
            for x in range(32):
                out[y, x, channel] = row[channel * 1024 + y * 32 + x]
    return out


def idx_bytes(magic: int, dims: tuple[int, ...], data: bytes) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + data


def write_idx(path: Path, magic: int, dims: tuple[int, ...], data: bytes) -> Path:
    raw = idx_bytes(magic, dims, data)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def write_mnist(
    folder: Path, prefix: str, images: np.ndarray, labels: list[int], gz: bool
) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    n, rows, cols = images.shape
    img = write_idx(
        folder / f"{prefix}-images-idx3-ubyte{ext}", 0x803, (n, rows, cols), images.tobytes()
    )
    lab = write_idx(
        folder / f"{prefix}-labels-idx1-ubyte{ext}", 0x801, (len(labels),), bytes(labels)
    )
    return img, lab


def brute_matrix(qlabels, clabels, query_index, ranked) -> np.ndarray:
    return np.array(
        [
            [j >= 0 and bool(qlabels[q] & clabels[j]) for j in row]
            for q, row in zip(query_index, ranked, strict=True)
        ],
        dtype=bool,
    ).reshape(np.shape(ranked))


def brute_counts(qlabels, clabels, query_index, exclude_self=False) -> np.ndarray:
    return np.array(
        [
            sum(
                1 for j, c in enumerate(clabels) if qlabels[q] & c and not (exclude_self and j == q)
            )
            for q in query_index
        ]
    )


def random_label_sets(rng, n, vocabulary, max_labels, empty_share=0.1) -> list[frozenset[str]]:
    out = []
    for _ in range(n):
        if rng.random() < empty_share:
            out.append(frozenset())
        else:
            k = int(rng.integers(1, max_labels + 1))
            out.append(frozenset(rng.choice(vocabulary, size=k, replace=False).tolist()))
    return out


# -- LabelledSet ---------------------------------------------------------------------------------


def test_labelled_set_basics():
    s = LabelledSet(
        "demo",
        ["/a.png", "/b.png", "/c.png", "/d.png"],
        [frozenset({"dog", "cat"}), frozenset({"cat"}), frozenset(), "bird"],  # type: ignore[list-item]
        ["a", "b", "c", "d"],
    )
    assert len(s) == 4
    assert s.labels[3] == frozenset({"bird"})  # a bare string is one label, not its letters
    assert s.classes() == ["bird", "cat", "dog"]
    assert s.primary_labels() == ["cat", "cat", "", "bird"]
    sub = s.subset([3, 0])
    assert sub.ids == ["d", "a"] and sub.items == ["/d.png", "/a.png"]
    assert sub.labels == [frozenset({"bird"}), frozenset({"cat", "dog"})]
    masked = s.subset(np.array([False, True, True, False]))
    assert masked.ids == ["b", "c"]
    assert "items=4" in repr(s) and "/a.png" not in repr(s)
    assert len(s.subset([])) == 0


def test_labelled_set_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        LabelledSet("x", ["/a"], [frozenset(), frozenset()], ["a"])
    with pytest.raises(ValueError, match=r"unique.*dup"):
        LabelledSet("x", ["/a", "/b"], [frozenset(), frozenset()], ["dup", "dup"])
    s = LabelledSet("x", ["/a"], [frozenset()], ["a"])
    with pytest.raises(ValueError, match="out of range"):
        s.subset([1])
    with pytest.raises(ValueError, match="mask"):
        s.subset(np.array([True, False]))


# -- folders -------------------------------------------------------------------------------------


def test_from_folders(tmp_path: Path):
    root = tmp_path / "photos"
    write_png(root / "cat" / "b.png")
    write_png(root / "cat" / "deeper" / "a.png")
    write_png(root / "dog" / "c.PNG")
    write_png(root / "loose.png")
    write_png(root / ".hidden" / "x.png")
    write_png(root / "dog" / ".x.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    s = from_folders(root)
    assert s.name == "photos"
    assert s.ids == ["cat/b.png", "cat/deeper/a.png", "dog/c.PNG", "loose.png"]
    assert s.labels == [frozenset({"cat"}), frozenset({"cat"}), frozenset({"dog"}), frozenset()]
    for item, name in zip(s.items, s.ids, strict=True):
        assert isinstance(item, str) and os.path.isabs(item)
        assert Path(item) == (root / name).resolve()
    assert s.classes() == ["cat", "dog"]


def test_from_folders_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_folders(tmp_path / "nope")
    write_png(tmp_path / "file.png")
    with pytest.raises(ValueError, match="not a folder"):
        from_folders(tmp_path / "file.png")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        from_folders(tmp_path / "empty")


# -- tables --------------------------------------------------------------------------------------


def test_from_table_csv(tmp_path: Path):
    for name in ("a.png", "b.png", "sub/c.png"):
        write_png(tmp_path / "imgs" / name)
    table = tmp_path / "imgs" / "labels.csv"
    table.write_text(
        "\ufeffPath,Labels,extra\n"
        "a.png,cat|pet,1\n"
        "b.png, dog ; pet ,2\n"
        "\n"
        "sub/c.png,,3\n"
        "./a.png,indoor,4\n",  # the same file again: labels are merged
        encoding="utf-8",
    )
    s = from_table(table)
    assert s.name == "labels"
    assert s.ids == ["a.png", "b.png", "sub/c.png"]
    assert s.labels == [
        frozenset({"cat", "pet", "indoor"}),
        frozenset({"dog", "pet"}),
        frozenset(),
    ]
    assert s.items[2] == str((tmp_path / "imgs" / "sub" / "c.png").resolve())


def test_from_table_csv_single_label_column_and_root(tmp_path: Path):
    write_png(tmp_path / "data" / "x.png")
    outside = write_png(tmp_path / "elsewhere" / "y.png")
    table = tmp_path / "tables" / "t.csv"
    table.parent.mkdir()
    table.write_text(f"path,label\nx.png,cat\n{outside},dog\n")
    s = from_table(table, root=tmp_path / "data")
    assert s.ids == ["x.png", outside.resolve().as_posix()]  # outside the root: absolute id
    assert s.labels == [frozenset({"cat"}), frozenset({"dog"})]


def test_from_table_csv_errors(tmp_path: Path):
    write_png(tmp_path / "a.png")
    no_header = tmp_path / "no_header.csv"
    no_header.write_text("a.png,cat\n")
    with pytest.raises(ValueError, match="header"):
        from_table(no_header)
    no_label = tmp_path / "no_label.csv"
    no_label.write_text("path,class\na.png,cat\n")
    with pytest.raises(ValueError, match="'label'"):
        from_table(no_label)
    empty_path = tmp_path / "empty_path.csv"
    empty_path.write_text("path,label\n,cat\n")
    with pytest.raises(ValueError, match=r"line 2.*empty"):
        from_table(empty_path)
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\na.png,x\n" + "".join(f"gone{i}.png,x\n" for i in range(7)))
    with pytest.raises(FileNotFoundError, match=r"7 listed file.*gone0\.png.*7 in all") as info:
        from_table(missing)
    assert "gone6" not in str(info.value)  # only the first few are listed
    with pytest.raises(FileNotFoundError):
        from_table(tmp_path / "absent.csv")
    (tmp_path / "t.txt").write_text("path,label\n")
    with pytest.raises(ValueError, match=r"\.csv or \.json"):
        from_table(tmp_path / "t.txt")
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("path,label\n")
    with pytest.raises(ValueError, match="no images"):
        from_table(header_only)


def test_from_table_json_forms(tmp_path: Path):
    for name in ("a.png", "b.png", "c.png"):
        write_png(tmp_path / name)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"a.png": "cat", "b.png": ["dog", "pet"], "c.png": []}))
    s = from_table(mapping)
    assert s.ids == ["a.png", "b.png", "c.png"]
    assert s.labels == [frozenset({"cat"}), frozenset({"dog", "pet"}), frozenset()]
    listing = tmp_path / "list.json"
    listing.write_text(
        json.dumps([{"path": "b.png", "labels": ["x", "y"]}, {"path": "a.png", "label": "z"}])
    )
    s = from_table(listing)
    assert s.ids == ["b.png", "a.png"]
    assert s.labels == [frozenset({"x", "y"}), frozenset({"z"})]


def test_from_table_json_errors(tmp_path: Path):
    write_png(tmp_path / "a.png")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        from_table(bad)
    bad.write_text(json.dumps([{"labels": ["x"]}]))
    with pytest.raises(ValueError, match=r"entry 0.*'path'"):
        from_table(bad)
    bad.write_text(json.dumps({"a.png": 3}))
    with pytest.raises(ValueError, match="string or a list of strings"):
        from_table(bad)
    bad.write_text(json.dumps("a.png"))
    with pytest.raises(ValueError, match="expected"):
        from_table(bad)
    bad.write_text(json.dumps({"a.png": "x", "nope.png": "y"}))
    with pytest.raises(FileNotFoundError, match=r"nope.png"):
        from_table(bad)


# -- CIFAR ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 5])
def test_from_cifar_batches(tmp_path: Path, protocol: int):
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar(folder, train=[[0, 1], [2, 2, 1]], test=[1, 0], protocol=protocol)
    train = from_cifar_batches(folder)
    assert len(train) == 5 and train.name == "cifar-10-batches-py:train"
    assert train.ids[0] == "cifar-train-00000" and train.ids[4] == "cifar-train-00004"
    assert train.primary_labels() == ["airplane", "cat", "dog", "dog", "cat"]
    rows = np.concatenate([b[b"data"] for b in written["train"]])  # type: ignore[misc]
    for item, row in zip(train.items, rows, strict=True):
        assert isinstance(item, np.ndarray) and item.dtype == np.uint8
        assert item.shape == (32, 32, 3)
        np.testing.assert_array_equal(item, expected_image(row))
    test = from_cifar_batches(folder, split="test")
    assert test.ids == ["cifar-test-00000", "cifar-test-00001"]
    assert test.primary_labels() == ["cat", "airplane"]
    np.testing.assert_array_equal(test.items[1], expected_image(written["test"][0][b"data"][1]))  # type: ignore[index]


def test_cifar_train_batches_in_numeric_order(tmp_path: Path):
    folder = tmp_path / "c"
    write_cifar(folder, train=[[0]] * 10, test=None)
    (folder / "data_batch_1.bak").write_bytes(b"ignored")
    batches = {n: pickle.loads((folder / f"data_batch_{n}").read_bytes()) for n in range(1, 11)}
    s = from_cifar_batches(folder)
    assert len(s) == 10
    for i, n in enumerate(range(1, 11)):  # data_batch_10 comes last, not after data_batch_1
        np.testing.assert_array_equal(s.items[i], expected_image(batches[n][b"data"][0]))


def test_cifar_numpy1_pickles_are_read(tmp_path: Path):
    """Pickles written by numpy 1 name ``numpy.core.multiarray``; numpy 2 has ``numpy._core``."""
    folder = tmp_path / "c"
    written = write_cifar(folder, train=[[1, 2]], test=None, protocol=2)
    path = folder / "data_batch_1"
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    s = from_cifar_batches(folder)
    np.testing.assert_array_equal(s.items[1], expected_image(written["train"][0][b"data"][1]))  # type: ignore[index]


class _Payload:
    """Unpickling this runs ``os.mkdir(target)``: what a tampered CIFAR file could do."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar_pickles_cannot_run_code(tmp_path: Path):
    folder = tmp_path / "c"
    write_cifar(folder, train=[[0]], test=None)
    target = tmp_path / "pwned"
    evil = cifar_batch(np.random.default_rng(0), [0])
    evil[b"extra"] = _Payload(target)
    write_pickle(folder / "data_batch_1", evil)
    with pytest.raises(ValueError, match=r"data_batch_1 was not read.*mkdir"):
        from_cifar_batches(folder)
    assert not target.exists()
    pickle.loads(
        (folder / "data_batch_1").read_bytes()
    )  # the payload is real: plain pickle runs it
    assert target.is_dir()
    # protocol-2 bytes are rebuilt with _codecs.encode(..., "latin1"); no other codec is allowed
    raw = pickle.dumps({b"label_names": [b"a"]}, protocol=2)
    assert raw.count(b"latin1") == 1
    (folder / "batches.meta").write_bytes(raw.replace(b"latin1", b"rot_13"))
    with pytest.raises(ValueError, match="rot_13"):
        from_cifar_batches(folder)


def test_cifar_errors(tmp_path: Path):
    folder = tmp_path / "c"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_cifar_batches(folder)
    write_cifar(folder, train=[[0, 1]], test=None)
    with pytest.raises(ValueError, match="split"):
        from_cifar_batches(folder, split="valid")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="test_batch"):
        from_cifar_batches(folder, split="test")
    rng = np.random.default_rng(1)
    bad = cifar_batch(rng, [0, 1])
    bad[b"data"] = rng.integers(0, 256, size=(2, 1024), dtype=np.uint8)
    write_pickle(folder / "data_batch_1", bad)
    with pytest.raises(ValueError, match="3072"):
        from_cifar_batches(folder)
    bad = cifar_batch(rng, [0, 1])
    bad[b"labels"] = [0]
    write_pickle(folder / "data_batch_1", bad)
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        from_cifar_batches(folder)
    write_pickle(folder / "data_batch_1", cifar_batch(rng, [0, 7]))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        from_cifar_batches(folder)
    (folder / "data_batch_1").write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="not a readable CIFAR pickle"):
        from_cifar_batches(folder)
    write_pickle(folder / "data_batch_1", [1, 2, 3])
    with pytest.raises(ValueError, match="dict"):
        from_cifar_batches(folder)
    write_cifar(folder, train=[[0]], test=None)
    (folder / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match=r"batches.meta"):
        from_cifar_batches(folder)


# -- MNIST ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_from_mnist_idx(tmp_path: Path, gz: bool):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    img, lab = write_mnist(tmp_path, "t10k", images, [7, 0, 9], gz)
    s = from_mnist_idx(img, lab)
    assert s.name == "mnist-t10k"
    assert s.ids == ["mnist-t10k-00000", "mnist-t10k-00001", "mnist-t10k-00002"]
    assert s.labels == [frozenset({"7"}), frozenset({"0"}), frozenset({"9"})]
    for item, expected in zip(s.items, images, strict=True):
        assert isinstance(item, np.ndarray) and item.shape == (4, 5)
        np.testing.assert_array_equal(item, expected)
    s.items[0][0, 0] = 1  # plain writable arrays, not views of a read-only buffer


def test_mnist_errors(tmp_path: Path):
    images = np.zeros((3, 2, 2), dtype=np.uint8)
    img, lab = write_mnist(tmp_path, "train", images, [1, 2, 3], gz=False)
    with pytest.raises(ValueError, match=r"magic number 0x00000801.*0x00000803.*swapped"):
        from_mnist_idx(lab, img)
    bad = write_idx(tmp_path / "bad-images-idx3-ubyte", 0x0D03, (3, 2, 2), bytes(12))
    with pytest.raises(ValueError, match="magic number 0x00000D03"):
        from_mnist_idx(bad, lab)
    short = write_idx(tmp_path / "short-images-idx3-ubyte", 0x803, (3, 2, 2), bytes(11))
    with pytest.raises(ValueError, match=r"3 x 2 x 2 = 12 bytes.*holds 11"):
        from_mnist_idx(short, lab)
    long = write_idx(tmp_path / "long-labels-idx1-ubyte.gz", 0x801, (3,), bytes(4))
    with pytest.raises(ValueError, match=r"3 = 3 bytes.*holds 4"):
        from_mnist_idx(img, long)
    few = write_idx(tmp_path / "few-labels-idx1-ubyte", 0x801, (2,), bytes(2))
    with pytest.raises(ValueError, match=r"3 images but.*2 labels"):
        from_mnist_idx(img, few)
    cut = tmp_path / "cut-images-idx3-ubyte"
    cut.write_bytes(idx_bytes(0x803, (3, 2, 2), b"")[:9])
    with pytest.raises(ValueError, match="header is cut short"):
        from_mnist_idx(cut, lab)
    tiny = tmp_path / "tiny-images-idx3-ubyte"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        from_mnist_idx(tiny, lab)
    broken = tmp_path / "broken-images-idx3-ubyte.gz"
    broken.write_bytes(gzip.compress(idx_bytes(0x803, (3, 2, 2), bytes(12)))[:-10])
    with pytest.raises(ValueError, match="damaged gzip"):
        from_mnist_idx(broken, lab)
    with pytest.raises(FileNotFoundError, match="IDX labels"):
        from_mnist_idx(img, tmp_path / "absent")


# -- qrels ---------------------------------------------------------------------------------------


def small_collection() -> LabelledSet:
    ids = ["d1", "d2", "d3", "d4"]
    return LabelledSet("c", [f"/{i}" for i in ids], [frozenset()] * 4, ids)


def test_from_qrels(tmp_path: Path):
    path = tmp_path / "qrels.txt"
    path.write_text("# judgments\nq1 0 d1 1\nq1 0 d2 0\nq1\t0\td3\t2\n\nq2 0 d4 -1\nq3 Q0 d2 1\n")
    qrels = from_qrels(path, small_collection())
    assert qrels == {"q1": {"d1", "d3"}, "q2": set(), "q3": {"d2"}}


def test_from_qrels_errors(tmp_path: Path):
    path = tmp_path / "qrels.txt"
    coll = small_collection()
    with pytest.raises(FileNotFoundError):
        from_qrels(path, coll)
    path.write_text("q1 0 d1 1\nq1 0 /abs/d9 1\n")
    with pytest.raises(ValueError, match=r"1 judged docno.*/abs/d9.*ids look like d1"):
        from_qrels(path, coll)
    assert from_qrels(path, coll, strict=False) == {"q1": {"d1"}}
    path.write_text("q1 0 d1\n")
    with pytest.raises(ValueError, match=r"line 1.*4 fields"):
        from_qrels(path, coll)
    path.write_text("q1 0 d1 1\nq1 0 d2 yes\n")
    with pytest.raises(ValueError, match=r"line 2.*'yes'"):
        from_qrels(path, coll)
    path.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no judgments"):
        from_qrels(path, coll)


# -- load_labelled -------------------------------------------------------------------------------


def test_load_labelled_cifar(tmp_path: Path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, train=[[0, 1, 2]], test=[2])
    assert load_labelled(folder).ids[-1] == "cifar-train-00002"
    assert load_labelled(str(folder)).name.endswith(":train")
    test = load_labelled(f"{folder}:test")
    assert test.ids == ["cifar-test-00000"] and test.labels == [frozenset({"dog"})]
    assert len(load_labelled(f"{folder}:train")) == 3
    only_test = tmp_path / "only_test"
    write_cifar(only_test, train=[], test=[0, 1])
    assert load_labelled(only_test).name == "only_test:test"
    with pytest.raises(FileNotFoundError, match="data_batch"):
        load_labelled(f"{only_test}:train")


def test_load_labelled_mnist(tmp_path: Path):
    folder = tmp_path / "mnist"
    write_mnist(folder, "train", np.zeros((3, 2, 2), np.uint8), [1, 2, 3], gz=True)
    write_mnist(folder, "t10k", np.zeros((2, 2, 2), np.uint8), [4, 5], gz=False)
    train = load_labelled(folder)
    assert train.name == "mnist-train" and train.primary_labels() == ["1", "2", "3"]
    test = load_labelled(f"{folder}:test")
    assert test.name == "mnist-t10k" and test.primary_labels() == ["4", "5"]
    assert len(load_labelled(folder / "t10k-images-idx3-ubyte")) == 2  # an images file itself
    single = tmp_path / "single"
    write_mnist(single, "t10k", np.zeros((2, 2, 2), np.uint8), [4, 5], gz=True)
    assert load_labelled(single).name == "mnist-t10k"  # the only pair, whatever its name
    (single / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.gz"):
        load_labelled(single)


def test_load_labelled_folders_and_tables(tmp_path: Path):
    root = tmp_path / "photos"
    write_png(root / "cat" / "a.png")
    write_png(root / "dog" / "b.png")
    assert load_labelled(root).ids == ["cat/a.png", "dog/b.png"]
    with pytest.raises(ValueError, match="split only for CIFAR or MNIST"):
        load_labelled(f"{root}:test")
    (root / "t.csv").write_text("path,label\ncat/a.png,x\n")
    assert load_labelled(root / "t.csv").labels == [frozenset({"x"})]
    (root / "t.json").write_text(json.dumps({"dog/b.png": ["y", "z"]}))
    assert load_labelled(str(root / "t.json")).labels == [frozenset({"y", "z"})]


def test_load_labelled_unknown(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_labelled(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"sub-folder per class.*\.csv.*CIFAR.*MNIST"):
        load_labelled(tmp_path / "notes.txt")


# -- Relevance -----------------------------------------------------------------------------------


def check_against_brute(rel: Relevance, qlabels, clabels, rng, depth=12) -> None:
    query_index = rng.permutation(len(qlabels))
    ranked = rng.integers(0, len(clabels), size=(len(qlabels), depth))
    ranked[rng.random(ranked.shape) < 0.15] = -1
    np.testing.assert_array_equal(
        rel.matrix(query_index, ranked), brute_matrix(qlabels, clabels, query_index, ranked)
    )
    np.testing.assert_array_equal(
        rel.counts(query_index), brute_counts(qlabels, clabels, query_index)
    )


def test_relevance_single_label():
    rng = np.random.default_rng(0)
    vocabulary = [f"c{i}" for i in range(6)]
    clabels = random_label_sets(rng, 60, vocabulary, 1)
    qlabels = random_label_sets(rng, 25, [*vocabulary, "only-in-queries"], 1)
    rel = Relevance.from_labels(qlabels, clabels)
    assert rel.method == "single"
    check_against_brute(rel, qlabels, clabels, rng)


def test_relevance_small_example_with_padding():
    q = [frozenset({"a"}), frozenset(), frozenset({"b"})]
    c = [frozenset({"a"}), frozenset({"b"}), frozenset({"a"}), frozenset()]
    for method in ("auto", "single", "bitmask", "sparse"):
        rel = Relevance.from_labels(q, c, method=method)  # type: ignore[arg-type]
        ranked = np.array([[0, 1, 2, -1], [0, 1, 2, 3], [3, 1, -1, -1]])
        expected = [
            [True, False, True, False],
            [False, False, False, False],  # no labels: relevant to nothing
            [False, True, False, False],  # -1 (no result) is never relevant
        ]
        np.testing.assert_array_equal(rel.matrix(np.arange(3), ranked), expected, err_msg=method)
        np.testing.assert_array_equal(rel.counts(np.array([0, 1, 2, 0])), [2, 0, 1, 2])
        assert rel.matrix(np.arange(3), np.empty((3, 0), dtype=int)).shape == (3, 0)


@pytest.mark.parametrize("n_labels", [5, 64])
def test_relevance_multi_label_bitmask(n_labels: int):
    rng = np.random.default_rng(n_labels)
    vocabulary = [f"l{i:02d}" for i in range(n_labels)]
    clabels = random_label_sets(rng, 80, vocabulary, 3)
    qlabels = random_label_sets(rng, 30, vocabulary, 3)
    top = n_labels == 64
    if top:  # the top bit (label 63) must work like any other
        clabels[0] = qlabels[0] = frozenset({"l63"})
    rel = Relevance.from_labels(qlabels, clabels)
    assert rel.method == "bitmask"
    check_against_brute(rel, qlabels, clabels, rng)
    sparse = Relevance.from_labels(qlabels, clabels, method="sparse")
    check_against_brute(sparse, qlabels, clabels, rng)
    if top:
        assert rel.matrix([0], [[0]])[0, 0] and sparse.matrix([0], [[0]])[0, 0]


def test_relevance_multi_label_sparse_over_64_labels():
    rng = np.random.default_rng(7)
    vocabulary = [f"l{i:03d}" for i in range(70)]
    clabels = random_label_sets(rng, 90, vocabulary, 4)
    qlabels = random_label_sets(rng, 30, vocabulary, 4)
    rel = Relevance.from_labels(qlabels, clabels)
    assert rel.method == "sparse"
    check_against_brute(rel, qlabels, clabels, rng)
    with pytest.raises(ValueError, match="64 labels"):
        Relevance.from_labels(qlabels, clabels, method="bitmask")


@pytest.mark.parametrize("max_labels, n_labels", [(1, 4), (3, 8), (3, 80)])
def test_relevance_exclude_self(max_labels: int, n_labels: int):
    rng = np.random.default_rng(max_labels * n_labels)
    labels = random_label_sets(rng, 50, [f"l{i}" for i in range(n_labels)], max_labels, 0.2)
    rel = Relevance.from_labels(labels, labels)
    query_index = np.arange(0, 50, 3)
    np.testing.assert_array_equal(
        rel.counts(query_index, exclude_self=True),
        brute_counts(labels, labels, query_index, exclude_self=True),
    )
    np.testing.assert_array_equal(
        rel.counts(query_index) - rel.counts(query_index, exclude_self=True),
        [1 if labels[i] else 0 for i in query_index],
    )


def test_relevance_from_qrels():
    qrels = {"q1": {"d1", "d3"}, "q2": set(), "q3": {"d2", "not-in-collection"}}
    rel = Relevance.from_qrels(qrels, ["q1", "q2", "q3", "unjudged"], ["d1", "d2", "d3", "d4"])
    assert rel.method == "qrels"
    ranked = np.array([[0, 1, 2, -1], [0, 1, 2, 3], [1, 0, -1, -1], [0, 1, 2, 3]])
    np.testing.assert_array_equal(
        rel.matrix(np.arange(4), ranked),
        [
            [True, False, True, False],
            [False] * 4,
            [True, False, False, False],
            [False] * 4,
        ],
    )
    np.testing.assert_array_equal(rel.counts(np.array([0, 1, 2, 3])), [2, 0, 1, 0])
    loo = Relevance.from_qrels({"d1": {"d1", "d2"}}, ["d1", "d2"], ["d1", "d2"])
    np.testing.assert_array_equal(loo.counts(np.array([0, 1]), exclude_self=True), [1, 0])
    empty = Relevance.from_qrels({}, ["q"], ["d"])
    assert not empty.matrix([0], [[0]]).any() and empty.counts([0]).tolist() == [0]


def test_relevance_rejects_bad_input():
    labels = [frozenset({"a"}), frozenset({"b"})]
    rel = Relevance.from_labels(labels, labels)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        rel.matrix(np.array([0]), np.array([[2]]))
    with pytest.raises(ValueError, match=r"-1 for no result"):
        rel.matrix(np.array([0]), np.array([[-2]]))
    with pytest.raises(ValueError, match="depth"):
        rel.matrix(np.array([0, 1]), np.array([[0]]))
    with pytest.raises(ValueError, match="integer"):
        rel.matrix(np.array([0]), np.array([[0.5]]))
    with pytest.raises(ValueError, match="query_index"):
        rel.counts(np.array([5]))
    with pytest.raises(ValueError, match="at most one label"):
        Relevance.from_labels([frozenset({"a", "b"})], labels, method="single")
    with pytest.raises(ValueError, match="method"):
        Relevance.from_labels(labels, labels, method="fast")  # type: ignore[arg-type]
    bigger = Relevance.from_labels([frozenset({"a"})] * 3, labels)
    with pytest.raises(ValueError, match="exclude_self"):
        bigger.counts(np.array([2]), exclude_self=True)


@pytest.mark.parametrize("max_labels, n_labels", [(1, 10), (2, 20), (2, 100)])
def test_relevance_at_scale_matches_brute_force(max_labels: int, n_labels: int):
    """A 2,000 x 500 ranking, whatever the representation (speed is for benchmarks)."""
    rng = np.random.default_rng(3)
    vocabulary = [f"l{i}" for i in range(n_labels)]
    labels = random_label_sets(rng, 3000, vocabulary, max_labels, 0.0)
    rel = Relevance.from_labels(labels[:2000], labels)
    ranked = rng.integers(0, 3000, size=(2000, 500))
    matrix = rel.matrix(np.arange(2000), ranked)
    counts = rel.counts(np.arange(2000), exclude_self=True)
    rows = rng.choice(2000, 5, replace=False)
    np.testing.assert_array_equal(matrix[rows], brute_matrix(labels, labels, rows, ranked[rows]))
    np.testing.assert_array_equal(
        counts[rows], brute_counts(labels, labels, rows, exclude_self=True)
    )
