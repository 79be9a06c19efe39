"""Neighbourhood augmentation of the ``cnn`` descriptor (``augment=K``, ``alpha``).

It works on vectors, so these tests use synthetic ones (three unit blocks, as ``cnn`` makes)
and need no network: what it must compute, that it lifts retrieval where the right neighbours
are known, and that its fitted state survives a round trip through the collection's files.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cbir.evaluation.measures import average_precision
from cbir.features import cnn as cnn_module
from cbir.features.cnn import CNNEmbedding

BLOCKS = (192, 320, 1280)


def unit_blocks(x: np.ndarray) -> np.ndarray:
    edges = np.cumsum([0, *BLOCKS])
    parts = [x[:, a:b] for a, b in itertools.pairwise(edges)]
    return np.concatenate([p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts], axis=1)


def clustered(classes: int, per_class: int, noise: float, seed: int = 0, latent: int = 16):
    """CNN-like vectors: classes that overlap in a low-dimensional space (so neighbours are
    fairly similar, cosine ~0.5, and retrieval is imperfect), embedded in 1,792 dimensions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, latent))
    labels = np.repeat(np.arange(classes), per_class)
    z = centres[labels] + noise * rng.normal(size=(len(labels), latent))
    x = z @ rng.normal(size=(latent, sum(BLOCKS)))
    return unit_blocks(x).astype(np.float32), labels


def loo_map(vectors: np.ndarray, labels: np.ndarray) -> float:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :-1]
    relevant = labels[order] == labels[:, None]
    return float(average_precision(relevant, relevant.sum(axis=1)).mean())


def reference_augment(x, reference, k, alpha):
    """The definition, one vector at a time in float64: x plus its k nearest reference
    vectors other than itself, weighted by cosine^alpha, each block normalised again."""
    ref = reference.astype(np.float64)
    unit = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    out = []
    for v in x.astype(np.float64):
        cos = unit @ (v / np.linalg.norm(v))
        order = [j for j in np.argsort(-cos, kind="stable") if cos[j] <= 1 - 1e-4][:k]
        out.append(v + sum(max(cos[j], 0) ** alpha * ref[j] for j in order))
    return unit_blocks(np.array(out))


def test_augmentation_follows_its_definition_for_members_and_outsiders():
    x, _ = clustered(4, 10, noise=1.0)
    outsiders, _ = clustered(4, 2, noise=1.0, seed=1)
    d = CNNEmbedding(augment=5, alpha=3.0).fit_vectors(x)
    reference = d._reduced(x)  # centred: what the neighbours are searched among
    for vectors in (x, outsiders):
        got = d.transform_vectors(vectors)
        want = reference_augment(d._reduced(vectors), reference, 5, 3.0)
        np.testing.assert_allclose(got, want, atol=2e-3)  # the reference is kept in float16
        # every block stays a unit vector, as without augmentation
        np.testing.assert_allclose(np.linalg.norm(got[:, :192], axis=1), 1.0, rtol=1e-5)


def test_an_image_in_the_collection_counts_itself_once():
    x, _ = clustered(2, 6, noise=1.0)
    inside = CNNEmbedding(center=False, augment=3, alpha=0.0).fit_vectors(x)
    outside = CNNEmbedding(center=False, augment=3, alpha=0.0).fit_vectors(x[1:])
    # x[0] finds itself among the collection's vectors: it is not added a second time, so it
    # gets what it would get from outside, the same three other neighbours
    np.testing.assert_allclose(
        inside.transform_vectors(x[:1]), outside.transform_vectors(x[:1]), atol=2e-3
    )


def test_augmentation_lifts_retrieval_where_classes_are_known():
    x, labels = clustered(6, 40, noise=1.2)
    plain = CNNEmbedding(augment=0).fit_vectors(x).transform_vectors(x)
    augmented = CNNEmbedding(augment=20).fit_vectors(x).transform_vectors(x)
    before, after = loo_map(plain, labels), loo_map(augmented, labels)
    assert before < 0.8  # the set is hard enough for the test to mean something
    assert after > before + 0.1


def test_similarity_weighting_protects_images_with_few_of_their_kind():
    # pairs: 19 of the 20 neighbours are of other kinds; alpha keeps them from counting much
    x, labels = clustered(40, 2, noise=0.5)
    plain = loo_map(CNNEmbedding(augment=0).fit_vectors(x).transform_vectors(x), labels)
    flat = CNNEmbedding(augment=20, alpha=0.0).fit_vectors(x).transform_vectors(x)
    weighted = CNNEmbedding(augment=20, alpha=3.0).fit_vectors(x).transform_vectors(x)
    assert loo_map(weighted, labels) > loo_map(flat, labels) + 0.1
    assert loo_map(weighted, labels) > plain - 0.05


def test_state_round_trips_and_a_foreign_state_is_a_clear_error():
    x, _ = clustered(3, 8, noise=1.0)
    d = CNNEmbedding().fit_vectors(x)
    state = d.get_state()
    assert set(state) == {"mean", "reference"}
    assert state["reference"].shape == (24, 1792) and state["reference"].dtype == np.float16
    again = CNNEmbedding()
    again.set_state(state)
    np.testing.assert_allclose(again.transform_vectors(x), d.transform_vectors(x), atol=1e-6)
    with pytest.raises(ValueError, match="refit it: cbir fit"):
        CNNEmbedding().set_state({"mean": state["mean"]})
    with pytest.raises(ValueError, match="refit it"):
        CNNEmbedding(pca=8).set_state(state)


def test_the_reference_set_is_capped_on_big_collections(monkeypatch):
    monkeypatch.setattr(cnn_module, "AUGMENT_REFERENCE_MAX", 10)
    x, _ = clustered(3, 8, noise=1.0)
    d = CNNEmbedding(augment=4).fit_vectors(x)
    assert d.get_state()["reference"].shape == (10, 1792)
    assert d.fit_report_["neighbour_pool"] == 10
    assert d.transform_vectors(x).shape == x.shape


def test_augmentation_after_pca_and_off():
    x, _ = clustered(3, 8, noise=1.0)
    y = CNNEmbedding(pca=6, augment=4).fit_vectors(x).transform_vectors(x)
    assert y.shape == (24, 6)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
    off = CNNEmbedding(augment=0, center=False)
    assert not off.requires_fit and "augment=0" in off.base_spec
    assert CNNEmbedding().base_spec == CNNEmbedding(center=False, augment=0).spec


@pytest.mark.parametrize(
    ("params", "message"),
    [({"augment": -1}, "augment must be an integer in 0..1000"), ({"alpha": 20}, "alpha")],
)
def test_bad_augmentation_parameters_say_what_is_allowed(params, message):
    with pytest.raises(ValueError, match=message):
        CNNEmbedding(**params)
