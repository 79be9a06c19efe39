"""The cbir command as a user types it: exit codes, JSON output and error messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.cli import app
from cbir.collection import Collection
from tests.conftest import write_colour_set

runner = CliRunner()


def cbir(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args], env={"CBIR_WORKERS": "1"})
    assert result.exit_code == code, result.output
    return result.output


def test_descriptors_and_metrics_list_the_registries():
    names = {d["name"]: d for d in json.loads(cbir("descriptors", "--json"))}
    assert {"color-hist", "color-regional", "glcm", "fotf", "lbp", "hog"} <= set(names)
    assert names["color-regional"]["dim"] == 405
    assert names["lbp"]["params"]["P"] == 8
    assert all(d["description"] and d["default_metric"] for d in names.values())
    metrics = {m["name"] for m in json.loads(cbir("metrics", "--json"))}
    assert {
        "euclidean",
        "sqeuclidean",
        "manhattan",
        "chebyshev",
        "cosine",
        "correlation",
        "canberra",
        "chi2",
        "kl",
        "jeffrey",
        "js",
        "bhattacharyya",
        "hellinger",
        "intersection",
        "emd",
        "ks",
    } <= metrics
    assert "color-regional" in cbir("descriptors") and "bhattacharyya" in cbir("metrics")


def test_index_search_info_remove_export(colour_set, tmp_path):
    root, paths = colour_set
    col = tmp_path / "col"
    (root / "junk.jpg").write_bytes(b"not a jpeg")
    report = json.loads(
        cbir(
            "index",
            root,
            "-c",
            col,
            "-d",
            "color-hist",
            "-d",
            "lbp",
            "--labels",
            "folder",
            "--json",
        )
    )
    assert report["added"] == 20 and len(report["skipped"]) == 1
    assert "junk.jpg" in report["skipped"][0]["path"] and report["skipped"][0]["reason"]

    found = json.loads(cbir("search", paths["yellow"][0], "-c", col, "-k", "4", "--json"))
    assert found["descriptors"] == ["color-hist"] and found["metrics"] == ["hellinger"]
    assert found["specs"][0].startswith("color-hist:") and found["score"] == "distance"
    assert [r["label"] for r in found["hits"]] == ["yellow"] * 4
    assert found["hits"][0]["path"] == str(paths["yellow"][0].resolve())
    assert found["seconds"] > 0 and found["queries"] == 1

    by_lbp = json.loads(
        cbir(
            "search",
            paths["yellow"][0],
            "-c",
            col,
            "-d",
            "lbp",
            "-m",
            "euclidean",
            "-k",
            "3",
            "--json",
        )
    )
    assert by_lbp["descriptors"] == ["lbp"] and by_lbp["metrics"] == ["euclidean"]
    with Collection(col, create=False) as opened:  # the ranking is lbp's under euclidean
        want = opened.search(paths["yellow"][0], 3, descriptor="lbp", metric="euclidean")
    assert [h["id"] for h in by_lbp["hits"]] == [h.id for h in want]
    table = cbir("search", paths["yellow"][0], paths["red"][0], "-c", col, "--combine", "rrf")
    assert "rrf score" in table and "yellow" in table
    both = json.loads(
        cbir("search", paths["yellow"][0], paths["red"][0], "-c", col, "--combine", "rrf",
             "-k", "6", "--json")
    )  # fmt: skip
    assert both["combine"] == "rrf" and both["score"] == "rrf" and both["queries"] == 2
    # each image is ranked well by one query only: the two classes share the top
    assert sorted(r["label"] for r in both["hits"]) == ["red"] * 3 + ["yellow"] * 3

    info = json.loads(cbir("info", "-c", col, "--json"))
    assert info["images"] == 20 and info["skipped"] == 1 and info["labels"] == 4
    assert [d["vectors"] for d in info["descriptors"]] == [20, 20]
    assert "junk.jpg" in cbir("info", "-c", col, "--skipped")

    assert "removed 5" in cbir("remove", root / "red", "-c", col)
    after = json.loads(cbir("info", "-c", col, "--json"))
    assert after["images"] == 15 and after["labels"] == 3
    assert [d["vectors"] for d in after["descriptors"]] == [15, 15]
    # the red files are still on disk, but no longer found
    rest = json.loads(cbir("search", paths["red"][0], "-c", col, "-k", "15", "--json"))
    assert "red" not in {r["label"] for r in rest["hits"]} and len(rest["hits"]) == 15
    assert "is not in the collection" in cbir("remove", root / "red", "-c", col, code=3)

    out_dir = tmp_path / "export"
    cbir("export", out_dir, "-c", col, "-d", "lbp")
    vectors = np.load(out_dir / "vectors.npy")
    with open(out_dir / "vectors.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert vectors.shape == (15, 10) and len(rows) == 15  # lbp: 10 bins
    assert sorted(r["label"] for r in rows) == sorted(["green", "blue", "yellow"] * 5)
    with Collection(col, create=False) as opened:
        ids, want = opened.vectors("lbp")
    order = np.argsort(ids)
    assert [int(r["id"]) for r in rows] == ids[order].tolist()
    np.testing.assert_array_equal(vectors, want[order])
    with open(out_dir / "catalogue.csv", newline="") as fh:
        catalogue = list(csv.DictReader(fh))
    assert sorted(r["status"] for r in catalogue) == ["ok"] * 15 + ["skipped"]


def test_collection_comes_from_the_environment(colour_set, tmp_path, monkeypatch):
    root, _paths = colour_set
    col = tmp_path / "env-col"
    monkeypatch.chdir(tmp_path)
    env = {"CBIR_COLLECTION": str(col), "CBIR_WORKERS": "1"}
    result = runner.invoke(app, ["index", str(root / "red"), "-d", "color-hist", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert (col / "catalogue.sqlite").exists() and not (tmp_path / ".cbir").exists()
    info = runner.invoke(app, ["info", "--json"], env=env)
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["images"] == 5
    assert json.loads(info.stdout)["path"] == str(col.resolve())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["search", "{q}", "-m", "nope"], "unknown metric 'nope'"),
        (["search", "{q}", "-d", "nope"], "unknown descriptor 'nope'"),
        (["search", "{q}", "--combine", "vote"], "combine must be one of mean, min, rrf"),
        (["search", "{q}", "-d", "color-hist:bins=ax2"], "parameter 'bins'"),
        (["index", "{root}", "-d", "lbp:Q=3"], "has no parameter 'Q'"),
        (["search", "{missing}"], "cannot read file"),
        (["remove"], "give files or folders to remove"),
    ],
)
def test_wrong_arguments_say_what_is_wrong(colour_set, tmp_path, args, message):
    root, paths = colour_set
    col = tmp_path / "col"
    cbir("index", root / "red", "-c", col, "-d", "color-hist", "--json")
    fill = {"q": paths["red"][0], "root": root, "missing": tmp_path / "missing.png"}
    argv = [a.format(**fill) for a in args] + ["-c", str(col)]
    out = cbir(*argv, code=2)
    assert message in " ".join(out.split())


def test_search_without_a_collection_explains(tmp_path):
    out = cbir("search", "x.png", "-c", tmp_path / "none", code=3)
    assert "no collection" in out and "cbir index" in out
    assert not (tmp_path / "none").exists()  # searching creates nothing


def test_demo_images_are_made_from_bundled_pictures(tmp_path):
    from cbir.demo import make_demo_images

    collection, queries = make_demo_images(tmp_path, views=2)
    classes = sorted(p.name for p in collection.iterdir())
    assert len(classes) == 13 and "coffee" in classes
    assert len(list(collection.rglob("*.jpg"))) == 26
    assert sorted(p.stem for p in queries.iterdir()) == classes
    assert isinstance(collection, Path)


def test_search_fuses_several_descriptors_and_fit_refuses_plain_ones(tmp_path):
    root = tmp_path / "images"
    write_colour_set(root)
    col = tmp_path / "col"
    cbir("index", root, "-c", col, "-d", "color-hist", "-d", "lbp", "--json")
    query = next((root / "red").iterdir())
    out = json.loads(
        cbir("search", query, "-c", col, "-d", "color-hist", "-d", "lbp", "-k", "3", "--json")
    )
    assert out["fusion"] == "rrf" and out["metrics"] == ["hellinger", "chi2"]
    assert out["descriptors"] == ["color-hist", "lbp"] and out["score"] == "rrf"
    assert [r["label"] for r in out["hits"]].count(None) == 3
    assert out["hits"][0]["score"] > out["hits"][1]["score"]
    # reciprocal rank fusion of the two rankings, each over the whole collection
    fused: dict[int, float] = {}
    with Collection(col, create=False) as opened:
        for name in ("color-hist", "lbp"):
            for hit in opened.search(query, 20, descriptor=name):
                fused[hit.id] = fused.get(hit.id, 0.0) + 1 / (60 + hit.rank)
    want = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:3]
    assert [r["id"] for r in out["hits"]] == [i for i, _ in want]
    assert [r["score"] for r in out["hits"]] == pytest.approx([s for _, s in want])
    text = cbir("search", query, "-c", col, "-d", "color-hist", "-m", "l1", "-m", "l2", code=2)
    assert "give one metric per descriptor (1), or none; got 2" in " ".join(text.split())
    assert "learns nothing from the collection" in cbir("fit", "-c", col, code=2)
