"""The evaluation grid end to end, on synthetic labelled sets whose answers are known."""

from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cbir.cli import app
from cbir.config import Settings
from cbir.evaluation import GridConfig, evaluate_dataset, load_labelled, run_grid
from cbir.evaluation.grid import applicable_metrics, rank
from cbir.metrics import get_metric
from tests.conftest import COLOURS, colour_image


@pytest.fixture
def settings(tmp_path):
    return Settings(collection=tmp_path / "unused", workers=1)


def test_colour_classes_are_retrieved_perfectly_and_recommended(colour_set, tmp_path, settings):
    root, _ = colour_set
    config = GridConfig(
        descriptors=["color-hist", "fotf"], metrics=["hellinger", "euclidean"], ks=(4,), map_k=4
    )
    report = evaluate_dataset(
        root, None, config, tmp_path / "out", settings=settings, mosaics=2, k=4
    )
    rows = {(r["descriptor"], r["metric"]): r for r in report["rows"]}
    # fotf (grey statistics) cannot use hellinger; colour histograms can use both
    assert set(rows) == {
        ("color-hist", "hellinger"),
        ("color-hist", "euclidean"),
        ("fotf", "euclidean"),
    }
    best = rows[("color-hist", "hellinger")]
    assert best["MAP"] == pytest.approx(1.0) and best["P@4"] == pytest.approx(1.0)
    assert best["queries"] == 20
    assert "color-hist" in report["recommendation"]["text"]
    out = tmp_path / "out"
    for name in (
        "results.md",
        "results.csv",
        "map_grid.md",
        "per_class_ap.md",
        "pr_curves.png",
        "precision_at_k.png",
        "summary.md",
        "trec/qrels.txt",
    ):
        assert (out / name).exists(), name
    assert len(list((out / "mosaics").glob("*.png"))) == 2
    with open(out / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3


def test_trec_files_agree_with_our_scores(colour_set, tmp_path, settings):
    ir_measures = pytest.importorskip("ir_measures")
    root, _ = colour_set
    # noisy set: several colours per class make rankings imperfect, so the check bites
    rng = np.random.default_rng(3)
    for i in range(6):
        colour_image(COLOURS["red"], rng).save(root / "blue" / f"odd{i}.png")
    config = GridConfig(descriptors=["color-hist"], metrics=["euclidean"], map_k=100)
    report = evaluate_dataset(root, None, config, tmp_path / "out", settings=settings, mosaics=0)
    ours = report["rows"][0]
    qrels = list(ir_measures.read_trec_qrels(str(tmp_path / "out" / "trec" / "qrels.txt")))
    run_file = next((tmp_path / "out" / "trec").glob("*.run"))
    run = list(ir_measures.read_trec_run(str(run_file)))
    theirs = ir_measures.calc_aggregate([ir_measures.AP @ 100, ir_measures.P @ 10], qrels, run)
    assert ours["mAP@100(trec)"] == pytest.approx(theirs[ir_measures.AP @ 100], abs=1e-9)
    assert ours["P@10"] == pytest.approx(theirs[ir_measures.P @ 10], abs=1e-9)
    assert ours["MAP"] < 1.0


def test_a_long_descriptor_spec_still_gets_its_trec_run_file(colour_set, tmp_path, settings):
    root, _ = colour_set
    # a fusion's full spec, percent-encoded, is longer than a file name may be (255 bytes)
    fusion = (
        "fusion:parts=color-hist[space=lab;bins=16x16x8;max_side=256]"
        "+color-regional[space=lab;bins=12x4x4;max_side=256]+lbp[P=16;R=3.0;method=ror]"
        "+hog[size=96;orientations=12;pixels_per_cell=8;cells_per_block=3;block_norm=L1]"
    )
    config = GridConfig(descriptors=[fusion, "color-hist"], metrics=["euclidean"])
    evaluate_dataset(root, None, config, tmp_path / "out", settings=settings, mosaics=0)
    runs = sorted((tmp_path / "out" / "trec").glob("*.run"), key=lambda p: len(p.name))
    assert len(runs) == 2 and len(runs[-1].name) <= 160
    tag = runs[-1].read_text().split()[5]  # the run's tag keeps the whole name
    assert tag.startswith("fusion") and len(tag) > 255


def test_separate_query_set_against_a_collection(tmp_path, settings):
    from tests.conftest import write_colour_set

    write_colour_set(tmp_path / "train", per_class=4, seed=1)
    write_colour_set(tmp_path / "test", per_class=2, seed=2)
    result = run_grid(
        load_labelled(tmp_path / "train"),
        load_labelled(tmp_path / "test"),
        GridConfig(descriptors=["color-hist"], metrics=["hellinger"]),
        settings=settings,
    )
    combo = result.combinations[0]
    assert not result.leave_one_out and len(result.query_index) == 8
    assert combo.ranked.shape == (8, 16)  # no query is removed from its own ranking
    assert combo.summary["MAP"] == pytest.approx(1.0)


def test_cifar_batches_are_read_directly(tmp_path, settings):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [b"red", b"blue"]
    colours = [(200, 30, 30), (30, 50, 200)]
    labels = [i % 2 for i in range(12)]
    imgs = np.stack([np.asarray(colour_image(colours[c], rng, size=32)) for c in labels])
    data = imgs.transpose(0, 3, 1, 2).reshape(12, -1)  # CIFAR stores colour planes
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": data, b"labels": labels}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names}, fh)
    result = run_grid(
        load_labelled(folder),
        None,
        GridConfig(descriptors=["color-hist"], metrics=["hellinger"]),
        settings=settings,
    )
    assert result.combinations[0].summary["MAP"] == pytest.approx(1.0)


def test_rank_removes_the_query_and_breaks_ties_by_index():
    X = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    ranked, dists, _ = rank("euclidean", X, X, 3, self_index=np.arange(4))
    assert ranked[0].tolist() == [1, 3, 2] and ranked[2].tolist() == [0, 1, 3]
    assert np.allclose(dists[0], [0, 0, np.sqrt(2)])
    full = get_metric("euclidean").pairwise(X)
    assert np.allclose(np.take_along_axis(full, ranked, axis=1), dists)


def test_applicable_metrics_skip_histogram_metrics_for_signed_descriptors():
    assert "kl" in applicable_metrics("lbp", None)
    assert "kl" not in applicable_metrics("glcm", None)
    assert applicable_metrics("glcm", ["canberra", "chi2"]) == ["canberra"]
    with pytest.raises(ValueError, match="unknown metric"):
        applicable_metrics("lbp", ["nope"])


def test_cli_evaluate_writes_the_report(colour_set, tmp_path):
    root, _ = colour_set
    (root / "red" / "broken.png").write_bytes(b"nope")
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(root),
            "-d",
            "color-hist",
            "-d",
            "lbp",
            "-m",
            "hellinger,chi2",
            "-o",
            str(out),
            "--mosaics",
            "1",
            "--json",
        ],
        env={"CBIR_WORKERS": "1"},
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["rows"]) == 4 and data["recommendation"]["text"]
    assert "Skipped images: 1" in (out / "summary.md").read_text()
    bad = CliRunner().invoke(app, ["evaluate", str(root), "-m", "nope", "-o", str(out)])
    assert bad.exit_code == 2 and "unknown metric" in bad.output


