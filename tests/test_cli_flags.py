"""Every flag of the cbir command changes what it does: each test checks the effect a user
relies on (what is indexed, ranked, removed, grouped, measured or written), not only that the
command ran."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from cbir.cli import app
from cbir.collection import Collection
from cbir.metrics import get_metric
from tests.conftest import COLOURS, colour_image, write_colour_set

runner = CliRunner()
#: Small images keep extraction cheap; the classes stay separable by colour.
SIZE = 48


def cbir(*args: Any, code: int = 0, env: dict[str, str] | None = None) -> str:
    """Run ``cbir ARGS`` in this process (one extraction process unless ``env`` says more);
    returns stdout and stderr, mixed."""
    result = runner.invoke(app, [str(a) for a in args], env=env or {"CBIR_WORKERS": "1"})
    assert result.exit_code == code, result.output
    return result.output


def cbir_json(*args: Any, env: dict[str, str] | None = None) -> Any:
    """``cbir ARGS --json``, parsed from stdout alone."""
    result = runner.invoke(
        app, [*(str(a) for a in args), "--json"], env=env or {"CBIR_WORKERS": "1"}
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def words(text: str) -> str:
    """Text with its line wrapping undone (rich wraps at the console width)."""
    return " ".join(text.split())


def vectors_by_path(col: Path, descriptor: str) -> dict[str, np.ndarray]:
    with Collection(col, create=False) as c:
        ids, vectors = c.vectors(descriptor)
        paths = [r.path for r in c.store.records(ids)]
    return dict(zip(paths, vectors, strict=True))


# -- a shared, read-only collection for the search flags -------------------------------------
@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> tuple[dict[str, list[Path]], Path]:
    base = tmp_path_factory.mktemp("indexed")
    paths = write_colour_set(base / "images", per_class=5, size=SIZE)
    col = base / "col"
    cbir("index", base / "images", "-c", col, "-d", "color-hist", "--labels", "folder", "--json")
    return paths, col


def stored(col: Path) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The collection's color-hist ids and vectors, and the id of each path."""
    with Collection(col, create=False) as c:
        ids, vectors = c.vectors("color-hist")
        id_of = {r.path: r.id for r in c.store.records(ids)}
    return ids, vectors.astype(np.float64), id_of


def ranking(ids: np.ndarray, distances: np.ndarray, k: int) -> list[int]:
    """The top ``k`` ids by distance, ties by id (as the index breaks them)."""
    return ids[np.lexsort((ids, distances))][:k].tolist()


# -- index -----------------------------------------------------------------------------------
def test_all_files_tries_files_without_an_image_extension(tmp_path):
    root, col = tmp_path / "files", tmp_path / "col"
    root.mkdir()
    rng = np.random.default_rng(0)
    colour_image(COLOURS["red"], rng, SIZE).save(root / "photo.png")
    colour_image(COLOURS["blue"], rng, SIZE).save(root / "scan.dat", format="PNG")
    (root / "notes").write_text("a shopping list, not a picture\n")

    plain = cbir_json("index", root, "-c", col, "-d", "color-hist")
    assert (plain["scanned"], plain["added"], plain["skipped"]) == (1, 1, [])

    every = cbir_json("index", root, "-c", col, "-d", "color-hist", "--all-files")
    assert every["scanned"] == 3 and every["added"] == 1 and every["unchanged"] == 1
    assert [s["path"] for s in every["skipped"]] == [str((root / "notes").resolve())]
    assert "not an image" in every["skipped"][0]["reason"]
    found = cbir_json("search", root / "scan.dat", "-c", col, "-k", "1")
    assert found["hits"][0]["path"] == str((root / "scan.dat").resolve())
    assert found["hits"][0]["score"] == pytest.approx(0.0, abs=1e-6)


