"""Retrieval measures: hand-worked cases, and per-query agreement with trec_eval via ir_measures."""

from __future__ import annotations

import warnings
from fractions import Fraction
from math import log2

import ir_measures
import numpy as np
import pytest
import pytrec_eval
from ir_measures import AP, P, R, Rprec, nDCG

from cbir.evaluation.measures import (
    ap_at_k,
    ap_at_k_min,
    ap_at_k_retrieved,
    ap_at_k_trec,
    average_precision,
    interpolated_precision_11,
    mean_over_queries,
    ndcg_at_k,
    per_class_mean,
    per_query_ap,
    precision_at_k,
    precision_curve,
    r_precision,
    recall_at_k,
    summarise,
)

# The running example: relevant at ranks 1 and 3 of 5, and R = 3 (one relevant never retrieved).
EX_REL = np.array([[1, 0, 1, 0, 0]], dtype=bool)
EX_R = np.array([3])


def one(values: np.ndarray) -> float:
    assert values.shape == (1,)
    return float(values[0])


# ------------------------------------------------------------------------------ hand-worked


def test_average_precision_by_hand():
    # P@1 = 1/1 and P@3 = 2/3 at the relevant ranks; AP = (1 + 2/3) / R with R = 3 = 5/9.
    assert one(average_precision(EX_REL, EX_R)) == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert per_query_ap is average_precision


def test_ap_at_k_three_normalisations_by_hand():
    # k = 3: relevant at ranks 1 and 3, sum of P@i = 1 + 2/3 = 5/3.
    assert one(ap_at_k(EX_REL, EX_R, 3, normalise="retrieved")) == pytest.approx((5 / 3) / 2)
    assert one(ap_at_k(EX_REL, EX_R, 3, normalise="min")) == pytest.approx((5 / 3) / 3)
    assert one(ap_at_k(EX_REL, EX_R, 3, normalise="trec")) == pytest.approx((5 / 3) / 3)
    # k = 2: only rank 1 is relevant, sum = 1; retrieved 1, min(R, k) = 2, R = 3.
    assert one(ap_at_k_retrieved(EX_REL, EX_R, 2)) == pytest.approx(1.0)
    assert one(ap_at_k_min(EX_REL, EX_R, 2)) == pytest.approx(1 / 2)
    assert one(ap_at_k_trec(EX_REL, EX_R, 2)) == pytest.approx(1 / 3)
    # k = 10 > depth 5: same sum 5/3; min(3, 10) = 3 and R = 3; the trec form is the full AP.
    assert one(ap_at_k_min(EX_REL, EX_R, 10)) == pytest.approx(5 / 9)
    assert one(ap_at_k_trec(EX_REL, EX_R, 10)) == one(average_precision(EX_REL, EX_R))


def test_ap_at_k_retrieved_is_zero_when_nothing_relevant_in_top_k():
    rel = np.array([[0, 0, 1]], dtype=bool)  # first relevant at rank 3
    assert one(ap_at_k_retrieved(rel, [2], 2)) == 0.0
    assert one(ap_at_k_retrieved(rel, [2], 3)) == pytest.approx(1 / 3)  # (1/3) / 1


def test_ap_at_k_names_the_allowed_normalisations():
    with pytest.raises(ValueError, match="'retrieved', 'min', 'trec'"):
        ap_at_k(EX_REL, EX_R, 3, normalise="papers")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ap_at_k(EX_REL, EX_R, 3)  # type: ignore[call-arg]  # the form must be named


def test_precision_recall_r_precision_by_hand():
    # c_k (relevant within top k) = 1, 1, 2, 2, 2 for k = 1..5.
    assert one(precision_at_k(EX_REL, EX_R, 1)) == 1.0
    assert one(precision_at_k(EX_REL, EX_R, 2)) == 0.5
    assert one(precision_at_k(EX_REL, EX_R, 3)) == pytest.approx(2 / 3)
    assert one(precision_at_k(EX_REL, EX_R, 5)) == pytest.approx(2 / 5)
    assert one(precision_at_k(EX_REL, EX_R, 10)) == pytest.approx(2 / 10)  # ranks 6..10 miss
    assert one(recall_at_k(EX_REL, EX_R, 1)) == pytest.approx(1 / 3)
    assert one(recall_at_k(EX_REL, EX_R, 3)) == pytest.approx(2 / 3)
    assert one(recall_at_k(EX_REL, EX_R, 10)) == pytest.approx(2 / 3)
    # R = 3: precision at rank 3 = 2/3.
    assert one(r_precision(EX_REL, EX_R)) == pytest.approx(2 / 3)
    curve = precision_curve(EX_REL, [1, 2, 3, 5, 10])
    np.testing.assert_allclose(curve, [[1, 1 / 2, 2 / 3, 2 / 5, 2 / 10]])


