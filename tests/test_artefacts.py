"""The evaluation's output files: read back, they must say what was written."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.evaluation import artefacts
from cbir.evaluation.artefacts import (
    NOT_RELEVANT_RGB,
    QUERY_RGB,
    RELEVANT_RGB,
    make_mosaic,
    plot_pr_curves,
    plot_precision_at_k,
    read_trec_qrels,
    read_trec_run,
    recommend,
    write_grid_table,
    write_per_class,
    write_results_table,
    write_trec_qrels,
    write_trec_run,
)

ROWS = [
    {"descriptor": "glcm", "metric": "correlation", "MAP": 0.198, "P@10": 0.41, "query ms": 0.8},
    {"descriptor": "lbp", "metric": "chi2", "MAP": 0.203, "P@10": 0.45, "query ms": 1.3},
    {"descriptor": "hog", "metric": "l2", "MAP": 0.123456789012345, "P@10": 0.3, "extra": 7},
]


def _md_rows(path: Path) -> list[list[str]]:
    """The body rows of the Markdown table in ``path`` (header and separator dropped)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]


def _read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


# -- tables ------------------------------------------------------------------------------------
def test_results_table_csv_keeps_everything_at_full_precision(tmp_path: Path) -> None:
    csv_path, md_path = write_results_table(ROWS, tmp_path / "new")
    assert csv_path == tmp_path / "new" / "results.csv" and md_path.name == "results.md"
    with csv_path.open(newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == ["descriptor", "metric", "MAP", "P@10", "query ms", "extra"]
    assert [r["descriptor"] for r in back] == ["glcm", "lbp", "hog"]  # input order kept
    assert float(back[2]["MAP"]) == ROWS[2]["MAP"]
    assert back[2]["query ms"] == "" and back[2]["extra"] == "7"


def test_results_table_markdown_is_sorted_rounded_and_bolds_the_best(tmp_path: Path) -> None:
    _, md_path = write_results_table(ROWS, tmp_path)
    body = _md_rows(md_path)
    assert len(body) == len(ROWS)
    assert [r[0] for r in body] == ["**lbp**", "glcm", "hog"]
    assert body[0][2] == "**0.203**" and all(c.startswith("**") for c in body[0] if c != "-")
    assert not any("**" in c for r in body[1:] for c in r)
    assert body[2][2] == "0.123" and body[2][4] == "-"  # 3 decimals; missing shown as "-"

    _, md_path = write_results_table(ROWS, tmp_path, sort_by="query ms", higher_is_better=False)
    assert [r[0] for r in _md_rows(md_path)] == ["**glcm**", "lbp", "hog"]  # no time: last


def test_results_table_escapes_pipes_and_rejects_unknown_sort_column(tmp_path: Path) -> None:
    rows = [{"descriptor": "a|b", "metric": "m", "MAP": 0.5}]
    _, md_path = write_results_table(rows, tmp_path)
    assert len(_md_rows(md_path)[0]) == 3
    with pytest.raises(ValueError, match="mAP@5"):
        write_results_table(rows, tmp_path, sort_by="mAP@5")


def test_grid_table_is_a_descriptor_by_metric_matrix(tmp_path: Path) -> None:
    values = {("lbp", "chi2"): 0.2, ("lbp", "l1"): 0.25, ("glcm", "l1"): 0.1, ("glcm", "l2"): 0.3}
    csv_path, md_path = write_grid_table(values, tmp_path, name="g")
    assert (csv_path.name, md_path.name) == ("g.csv", "g.md")
    assert _read_csv(csv_path) == [
        ["descriptor", "chi2", "l1", "l2"],
        ["lbp", "0.2", "0.25", ""],
        ["glcm", "", "0.1", "0.3"],
    ]
    assert _md_rows(md_path) == [
        ["lbp", "0.200", "**0.250**", "-"],
        ["glcm", "-", "0.100", "**0.300**"],
    ]


def test_per_class_table(tmp_path: Path) -> None:
    per_class = {"cat": {"lbp / chi2": 0.3, "glcm / l1": 0.4}, "dog": {"lbp / chi2": 0.9}}
    csv_path, md_path = write_per_class(per_class, tmp_path)
    assert (csv_path.name, md_path.name) == ("per_class_ap.csv", "per_class_ap.md")
    rows = _read_csv(csv_path)
    assert rows[0] == ["class", "lbp / chi2", "glcm / l1"]
    assert rows[2] == ["dog", "0.9", ""]
    assert _md_rows(md_path) == [["cat", "0.300", "**0.400**"], ["dog", "**0.900**", "-"]]


# -- plots -------------------------------------------------------------------------------------
def _colour_present(img: Image.Image, hex_colour: str, tol: int = 12) -> bool:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    a = np.asarray(img.convert("RGB")).astype(int)
    return bool((np.abs(a - rgb).max(axis=2) <= tol).sum() > 50)


def test_pr_curves_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    curves = {f"desc{i} / metric": np.sort(rng.uniform(0, 1, 11))[::-1] for i in range(20)}
    path = plot_pr_curves(curves, tmp_path / "plots" / "pr.png")
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert 900 <= img.width <= 3000 and 500 <= img.height <= 2000
        gray = np.asarray(img.convert("L"), dtype=np.float64)
        assert gray.std() > 20  # not a blank canvas
        assert _colour_present(img, "#1f77b4") and _colour_present(img, "#ff7f0e")  # lines drawn
    with pytest.raises(ValueError, match="11"):
        plot_pr_curves({"short": np.ones(10)}, tmp_path / "bad.png")


def test_precision_at_k_png(tmp_path: Path) -> None:
    ks = np.array([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])
    wide = {"a / x": (ks, np.linspace(0.9, 0.1, 10)), "b / y": (ks, np.linspace(0.8, 0.05, 10))}
    narrow = {"a / x": (ks[:4], np.linspace(0.9, 0.5, 4))}
    for name, curves in (("wide", wide), ("narrow", narrow)):
        path = plot_precision_at_k(curves, tmp_path / f"{name}.png")
        with Image.open(path) as img:
            assert 900 <= img.width <= 3000 and 500 <= img.height <= 2000
            assert np.asarray(img.convert("L"), dtype=np.float64).std() > 20
            assert _colour_present(img, "#1f77b4")
    with pytest.raises(ValueError):
        plot_precision_at_k({"a": (ks, np.ones(3))}, tmp_path / "bad.png")


def test_importing_the_module_does_not_import_matplotlib() -> None:
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('probe', {artefacts.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print('matplotlib' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- mosaics -----------------------------------------------------------------------------------
def _bbox(a: np.ndarray, rgb: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the pixels exactly ``rgb``."""
    ys, xs = np.nonzero((a == np.array(rgb)).all(axis=2))
    assert len(xs), f"no pixel of colour {rgb}"
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _mosaic_size(tmp_path: Path, n: int, thumb: int = 64) -> tuple[int, int]:
    gray = np.full((20, 30), 128, dtype=np.uint8)
    results = [(gray, i % 2 == 0, 1.0 / (i + 1)) for i in range(n)]
    path = make_mosaic(gray, results, tmp_path / f"m{n}.png", thumb=thumb)
    with Image.open(path) as img:
        return img.size


def test_mosaic_grid_size_wraps_after_ten(tmp_path: Path) -> None:
    w5, h5 = _mosaic_size(tmp_path, 5)
    w10, h10 = _mosaic_size(tmp_path, 10)
    w12, h12 = _mosaic_size(tmp_path, 12)
    w20, h20 = _mosaic_size(tmp_path, 20)
    w21, h21 = _mosaic_size(tmp_path, 21)
    pitch = (w10 - w5) / 5  # one column: thumbnail, frame and spacing
    assert pitch == int(pitch) and 64 < pitch < 2 * 64
    assert h5 == h10 and w12 == w10 == w20 == w21  # at most ten columns
    row = h12 - h10  # one more row of thumbnails with captions
    assert 64 < row < 3 * 64 and h20 == h12 and h21 == h12 + row
    assert w5 < 7 * pitch  # query column + 5 results, not more
    assert h10 < 3 * 64  # one row plus margins


def test_mosaic_frames_mark_query_relevant_and_not_relevant(tmp_path: Path) -> None:
    # a 4x4 query of 16 distinct grays: enlarged 16x it must stay 16 flat squares
    query = (np.arange(16, dtype=np.uint8).reshape(4, 4) * 15 + 10).astype(np.uint8)
    rgb = np.zeros((50, 80, 3), dtype=np.uint8)
    rgb[..., 2] = 90  # no frame colour inside any image
    results = [(Image.fromarray(rgb), True, 0.5), (rgb, False, 0.25), (query, True, 0.125)]
    path = make_mosaic(query, results, tmp_path / "sub" / "m.png", thumb=64, title="lbp / chi2")
    a = np.asarray(Image.open(path).convert("RGB"))

    q_left, q_top, q_right, _ = _bbox(a, QUERY_RGB)
    g_left, g_top, g_right, _ = _bbox(a, RELEVANT_RGB)
    r_left, r_top, r_right, _ = _bbox(a, NOT_RELEVANT_RGB)
    assert len({QUERY_RGB, RELEVANT_RGB, NOT_RELEVANT_RGB}) == 3
    assert q_right < g_left < r_left < r_right < g_right  # query, then #1 (rel), #2 (not), #3
    assert q_top == g_top == r_top  # one row

    # the frames themselves: a pixel on each one's top edge, left of the thumbnail
    assert tuple(a[g_top + 1, g_left + 1]) == RELEVANT_RGB
    assert tuple(a[r_top + 1, r_left + 1]) == NOT_RELEVANT_RGB
    assert tuple(a[q_top + 1, q_left + 1]) == QUERY_RGB
    width = q_right - q_left + 1
    border = int(np.argmax((a[q_top:, q_left + width // 2] != QUERY_RGB).any(axis=1)))
    assert 2 <= border <= 10
    assert tuple(a[q_top + width - 2, q_left + width // 2]) == QUERY_RGB  # bottom edge
    inner = a[q_top + border : q_top + width - border, q_left + border : q_right - border + 1]
    assert inner.shape[:2] == (64, 64)
    colours = {tuple(c) for c in inner.reshape(-1, 3)}
    assert colours == {(v, v, v) for v in query.ravel().tolist()}  # nearest-neighbour, no blur


def test_mosaic_accepts_odd_inputs(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (300, 40), (255, 0, 0, 0))
    floats = np.random.default_rng(0).random((33, 17))
    path = make_mosaic(
        floats,
        [(rgba, False, 12345.678), (np.zeros((8, 8, 1), dtype=np.uint16), True, -0.5)],
        tmp_path / "odd.png",
        query_caption="a very long caption that cannot possibly fit under one thumbnail",
    )
    with Image.open(path) as img:
        assert img.mode == "RGB" and img.width > 3 * 128
    with pytest.raises(ValueError, match="shape"):
        make_mosaic(np.zeros((2, 2, 2)), [], tmp_path / "bad.png")


# -- TREC --------------------------------------------------------------------------------------
def test_trec_run_round_trip_and_format(tmp_path: Path) -> None:
    run = {
        "q1": [("d3", 0.9), ("d1", 0.5), ("d2", 0.5), ("d9", -1.25)],
        "q2": [("d1", -0.1), ("d2", -0.123456789)],
    }
    path = write_trec_run(run, tmp_path / "trec" / "x.run", tag="lbp_chi2")
    lines = path.read_text().splitlines()
    assert lines[0] == "q1 Q0 d3 1 0.9 lbp_chi2"
    assert lines[-1] == "q2 Q0 d2 2 -0.123456789 lbp_chi2"
    assert read_trec_run(path) == run


def test_trec_qrels_round_trip_and_format(tmp_path: Path) -> None:
    qrels = {"q1": {"d3", "d1"}, "q2": {"d7"}}
    path = write_trec_qrels(qrels, tmp_path / "trec" / "qrels.txt")
    assert path.read_text().splitlines() == ["q1 0 d1 1", "q1 0 d3 1", "q2 0 d7 1"]
    assert read_trec_qrels(path) == qrels


def test_trec_files_reject_rising_scores_whitespace_and_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "r.run"
    with pytest.raises(ValueError, match="descending"):
        write_trec_run({"q1": [("d1", 0.1), ("d2", 0.2)]}, out)  # distances, not scores
    with pytest.raises(ValueError, match=re.escape("'cat 01.png'")):
        write_trec_run({"q1": [("cat 01.png", 1.0)]}, out)
    with pytest.raises(ValueError, match="'q 1'"):
        write_trec_run({"q 1": [("d1", 1.0)]}, out)
    with pytest.raises(ValueError, match="tag"):
        write_trec_run({"q1": [("d1", 1.0)]}, out, tag="lbp / chi2")
    with pytest.raises(ValueError, match="twice"):
        write_trec_run({"q1": [("d1", 1.0), ("d1", 0.5)]}, out)
    with pytest.raises(ValueError, match="finite"):
        write_trec_run({"q1": [("d1", float("nan"))]}, out)
    with pytest.raises(ValueError, match=re.escape(repr("a\tb"))):
        write_trec_qrels({"q1": {"a\tb"}}, tmp_path / "q.txt")


# -- recommendation ----------------------------------------------------------------------------
def test_recommend_names_winner_runner_up_and_margin() -> None:
    advice = recommend(ROWS)
    assert advice["best"] == {"descriptor": "lbp", "metric": "chi2", "value": 0.203}
    assert advice["runner_up"]["descriptor"] == "glcm"
    assert advice["margin"] == pytest.approx(0.005)
    assert advice["relative_margin"] == pytest.approx(0.005 / 0.198)
    assert not advice["tied"]
    assert advice["text"] == (
        "lbp with chi2 is best here (MAP 0.203), 0.005 (2.5%) ahead of glcm with correlation "
        "(0.198)."
    )
    assert recommend(ROWS, by="P@10")["best"]["descriptor"] == "lbp"


@pytest.mark.parametrize(
    ("best", "second", "tied"),
    [
        (0.900, 0.894, True),  # 0.006 apart but only 0.67%: tied
        (0.004, 0.001, True),  # 300% but only 0.003 apart: tied
        (0.500, 0.490, False),  # 0.010 and 2%: a real lead
    ],
)
def test_recommend_says_plainly_when_it_is_a_tie(best: float, second: float, tied: bool) -> None:
    rows = [
        {"descriptor": "a", "metric": "x", "MAP": second, "query ms": 0.5},
        {"descriptor": "b", "metric": "y", "MAP": best, "query ms": 2.0},
        {"descriptor": "c", "metric": "z", "MAP": float("nan")},
    ]
    advice = recommend(rows)
    assert advice["best"]["descriptor"] == "b" and advice["tied"] is tied
    assert ("essentially tied" in advice["text"]) is tied
    if tied:
        assert "a with x is the faster choice" in advice["text"]


def test_recommend_single_row_and_nothing_to_rank() -> None:
    advice = recommend(ROWS[:1])
    assert advice["runner_up"] is None and "only combination" in advice["text"]
    with pytest.raises(ValueError, match="mAP@5"):
        recommend(ROWS, by="mAP@5")