def test_mosaic_shows_the_dataset_images(colour_set, tmp_path, settings):
    root, _ = colour_set
    evaluate_dataset(
        root,
        None,
        GridConfig(descriptors=["color-hist"], metrics=["hellinger"]),
        tmp_path / "out",
        settings=settings,
        mosaics=1,
        k=3,
    )
    mosaic = next((tmp_path / "out" / "mosaics").glob("*.png"))
    assert Image.open(mosaic).size[0] > 3 * 64


def test_qrels_judgments_replace_labels(colour_set, tmp_path, settings):
    ir_measures = pytest.importorskip("ir_measures")
    root, _ = colour_set
    # Judge two queries by hand, against their labels: red/00 finds blue images relevant.
    qrels_file = tmp_path / "judged.qrels"
    lines = [f"red/00.png 0 blue/{i:02d}.{'jpg' if i % 2 else 'png'} 1" for i in range(5)]
    lines += ["green/01.jpg 0 green/02.png 1", "green/01.jpg 0 red/01.jpg 0"]
    qrels_file.write_text("\n".join(lines) + "\n")
    # euclidean: no tied distances (hellinger ties disjoint histograms at 1, and trec_eval
    # orders ties by name, not by our rank)
    config = GridConfig(descriptors=["color-hist"], metrics=["euclidean"])
    report = evaluate_dataset(
        root, None, config, tmp_path / "out", settings=settings, mosaics=0, qrels=qrels_file
    )
    row = report["rows"][0]
    assert row["queries"] == 2
    assert row["MAP"] < 0.8  # blue is far from red: the judgments, not the labels, count
    qrels = list(ir_measures.read_trec_qrels(str(tmp_path / "out" / "trec" / "qrels.txt")))
    run = list(ir_measures.read_trec_run(str(next((tmp_path / "out" / "trec").glob("*.run")))))
    theirs = ir_measures.calc_aggregate([ir_measures.AP @ 100], qrels, run)
    assert row["mAP@100(trec)"] == pytest.approx(theirs[ir_measures.AP @ 100], abs=1e-9)
    bad = tmp_path / "bad.qrels"
    bad.write_text("red/00.png 0 nowhere.png 1\n")
    with pytest.raises(ValueError, match=r"nowhere\.png|not"):
        evaluate_dataset(root, None, config, tmp_path / "out2", settings=settings, qrels=bad)