def test_ndcg_by_hand():
    # k = 3: DCG = 1/log2(2) + 1/log2(4) = 1.5; ideal: 3 relevant at the top,
    # IDCG = 1/log2(2) + 1/log2(3) + 1/log2(4) = 1.5 + 0.6309...
    assert one(ndcg_at_k(EX_REL, EX_R, 3)) == pytest.approx(1.5 / (1.5 + 1 / log2(3)))
    # k = 2: DCG = 1; ideal holds min(R, k) = 2 items: 1 + 1/log2(3).
    assert one(ndcg_at_k(EX_REL, EX_R, 2)) == pytest.approx(1 / (1 + 1 / log2(3)))
    # k = 1: the top result is relevant.
    assert one(ndcg_at_k(EX_REL, EX_R, 1)) == 1.0


def test_interpolated_11_point_by_hand():
    # Relevant at ranks 1, 4, 5, 10 of 10 and R = 5: precision there is 1/1, 2/4, 3/5, 4/10.
    # Interpolated (max precision at this or any later relevant rank): 1, 0.6, 0.6, 0.4.
    # Level r needs ceil(5r) relevant: r = 0 -> 0 (best anywhere = 1), 0.1, 0.2 -> 1st (1),
    # 0.3, 0.4 -> 2nd (0.6: the 0.5 at rank 4 is raised by rank 5), 0.5, 0.6 -> 3rd (0.6),
    # 0.7, 0.8 -> 4th (0.4), 0.9, 1.0 -> 5th, never retrieved (0).
    rel = np.zeros((1, 10), dtype=bool)
    rel[0, [0, 3, 4, 9]] = True
    expected = [1, 1, 1, 0.6, 0.6, 0.6, 0.6, 0.4, 0.4, 0, 0]
    np.testing.assert_allclose(interpolated_precision_11(rel, [5]), [expected])
    np.testing.assert_allclose(interpolated_precision_11(rel, [5], rule="trec_eval"), [expected])


def test_interpolated_11_point_exact_versus_trec_eval_rounding():
    # EX: P = 1 at rank 1 (recall 1/3), P = 2/3 at rank 3 (recall 2/3); recall 1 never reached.
    # Exact: r <= 0.3 -> 1; 0.4..0.6 -> 2/3; r >= 0.7 needs recall 3/3 -> 0.
    exact = [1, 1, 1, 1, 2 / 3, 2 / 3, 2 / 3, 0, 0, 0, 0]
    np.testing.assert_allclose(interpolated_precision_11(EX_REL, EX_R), [exact])
    # trec_eval needs (long)(0.7 * 3 + 0.9) = (long) 2.9999999999999996 = 2 relevant at r = 0.7.
    trec = [1, 1, 1, 1, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 0, 0, 0]
    np.testing.assert_allclose(interpolated_precision_11(EX_REL, EX_R, rule="trec_eval"), [trec])
    qrels, run = to_trec(EX_REL, EX_R)
    scores = pytrec_eval.RelevanceEvaluator(qrels, {"iprec_at_recall"}).evaluate(run)["q0"]
    np.testing.assert_allclose([scores[f"iprec_at_recall_{r:.2f}"] for r in LEVELS], trec)
    with pytest.raises(ValueError, match="rule"):
        interpolated_precision_11(EX_REL, EX_R, rule="nearest")  # type: ignore[arg-type]


# --------------------------------------------------------------- R = 0, short rankings, checks


def test_queries_without_relevant_are_nan_and_skipped():
    rel = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=bool)
    n_rel = np.array([3, 0, 1])
    for values in (
        average_precision(rel, n_rel),
        *(ap_at_k(rel, n_rel, 3, normalise=n) for n in ("retrieved", "min", "trec")),
        recall_at_k(rel, n_rel, 3),
        ndcg_at_k(rel, n_rel, 3),
        r_precision(rel, n_rel),
    ):
        assert np.isnan(values[1]) and not np.isnan(values[[0, 2]]).any()
    assert np.isnan(interpolated_precision_11(rel, n_rel)[1]).all()
    assert precision_at_k(rel, n_rel, 1)[1] == 0.0  # P@k does not divide by R
    assert mean_over_queries(average_precision(rel, n_rel)) == (
        pytest.approx((5 / 9 + 1 / 2) / 2),
        1,
    )
    s = summarise(rel, n_rel, ks=(1, 3), map_k=3)
    assert s["queries"] == 3 and s["queries_without_relevant"] == 1
    assert s["MAP"] == pytest.approx((5 / 9 + 1 / 2) / 2)  # 2nd query AP = (1/2) / 1
    assert s["P@1"] == pytest.approx((1 + 0) / 2)  # not (1 + 0 + 0) / 3
    assert s["R-precision"] == pytest.approx((2 / 3 + 0) / 2)