def test_max_pixels_skips_large_images_until_retry_skipped_with_a_higher_limit(tmp_path):
    root, col = tmp_path / "files", tmp_path / "col"
    root.mkdir()
    rng = np.random.default_rng(1)
    colour_image(COLOURS["red"], rng, SIZE).save(root / "small.png")  # 2,304 pixels
    big = root / "big.png"
    colour_image(COLOURS["green"], rng, 100).resize((120, 100)).save(big)  # 12,000 pixels

    first = cbir_json("index", root, "-c", col, "-d", "color-hist", "--max-pixels", "5000")
    assert first["added"] == 1 and [s["path"] for s in first["skipped"]] == [str(big.resolve())]
    reason = first["skipped"][0]["reason"]
    assert "0.012 megapixels, over the limit of 0.005 megapixels" in reason

    # a higher limit alone does not retry an unchanged file skipped before
    again = cbir_json("index", root, "-c", col, "--max-pixels", "20000")
    assert (again["added"], again["still_skipped"], again["skipped"]) == (0, 1, [])
    text = cbir("index", root, "-c", col, "--max-pixels", "20000")
    assert "1 skipped before" in words(text)
    assert cbir_json("info", "-c", col)["skipped"] == 1

    # too low a limit still refuses it when retried; a high enough one takes it
    low = cbir_json("index", root, "-c", col, "--retry-skipped", "--max-pixels", "5000")
    assert low["added"] == 0 and len(low["skipped"]) == 1 and low["still_skipped"] == 0
    retried = cbir_json("index", root, "-c", col, "--retry-skipped", "--max-pixels", "20000")
    assert retried["added"] == 1 and retried["skipped"] == [] and retried["still_skipped"] == 0
    info = cbir_json("info", "-c", col)
    assert info["images"] == 2 and info["skipped"] == 0
    assert str(big.resolve()) in vectors_by_path(col, "color-hist")


def test_workers_two_extracts_in_a_pool_the_same_vectors_as_one(tmp_path):
    root = tmp_path / "images"
    write_colour_set(root, per_class=3, size=SIZE)
    specs = ["-d", "color-hist", "-d", "lbp"]
    one = cbir_json("index", root, "-c", tmp_path / "one", *specs, "--workers", "1")
    # CBIR_WORKERS=1 in the environment: the flag overrides it
    two = cbir_json("index", root, "-c", tmp_path / "two", *specs, "--workers", "2")
    assert (one["workers"], two["workers"]) == (1, 2)
    assert one["added"] == two["added"] == 12 and two["skipped"] == []
    for descriptor in ("color-hist", "lbp"):
        a = vectors_by_path(tmp_path / "one", descriptor)
        b = vectors_by_path(tmp_path / "two", descriptor)
        assert sorted(a) == sorted(b) and len(a) == 12
        for path, vector in a.items():
            np.testing.assert_array_equal(vector, b[path], err_msg=path)


# -- search ----------------------------------------------------------------------------------
def test_exclude_queries_leaves_the_query_images_out(indexed):
    paths, col = indexed
    query = paths["green"][0]
    _ids, _vectors, id_of = stored(col)
    with_query = cbir_json("search", query, "-c", col, "-k", "4")
    assert with_query["hits"][0]["id"] == id_of[str(query.resolve())]
    assert with_query["hits"][0]["score"] == pytest.approx(0.0, abs=1e-6)

    without = cbir_json("search", query, "-c", col, "-k", "4", "--exclude-queries")
    assert len(without["hits"]) == 4
    assert str(query.resolve()) not in [h["path"] for h in without["hits"]]
    # the same ranking, one place up
    assert [h["id"] for h in without["hits"][:3]] == [h["id"] for h in with_query["hits"][1:]]

    two = [paths["green"][0], paths["red"][0]]
    both = cbir_json("search", *two, "-c", col, "-k", "19", "--exclude-queries")
    assert not {str(p.resolve()) for p in two} & {h["path"] for h in both["hits"]}
    assert len(both["hits"]) == 18  # every other image, and only those


def test_combine_min_ranks_by_the_distance_to_the_nearest_query(indexed):
    paths, col = indexed
    queries = [paths["red"][1], paths["blue"][2]]
    ids, vectors, id_of = stored(col)
    rows = [int(np.flatnonzero(ids == id_of[str(q.resolve())])[0]) for q in queries]
    d = get_metric("hellinger").pairwise(vectors[rows], vectors).min(axis=0)
    want = ranking(ids, d, 8)

    found = cbir_json("search", *queries, "-c", col, "-k", "8", "--combine", "min")
    assert found["combine"] == "min" and found["queries"] == 2 and found["score"] == "distance"
    assert [h["id"] for h in found["hits"]] == want
    np.testing.assert_allclose(
        [h["score"] for h in found["hits"]], np.sort(d)[:8], rtol=1e-4, atol=1e-5
    )
    assert {h["label"] for h in found["hits"]} == {"red", "blue"}  # like either of them


