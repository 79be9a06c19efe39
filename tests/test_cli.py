"""The cbir command as a user types it: exit codes, JSON output and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbir.cli import app
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
    assert found["descriptor"].startswith("color-hist") and found["metric"]
    assert [r["label"] for r in found["results"]] == ["yellow"] * 4
    assert found["results"][0]["path"] == str(paths["yellow"][0].resolve())

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
    assert by_lbp["metric"] == "euclidean" and len(by_lbp["results"]) == 3
    table = cbir("search", paths["yellow"][0], paths["red"][0], "-c", col, "--combine", "rrf")
    assert "rrf score" in table and "yellow" in table

    info = json.loads(cbir("info", "-c", col, "--json"))
    assert info["images"] == 20 and info["skipped"] == 1 and info["labels"] == 4
    assert [d["vectors"] for d in info["descriptors"]] == [20, 20]
    assert "junk.jpg" in cbir("info", "-c", col, "--skipped")

    assert "removed 5" in cbir("remove", root / "red", "-c", col)
    assert json.loads(cbir("info", "-c", col, "--json"))["images"] == 15

    out_dir = tmp_path / "export"
    cbir("export", out_dir, "-c", col, "-d", "lbp")
    assert (out_dir / "vectors.npy").exists() and (out_dir / "catalogue.csv").exists()


def test_collection_comes_from_the_environment(colour_set, tmp_path, monkeypatch):
    root, _paths = colour_set
    col = tmp_path / "env-col"
    result = runner.invoke(
        app,
        ["index", str(root / "red"), "-d", "color-hist", "--json"],
        env={"CBIR_COLLECTION": str(col), "CBIR_WORKERS": "1"},
    )
    assert result.exit_code == 0, result.output
    assert (col / "catalogue.sqlite").exists()


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
    out = cbir("search", "x.png", "-c", tmp_path / "none", code=2)
    assert "no collection" in out and "cbir index" in out


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
    assert out["fusion"] == "rrf" and out["metric"] == ["hellinger", "chi2"]
    assert [r["label"] for r in out["results"]].count(None) == 3
    assert out["results"][0]["score"] > out["results"][1]["score"]
    text = cbir("search", query, "-c", col, "-d", "color-hist", "-m", "l1", "-m", "l2", code=2)
    assert "several --metric need as many --descriptor" in text
    assert "learns nothing from the collection" in cbir("fit", "-c", col, code=2)