def test_summarise_with_no_relevant_anywhere_is_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = summarise(np.zeros((2, 4), dtype=bool), [0, 0], ks=(2,), map_k=2)
        curve, skipped = mean_over_queries(interpolated_precision_11(np.zeros((2, 4)), [0, 0]))
    assert s["queries_without_relevant"] == 2
    assert np.isnan([v for k, v in s.items() if not k.startswith("queries")]).all()
    assert np.isnan(curve).all() and skipped == 2


def test_ranking_shorter_than_r():
    rel, n_rel = np.array([[1, 1]], dtype=bool), np.array([5])  # depth 2, R = 5
    assert one(average_precision(rel, n_rel)) == pytest.approx((1 + 1) / 5)
    assert one(ap_at_k_min(rel, n_rel, 10)) == pytest.approx(2 / 5)  # min(5, 10) = 5
    assert one(ap_at_k_retrieved(rel, n_rel, 10)) == 1.0  # 2 / 2
    assert one(precision_at_k(rel, n_rel, 10)) == pytest.approx(2 / 10)
    assert one(recall_at_k(rel, n_rel, 10)) == pytest.approx(2 / 5)
    idcg = sum(1 / log2(i + 1) for i in range(1, 6))  # 5 ideal relevant items in the top 5
    assert one(ndcg_at_k(rel, n_rel, 5)) == pytest.approx((1 + 1 / log2(3)) / idcg)
    with pytest.raises(ValueError, match="too short"):
        r_precision(rel, n_rel)
    s = summarise(rel, n_rel, ks=(5,), map_k=10)
    assert "R-precision" not in s
    assert s["mAP@10(min)"] == pytest.approx(2 / 5)


def test_summarise_keys():
    s = summarise(EX_REL, EX_R, ks=(1, 5), map_k=3)
    assert list(s) == [
        "MAP",
        "mAP@3(retrieved)",
        "mAP@3(min)",
        "mAP@3(trec)",
        "P@1",
        "R@1",
        "nDCG@1",
        "P@5",
        "R@5",
        "nDCG@5",
        "R-precision",
        "queries",
        "queries_without_relevant",
    ]
    assert s["mAP@3(retrieved)"] == pytest.approx(5 / 6)
    assert s["P@5"] == pytest.approx(2 / 5)
    assert "mAP@3(min)" not in summarise(EX_REL, EX_R, map_k=None)


@pytest.mark.parametrize(
    ("rel", "n_rel", "k"),
    [
        (EX_REL, [1], 3),  # two relevant in the ranking but R = 1
        (EX_REL, [3, 3], 3),  # one query, two R
        (EX_REL[0], [3], 3),  # 1-d ranking
        (EX_REL, [-1], 3),
        (EX_REL, EX_R, 0),  # k must be >= 1
        (np.array([[0, 2]]), [3], 1),  # not 0/1
    ],
)
def test_inputs_are_checked(rel, n_rel, k):
    with pytest.raises(ValueError):
        precision_at_k(rel, n_rel, k)


def test_per_class_mean_skips_nan():
    values = np.array([1.0, 2.0, np.nan, 4.0, np.nan])
    classes = np.array(["cat", "cat", "dog", "dog", "owl"])
    means = per_class_mean(values, classes)
    assert means.keys() == {"cat", "dog", "owl"}
    assert means["cat"] == 1.5 and means["dog"] == 4.0 and np.isnan(means["owl"])
    assert per_class_mean([0.5, 1.0, 0.0], [2, 1, 2]) == {1: 1.0, 2: 0.25}


# --------------------------------------------------------- against trec_eval (ir_measures)

LEVELS = [i / 10 for i in range(11)]
KS = (1, 5, 10, 40, 60)  # depth is 40: 60 is past it


def to_trec(rel: np.ndarray, n_rel: np.ndarray) -> tuple[dict, dict]:
    """trec qrels and run: strictly descending scores, unretrieved relevant items in qrels."""
    qrels, run = {}, {}
    for q, (row, r) in enumerate(zip(rel, n_rel, strict=True)):
        qrels[f"q{q}"] = {f"d{i}": int(x) for i, x in enumerate(row)}
        qrels[f"q{q}"].update({f"u{j}": 1 for j in range(int(r) - int(row.sum()))})
        run[f"q{q}"] = {f"d{i}": float(len(row) - i) for i in range(len(row))}
    return qrels, run