def test_combine_mean_searches_with_the_mean_query_vector(indexed):
    paths, col = indexed
    queries = [paths["red"][1], paths["yellow"][2]]
    ids, vectors, id_of = stored(col)
    rows = [int(np.flatnonzero(ids == id_of[str(q.resolve())])[0]) for q in queries]
    with Collection(col, create=False) as c:
        want = c.search(vectors[rows].mean(axis=0), 8)
    found = cbir_json("search", *queries, "-c", col, "-k", "8", "--combine", "mean")
    assert found["combine"] == "mean" and found["queries"] == 2
    assert [h["id"] for h in found["hits"]] == [h.id for h in want]
    np.testing.assert_allclose(
        [h["score"] for h in found["hits"]], [h.score for h in want], rtol=1e-4, atol=1e-5
    )
    by_min = cbir_json("search", *queries, "-c", col, "-k", "8", "--combine", "min")
    assert [h["id"] for h in by_min["hits"]] != [h["id"] for h in found["hits"]]


def test_expand_searches_again_with_the_query_averaged_with_its_top_results(indexed):
    paths, col = indexed
    query = paths["blue"][3]
    ids, vectors, id_of = stored(col)
    q = vectors[ids == id_of[str(query.resolve())]][0]
    plain = cbir_json("search", query, "-c", col, "-k", "3")  # the query itself comes first
    top = [int(np.flatnonzero(ids == h["id"])[0]) for h in plain["hits"]]
    expanded = np.vstack([q, vectors[top]]).mean(axis=0)
    d = get_metric("hellinger").pairwise(expanded[None], vectors)[0]

    found = cbir_json("search", query, "-c", col, "-k", "6", "--expand", "3")
    assert found["expand"] == 3
    assert [h["id"] for h in found["hits"]] == ranking(ids, d, 6)
    np.testing.assert_allclose(
        [h["score"] for h in found["hits"]], np.sort(d)[:6], rtol=1e-4, atol=1e-5
    )
    assert found["hits"][0]["score"] > 1e-4  # not the query's own distance 0 any more


# -- remove, export, duplicates --------------------------------------------------------------
def test_remove_missing_drops_exactly_the_files_gone_from_disk(tmp_path):
    root, col = tmp_path / "images", tmp_path / "col"
    paths = write_colour_set(root, per_class=2, size=SIZE)
    cbir("index", root, "-c", col, "-d", "color-hist", "--json")
    assert "removed 0 images" in cbir("remove", "--missing", "-c", col)
    gone = paths["green"][1]
    before = set(vectors_by_path(col, "color-hist"))
    gone.unlink()
    assert cbir_json("index", root, "-c", col)["missing"] == [str(gone.resolve())]

    assert "removed 1 images" in cbir("remove", "--missing", "-c", col)
    assert set(vectors_by_path(col, "color-hist")) == before - {str(gone.resolve())}
    assert cbir_json("info", "-c", col)["images"] == 7
    again = cbir_json("index", root, "-c", col)
    assert again["missing"] == [] and again["unchanged"] == 7 and again["added"] == 0


