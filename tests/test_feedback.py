"""Refining a search: relevance feedback (Rocchio), queries by id and by region, pages and
filters, on colour sets whose right answers are known."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cbir import Box, Collection, Feedback, Region
from cbir.cli import app
from cbir.config import Settings
from cbir.errors import InvalidRequestError, NotFoundError
from cbir.search.feedback import rocchio
from tests.conftest import COLOURS, write_colour_set


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> tuple[Collection, dict[str, list[Path]]]:
    root = tmp_path_factory.mktemp("feedback")
    paths = write_colour_set(root / "images", per_class=6)
    settings = Settings(collection=root / "col", workers=1, default_descriptors=("color-hist",))
    col = Collection(settings.collection, settings=settings)
    col.add(root / "images", labels="folder")
    yield col, paths
    col.close()


def _two_colour(path: Path, left: str, right: str) -> Path:
    """An image whose left half is one class's colour and whose right half another's."""
    a = np.empty((64, 128, 3), np.uint8)
    a[:, :64] = COLOURS[left]
    a[:, 64:] = COLOURS[right]
    Image.fromarray(a).save(path)
    return path


def _as_given(value: Any) -> Any:
    """A value passed as it is, whatever its declared type (a test of what is refused)."""
    return value


def _labels(result) -> list[str | None]:
    return [h.label for h in result]


def test_rocchio_moves_the_query_by_its_formula():
    fb = Feedback(like=(1,), unlike=(2,), alpha=1.0, beta=0.5, gamma=0.25)
    q = np.array([[1.0, 0.0, 0.0]])
    like = np.array([[0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    moved = rocchio(q, like, np.array([[0.0, 0.0, 4.0]]), fb)
    # 1*q + 0.5*mean(like) - 0.25*mean(unlike) = [1, 0.5, 0.5 - 1], clipped at 0 (histograms)
    np.testing.assert_allclose(moved, [[1.0, 0.5, 0.0]])
    signed = rocchio(-q, np.empty((0, 3)), np.array([[0.0, 0.0, 4.0]]), fb)
    np.testing.assert_allclose(signed, [[-1.0, 0.0, -1.0]])  # signed vectors are not clipped


def test_feedback_toward_the_liked_class(colours, tmp_path):
    col, _ = colours
    query = _two_colour(tmp_path / "q.png", "red", "blue")
    before = col.search(query, k=12)
    assert set(_labels(before)) == {"red", "blue"}
    first = before[0].label
    (other,) = {"red", "blue"} - {first}
    assert _labels(before)[:6] == [first] * 6  # the other half's class only further down
    liked = tuple(h.id for h in before if h.label == other)
    disliked = tuple(h.id for h in before[:3])
    after = col.search(query, k=6, feedback=Feedback(like=liked, unlike=disliked))
    assert _labels(after) == [other] * 6
    assert after.feedback == (len(liked), len(disliked))
    assert after.to_dict()["feedback"] == {"like": len(liked), "unlike": len(disliked)}
    # the weights are the user's: with the query's weight alone nothing moves
    still = col.search(query, k=6, feedback=Feedback(like=liked, beta=0.0))
    assert [h.id for h in still] == [h.id for h in before[:6]]


def test_feedback_is_checked(colours):
    col, _ = colours
    with pytest.raises(InvalidRequestError, match="both relevant and not relevant"):
        Feedback(like=(1,), unlike=(1,))
    with pytest.raises(InvalidRequestError, match="gamma"):
        Feedback(like=(1,), gamma=-1)
    with pytest.raises(InvalidRequestError, match="image ids"):
        Feedback(like=_as_given(("3",)))
    with pytest.raises(InvalidRequestError, match="three numbers"):
        Feedback.from_weights((1,), (), (1, 2))
    with pytest.raises(NotFoundError, match="id 99999"):
        col.search(1, feedback=Feedback(like=(99999,)))


def test_query_by_id_equals_query_by_its_file(colours):
    col, paths = colours
    by_file = col.search(paths["green"][1], k=5)
    by_id = col.search(by_file[0].id, k=5)
    assert [h.id for h in by_id] == [h.id for h in by_file]
    assert by_id[0].id == by_file[0].id and by_id[0].score == pytest.approx(0.0, abs=1e-6)
    six = [h.id for h in col.search(by_id[0].id, k=6)]
    assert [h.id for h in col.search(by_id[0].id, k=5, exclude_queries=True)] == six[1:]
    with pytest.raises(NotFoundError, match="id 424242"):
        col.search(424242)


def test_region_searches_by_that_part_only(colours, tmp_path):
    col, _ = colours
    query = _two_colour(tmp_path / "q.png", "green", "yellow")
    left = col.search(Region(query, Box(0.0, 0.0, 0.45, 1.0)), k=6)
    right = col.search(Region(str(query), Box.parse("0.55,0,1,1")), k=6)
    assert _labels(left) == ["green"] * 6
    assert _labels(right) == ["yellow"] * 6
    # a region of an indexed image, by its id
    hit = left[0].id
    assert col.search(Region(hit, Box(0.0, 0.0, 1.0, 1.0)), k=1)[0].label == "green"


@pytest.mark.parametrize(
    "box",
    ["0,0,1", "a,b,c,d", "0.5,0,0.4,1", "0,0,1,1.5", "nan,0,1,1", "0,0,0.01,1"],
)
def test_a_bad_box_is_refused(box):
    with pytest.raises(InvalidRequestError, match="box"):
        Box.parse(box)


def test_pages_and_filters(colours):
    col, _ = colours
    everything = col.search(1, k=12)
    page = col.search(1, k=4, offset=4)
    assert [h.id for h in page] == [h.id for h in everything][4:8]
    assert [h.rank for h in page] == [5, 6, 7, 8] and page.offset == 4
    assert set(_labels(col.search(1, k=24, label="yellow"))) == {"yellow"}
    assert len(col.search(1, k=24, label="yellow")) == 6
    in_folder = col.search(1, k=24, folder="red")
    assert len(in_folder) == 6 and set(_labels(in_folder)) == {"red"}
    assert len(col.search(1, k=24, folder="images/red")) == 6
    assert len(col.search(1, k=24, folder="elsewhere/red")) == 0
    with pytest.raises(InvalidRequestError, match="offset"):
        col.search(1, offset=-1)


def test_a_filter_follows_the_catalogue_and_pages_a_listing(tmp_path):
    """A filter is decided once per catalogue state: a page after a relabelling in another
    connection sees the new labels; folders match by their last parts, whole names only."""
    paths = write_colour_set(tmp_path / "images", per_class=3)
    settings = Settings(collection=tmp_path / "col", workers=1, default_descriptors=("color-hist",))
    with Collection(settings.collection, settings=settings) as col:
        col.add(tmp_path / "images", labels="folder")
        total, page = col.listing(0, 2, label="red")
        assert total == 3 and [r.label for r in page] == ["red", "red"]
        assert col.listing(2, 2, label="red")[1][0].label == "red"
        assert len(col.search(1, k=30, folder="red")) == 3
        assert len(col.search(1, k=30, folder="ed")) == 0  # not part of a name
        assert col.listing(folder="/")[0] == 0  # no folder at all names none
        with Collection(settings.collection, settings=settings, create=False) as other:
            other.store.set_labels({str(p.resolve()): "crimson" for p in paths["red"][:2]})
        assert col.listing(label="red")[0] == 1
        assert {h.label for h in col.search(1, k=30, label="crimson")} == {"crimson"}
        assert len(col.search(1, k=30, label="crimson")) == 2
        assert len(col.search(1, k=30, folder="images/red", label="red")) == 1


def test_cli_like_and_unlike(colours, tmp_path):
    col, _ = colours
    query = _two_colour(tmp_path / "q.png", "red", "blue")
    before = col.search(query, k=12)
    (other,) = {"red", "blue"} - {before[0].label}
    args = ["search", str(query), "-k", "6", "-c", str(col.path), "--json"]
    liked = [str(h.id) for h in before if h.label == other]
    for i in liked:
        args += ["--like", i]
    args += ["--unlike", str(before[0].id)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [h["label"] for h in data["hits"]] == [other] * 6
    assert data["feedback"] == {"like": len(liked), "unlike": 1}
    bad = CliRunner().invoke(app, [*args, "--rocchio", "1,x,0"])
    assert bad.exit_code == 2 and "--rocchio" in bad.output