@pytest.fixture(scope="module")
def random_rankings() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(20240607)
    q, depth = 60, 40
    density = rng.choice([0.0, 0.05, 0.2, 0.5, 0.9], size=(q, 1))
    rel = rng.random((q, depth)) < density
    missing = rng.choice([0, 0, 1, 3, 12], size=q)  # relevant items beyond the depth
    n_rel = rel.sum(axis=1) + missing
    n_rel[n_rel == 0] = 2  # every query has R > 0 here (trec_eval skips R = 0)
    assert (n_rel > depth).any() and (rel.sum(axis=1) == 0).any()
    return rel, n_rel


def trec_scores(rel, n_rel, measures) -> dict[tuple[str, str], float]:
    qrels, run = to_trec(rel, n_rel)
    return {
        (m.query_id, str(m.measure)): m.value for m in ir_measures.iter_calc(measures, qrels, run)
    }


def test_agrees_with_trec_eval_per_query(random_rankings):
    rel, n_rel = random_rankings
    ours = {"AP": average_precision(rel, n_rel)}
    for k in KS:
        ours[f"AP@{k}"] = ap_at_k_trec(rel, n_rel, k)
        ours[f"P@{k}"] = precision_at_k(rel, n_rel, k)
        ours[f"R@{k}"] = recall_at_k(rel, n_rel, k)
        ours[f"nDCG@{k}"] = ndcg_at_k(rel, n_rel, k)
    measures = [AP] + [m @ k for k in KS for m in (AP, P, R, nDCG)]
    theirs = trec_scores(rel, n_rel, measures)
    assert len(theirs) == len(rel) * len(measures)
    for name, values in ours.items():
        expected = [theirs[f"q{q}", name] for q in range(len(rel))]
        np.testing.assert_allclose(values, expected, rtol=0, atol=1e-9, err_msg=name)


def test_r_precision_agrees_with_trec_eval(random_rankings):
    rel, n_rel = random_rankings
    short = n_rel <= rel.shape[1]  # R-precision needs depth >= R
    theirs = trec_scores(rel[short], n_rel[short], [Rprec])
    expected = [theirs[f"q{q}", "Rprec"] for q in range(int(short.sum()))]
    np.testing.assert_allclose(r_precision(rel[short], n_rel[short]), expected, atol=1e-9)


def test_interpolated_precision_agrees_with_trec_eval(random_rankings):
    rel, n_rel = random_rankings
    qrels, run = to_trec(rel, n_rel)
    scores = pytrec_eval.RelevanceEvaluator(qrels, {"iprec_at_recall"}).evaluate(run)
    expected = [[scores[f"q{q}"][f"iprec_at_recall_{r:.2f}"] for r in LEVELS] for q in range(60)]
    ours = interpolated_precision_11(rel, n_rel, rule="trec_eval")
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-9)


def brute_force_11_point(row: np.ndarray, r: int) -> list[float]:
    """max P@i over ranks with recall c_i / R >= level, in exact fractions, 0 if none."""
    counts = np.cumsum(row)
    out = []
    for level in range(11):
        best = [
            Fraction(int(c), i + 1)
            for i, c in enumerate(counts)
            if Fraction(int(c), r) >= Fraction(level, 10)
        ]
        out.append(float(max(best, default=0)))
    return out


def test_interpolated_precision_exact_rule_against_brute_force(random_rankings):
    rel, n_rel = random_rankings
    expected = [brute_force_11_point(row, int(r)) for row, r in zip(rel, n_rel, strict=True)]
    np.testing.assert_allclose(interpolated_precision_11(rel, n_rel), expected, atol=1e-12)


def test_summarise_and_curve_are_means_of_the_per_query_measures(random_rankings):
    rel, n_rel = random_rankings
    s = summarise(rel, n_rel, ks=(5, 60), map_k=10)
    assert "R-precision" not in s  # some R exceed the depth of 40
    assert s["MAP"] == pytest.approx(average_precision(rel, n_rel).mean())
    assert s["mAP@10(retrieved)"] == pytest.approx(ap_at_k_retrieved(rel, n_rel, 10).mean())
    assert s["mAP@10(min)"] == pytest.approx(ap_at_k_min(rel, n_rel, 10).mean())
    assert s["nDCG@60"] == pytest.approx(ndcg_at_k(rel, n_rel, 60).mean())
    assert s["R@5"] == pytest.approx(recall_at_k(rel, n_rel, 5).mean())
    curve = precision_curve(rel, np.array([1, 5, 40, 60]))
    for j, k in enumerate((1, 5, 40, 60)):
        np.testing.assert_array_equal(curve[:, j], precision_at_k(rel, n_rel, k))
    # The three AP@k forms are ordered: retrieved >= min >= trec.
    ret, mn, trec = (ap_at_k(rel, n_rel, 10, normalise=n) for n in ("retrieved", "min", "trec"))
    assert (ret >= mn - 1e-12).all() and (mn >= trec - 1e-12).all()