def test_export_parquet_holds_the_ids_and_vectors_of_npy(tmp_path):
    root, col = tmp_path / "images", tmp_path / "col"
    write_colour_set(root, per_class=2, size=SIZE)
    cbir("index", root, "-c", col, "-d", "lbp", "--labels", "folder", "--json")
    npy, parquet = tmp_path / "npy", tmp_path / "parquet"
    cbir("export", npy, "-c", col, "-d", "lbp", "--format", "npy")
    written = cbir("export", parquet, "-c", col, "-d", "lbp", "--format", "parquet")
    # rich wraps long paths anywhere: join the lines back
    assert "".join(written.split()) == "".join(
        f"wrote{parquet / name}" for name in ("catalogue.parquet", "vectors.parquet")
    )
    assert not (parquet / "vectors.npy").exists()

    import pyarrow.parquet as pq

    with open(npy / "vectors.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    table = pq.read_table(parquet / "vectors.parquet").to_pydict()
    assert table["id"] == [int(r["id"]) for r in rows] and len(rows) == 8
    assert table["path"] == [r["path"] for r in rows]
    assert table["label"] == [r["label"] for r in rows]
    np.testing.assert_array_equal(
        np.array(table["vector"], dtype=np.float32), np.load(npy / "vectors.npy")
    )
    with open(npy / "catalogue.csv", newline="") as fh:
        catalogue = [int(r["id"]) for r in csv.DictReader(fh)]
    assert pq.read_table(parquet / "catalogue.parquet").column("id").to_pylist() == catalogue
    bad = cbir("export", tmp_path / "x", "-c", col, "--format", "xml", code=2)
    assert "format must be one of npy, parquet" in words(bad)


def _smooth_picture(seed: int) -> Image.Image:
    """Random 16x16 colours blown up to 128x128: a smooth picture, unlike any other seed's."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(16, 16, 3)).astype(np.uint8)
    return Image.fromarray(small).resize((128, 128), Image.Resampling.BICUBIC)


def test_duplicates_threshold_is_the_most_bits_a_near_duplicate_differs_in(tmp_path):
    root, col = tmp_path / "images", tmp_path / "col"
    root.mkdir()
    photo = _smooth_picture(0)
    photo.save(root / "photo.png")
    buf = io.BytesIO()  # a brightened, re-encoded copy: a few hash bits change
    ImageEnhance.Brightness(photo).enhance(1.1).save(buf, format="JPEG", quality=70)
    (root / "photo-edited.jpg").write_bytes(buf.getvalue())
    for seed in (1, 2, 3):
        _smooth_picture(seed).save(root / f"other-{seed}.png")
    cbir("index", root, "-c", col, "-d", "phash", "--json")
    pair = sorted(str((root / n).resolve()) for n in ("photo.png", "photo-edited.jpg"))

    none = cbir_json("duplicates", "-c", col, "--threshold", "0")
    assert none["threshold"] == 0 and none["groups"] == [] and none["images"] == 5
    assert "no duplicates among 5 images (phash, within 0 bits)" in words(
        cbir("duplicates", "-c", col, "--threshold", "0")
    )

    loose = cbir_json("duplicates", "-c", col, "--threshold", "12")
    assert loose["threshold"] == 12 and loose["near_groups"] == 1 and loose["exact_groups"] == 0
    (group,) = loose["groups"]
    assert sorted(i["path"] for i in group["images"]) == pair
    bits = group["max_distance"]
    assert 0 < bits <= 12
    # the edge: at exactly their distance they are near duplicates, one bit less they are not
    assert cbir_json("duplicates", "-c", col, "--threshold", str(bits))["near_groups"] == 1
    assert cbir_json("duplicates", "-c", col, "--threshold", str(bits - 1))["groups"] == []


# -- evaluate --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """20 images, 4 colour classes of 5: each query has 4 relevant images."""
    root = tmp_path_factory.mktemp("labelled") / "set"
    write_colour_set(root, per_class=5, size=SIZE)
    return root


def evaluate(data: Path, out: Path, *args: Any, env: dict[str, str] | None = None) -> dict:
    """``cbir evaluate DATA -d color-hist -m hellinger --mosaics 0 -o OUT ARGS --json``: its one
    row (a single combination)."""
    report = cbir_json(
        "evaluate", data, "-d", "color-hist", "-m", "hellinger", "--mosaics", "0", "-o", out,
        *args, env=env,
    )  # fmt: skip
    assert report["output"] == str(out) and len(report["rows"]) == 1
    return report["rows"][0]


def read_run(path: Path) -> dict[str, list[tuple[str, float]]]:
    """A TREC run file: query id -> [(docno, score)] in rank order."""
    run: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for line in path.read_text().splitlines():
        qid, _q0, doc, rank, score, _tag = line.split()
        assert int(rank) == len(run[qid]) + 1
        run[qid].append((doc, float(score)))
    return dict(run)


def read_qrels(path: Path) -> dict[str, set[str]]:
    qrels: dict[str, set[str]] = defaultdict(set)
    for line in path.read_text().splitlines():
        qid, _iter, doc, rel = line.split()
        if int(rel) > 0:
            qrels[qid].add(doc)
    return dict(qrels)


def trec_id(item_id: str) -> str:
    return item_id.replace("/", "%2F")


def test_evaluate_k_and_map_k_are_the_cut_offs_of_their_columns(labelled, tmp_path):
    # lbp on flat colours ranks imperfectly, so the measures are not all 1
    report = cbir_json(
        "evaluate", labelled, "-d", "lbp", "-m", "chi2", "--mosaics", "0", "-o", tmp_path,
        "-k", "3", "--map-k", "5",
    )  # fmt: skip
    (row,) = report["rows"]
    assert {"P@3", "R@3", "nDCG@3", "mAP@5(trec)", "mAP@5(min)", "mAP@5(retrieved)"} <= set(row)
    assert not any(key.startswith(("P@10", "mAP@100")) for key in row)
    run = read_run(tmp_path / "trec" / "lbp__chi2.run")
    qrels = read_qrels(tmp_path / "trec" / "qrels.txt")
    assert len(run) == 20 and all(len(qrels[q]) == 4 for q in run)
    p3, ap5 = [], []
    for qid, ranked in run.items():
        rel = [doc in qrels[qid] for doc, _ in ranked]
        p3.append(sum(rel[:3]) / 3)
        hits = np.cumsum(rel[:5])
        ap5.append(sum(hits[i] / (i + 1) for i in range(5) if rel[i]) / 4)
    assert row["P@3"] == pytest.approx(np.mean(p3))
    assert row["mAP@5(trec)"] == pytest.approx(np.mean(ap5))
    assert 0 < row["P@3"] < 1  # an imperfect ranking: the comparison above has teeth
    assert row["MAP"] < 1


def test_evaluate_depth_cuts_every_ranking(labelled, tmp_path):
    full = evaluate(labelled, tmp_path / "full")
    assert full["MAP"] == pytest.approx(1.0)  # colour classes: the 4 relevant come first
    cut = evaluate(labelled, tmp_path / "cut", "--depth", "3")
    run = read_run(tmp_path / "cut" / "trec" / "color-hist__hellinger.run")
    assert len(run) == 20 and {len(r) for r in run.values()} == {3}
    # 3 of the 4 relevant images are ranked: AP = (1 + 1 + 1) / 4
    assert cut["MAP"] == pytest.approx(0.75)
    assert "R-precision" not in cut  # R = 4 is deeper than the ranking
    full_run = read_run(tmp_path / "full" / "trec" / "color-hist__hellinger.run")
    assert {len(r) for r in full_run.values()} == {19}  # everything but the query itself


def test_evaluate_sample_queries_evaluates_that_many_queries(labelled, tmp_path):
    row = evaluate(labelled, tmp_path, "--sample-queries", "4")
    assert row["queries"] == 4
    run = read_run(tmp_path / "trec" / "color-hist__hellinger.run")
    ids = {trec_id(p.relative_to(labelled).as_posix()) for p in labelled.rglob("*.*")}
    assert len(run) == 4 and set(run) <= ids
    assert all(len(r) == 19 for r in run.values())  # each still ranks the whole collection


def test_evaluate_queries_ranks_the_collection_for_a_separate_query_set(labelled, tmp_path):
    queries = tmp_path / "queries"
    rng = np.random.default_rng(7)
    for name, rgb in COLOURS.items():
        (queries / name).mkdir(parents=True)
        colour_image(rgb, rng, SIZE).save(queries / name / "query.png")
    row = evaluate(labelled, tmp_path / "out", "-q", queries)
    assert row["queries"] == 4 and row["MAP"] == pytest.approx(1.0)
    run = read_run(tmp_path / "out" / "trec" / "color-hist__hellinger.run")
    assert set(run) == {f"{name}%2Fquery.png" for name in COLOURS}
    collection_ids = {trec_id(p.relative_to(labelled).as_posix()) for p in labelled.rglob("*.*")}
    for ranked in run.values():  # no leave-one-out: all 20 collection images, none a query
        assert {doc for doc, _ in ranked} == collection_ids
    qrels = read_qrels(tmp_path / "out" / "trec" / "qrels.txt")
    assert all(len(qrels[q]) == 5 for q in run)


def test_evaluate_qrels_replace_label_relevance(labelled, tmp_path):
    ids = sorted(p.relative_to(labelled).as_posix() for p in labelled.rglob("*.*"))
    judged = {  # red/00: its own class, as the labels say; green/00: every other class
        "red/00.png": [i for i in ids if i.startswith("red/") and i != "red/00.png"],
        "green/00.png": [i for i in ids if not i.startswith("green/")],
    }
    qrels = tmp_path / "qrels.txt"
    lines = [f"{q} 0 {doc} 1" for q, docs in judged.items() for doc in docs]
    qrels.write_text("\n".join([*lines, "green/00.png 0 green/01.jpg 0"]) + "\n")

    row = evaluate(labelled, tmp_path / "out", "--qrels", qrels)
    assert row["queries"] == 2  # only the judged queries
    # green/00 ranks its 4 greens first, then the 15 judged relevant: AP = mean of j / (4 + j)
    green_ap = np.mean([j / (4 + j) for j in range(1, 16)])
    assert row["MAP"] == pytest.approx((1.0 + green_ap) / 2)
    written = read_qrels(tmp_path / "out" / "trec" / "qrels.txt")
    assert written == {trec_id(q): {trec_id(d) for d in docs} for q, docs in judged.items()}


def test_evaluate_expand_ranks_with_each_query_averaged_with_its_top_results(labelled, tmp_path):
    row = evaluate(labelled, tmp_path / "out", "--expand", "2")
    assert row["metric"] == "hellinger+qe2"
    run = read_run(tmp_path / "out" / "trec" / "color-hist__hellinger+qe2.run")
    # the same vectors, through a collection: leave-one-out expansion by hand
    cbir("index", labelled, "-c", tmp_path / "col", "-d", "color-hist", "--json")
    by_path = vectors_by_path(tmp_path / "col", "color-hist")
    names = sorted(by_path)
    ids = [trec_id(Path(p).relative_to(labelled.resolve()).as_posix()) for p in names]
    X = np.stack([by_path[p] for p in names]).astype(np.float64)
    hellinger = get_metric("hellinger")
    D = hellinger.pairwise(X, X)
    np.fill_diagonal(D, np.inf)
    changed = 0
    for i, qid in enumerate(ids):
        near = np.argsort(D[i], kind="stable")[:2]
        expanded = hellinger.pairwise(((X[i] + X[near].sum(axis=0)) / 3)[None], X)[0]
        ranked = run[qid]
        assert len(ranked) == 19 and qid not in {doc for doc, _ in ranked}
        got = np.array([-score for _, score in ranked])
        want = np.array([expanded[ids.index(doc)] for doc, _ in ranked])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=qid)
        assert sorted(want) == pytest.approx(list(want))  # ranked by the expanded distance
        plain = np.array([D[i, ids.index(doc)] for doc, _ in ranked])
        changed += not np.allclose(got, plain, atol=1e-5)
    assert changed == len(ids)  # no query's distances are the plain ones


def test_evaluate_workers_two_measures_the_same_as_one(labelled, tmp_path):
    one = evaluate(labelled, tmp_path / "one", "--workers", "1")
    two = evaluate(labelled, tmp_path / "two", "--workers", "2")
    for row in (one, two):
        row.pop("query ms")
    assert one == two and one["queries"] == 20
    run = Path("trec", "color-hist__hellinger.run")
    assert (tmp_path / "one" / run).read_text() == (tmp_path / "two" / run).read_text()


# -- demo ------------------------------------------------------------------------------------
def test_demo_indexes_13_scenes_of_8_views_and_answers_the_coffee_query(tmp_path):
    folder, col = tmp_path / "demo-images", tmp_path / "demo-col"
    # CBIR_DESCRIPTORS keeps the demo's new collection to the descriptor searched with
    env = {"CBIR_WORKERS": "1", "CBIR_DESCRIPTORS": "color-hist"}
    out = cbir("demo", "--folder", folder, "-c", col, "-d", "color-hist", "-k", "5", env=env)
    rows = re.findall(r"^│\s+(\d+) │\s+([\d.]+) │ (\S*)\s+│", out, flags=re.MULTILINE)
    assert [int(rank) for rank, _, _ in rows] == [1, 2, 3, 4, 5]
    coffee = sum(label == "coffee" for _, _, label in rows)
    said = re.search(r"(\d+) of the top 5 are views of the coffee scene \(8 exist\)", words(out))
    assert said is not None and int(said.group(1)) == coffee
    assert coffee >= 3  # colour alone finds most views of the scene
    assert "color-hist | hellinger" in words(out)
    assert "104 files: 104 added" in words(out)

    info = cbir_json("info", "-c", col, env=env)
    assert info["images"] == 104 and info["labels"] == 13 and info["labelled_images"] == 104
    assert [d["name"] for d in info["descriptors"]] == ["color-hist"]
    scenes = sorted(p for p in (folder / "collection").iterdir())
    assert len(scenes) == 13 and all(len(list(s.iterdir())) == 8 for s in scenes)
    assert (folder / "queries" / "coffee.jpg").exists()