def test_sampled_queries_score_as_in_the_full_run(colour_set, tmp_path, settings):
    root, _ = colour_set
    rng = np.random.default_rng(3)
    for i in range(4):  # imperfect classes, so that R matters
        colour_image(COLOURS["red"], rng).save(root / "blue" / f"odd{i}.png")
    data = load_labelled(root)
    full = run_grid(
        data, None, GridConfig(descriptors=["color-hist"], metrics=["euclidean"]), settings=settings
    )
    part = run_grid(
        data,
        None,
        GridConfig(descriptors=["color-hist"], metrics=["euclidean"], sample_queries=7, seed=5),
        settings=settings,
    )
    from cbir.evaluation.measures import average_precision

    def per_query_ap(result):
        c = result.combinations[0]
        return dict(
            zip(
                result.query_index.tolist(),
                average_precision(c.relevant, _counts(data, result)),
                strict=True,
            )
        )

    def _counts(data, result):
        labels = [data.labels[i] for i in result.query_index]
        return np.array([sum(bool(lbl & other) for other in data.labels) - 1 for lbl in labels])

    whole, sampled = per_query_ap(full), per_query_ap(part)
    assert len(sampled) == 7 and part.combinations[0].summary["queries"] == 7
    for q, ap in sampled.items():
        assert ap == pytest.approx(whole[q])
    expected = np.mean([whole[q] for q in sampled])
    assert part.combinations[0].summary["MAP"] == pytest.approx(expected)


def test_grid_fits_image_descriptors_on_the_collection_and_refuses_label_leaks(settings):
    from skimage import data as skdata

    from cbir.evaluation.datasets import LabelledSet

    rng = np.random.default_rng(0)
    sources = {"brick": skdata.brick(), "grass": skdata.grass(), "gravel": skdata.gravel()}
    items, labels = [], []
    for name, image in sources.items():
        for _ in range(5):
            y, x = rng.integers(0, image.shape[0] - 160, size=2)
            items.append(np.ascontiguousarray(image[y : y + 160, x : x + 160]))
            labels.append(frozenset({name}))
    data_set = LabelledSet(
        name="textures", items=items, labels=labels, ids=[str(i) for i in range(len(items))]
    )
    queries = data_set.subset(range(0, len(items), 5))
    config = GridConfig(descriptors=["bovw:words=24"], metrics=["cosine"])
    loo = run_grid(data_set, None, config, settings=settings)
    assert loo.combinations[0].summary["MAP"] > 0.6  # chance is about 0.29
    against = run_grid(data_set, queries, config, settings=settings)
    assert against.combinations[0].summary["P@10"] > 0.4
    from cbir.features._backbone import missing_requirements

    if missing_requirements() is None:  # cnnp needs the deep extra
        with pytest.raises(ValueError, match="learns from the labels it would be scored on"):
            run_grid(data_set, None, GridConfig(descriptors=["cnnp"]), settings=settings)


def test_rank_with_query_expansion_equals_searching_with_the_averaged_queries():
    from cbir.evaluation.grid import rank

    rng = np.random.default_rng(3)
    C = rng.normal(size=(40, 6))
    Q = C[:5] + rng.normal(0, 0.1, size=(5, 6))
    self_index = np.arange(5)
    ranked, _, _ = rank("cosine", Q, C, 10, self_index=self_index, expand=3)
    first, _, _ = rank("cosine", Q, C, 3, self_index=self_index)
    averaged = (Q + C[first].sum(axis=1)) / 4
    again, _, _ = rank("cosine", averaged, C, 10, self_index=self_index)
    np.testing.assert_array_equal(ranked, again)
