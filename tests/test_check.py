"""`cbir check` and Collection.check(): each kind of damage is found, named and repaired, and the
next `cbir index` redoes what the repair removed."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.cli import app
from cbir.collection import Collection
from cbir.config import Settings
from tests.conftest import write_colour_set

runner = CliRunner()
SPECS = ["color-hist", "fotf"]


def cbir(*args: object, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args], env={"CBIR_WORKERS": "1"})
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture
def indexed(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    write_colour_set(images, per_class=3, size=32)
    col = tmp_path / "col"
    settings = Settings(collection=col, workers=1, index="flat")
    with Collection(settings=settings) as c:
        c.add(images, descriptors=SPECS)
        c.build_indexes()
    return images, col


def sql(col: Path, statement: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(col / "catalogue.sqlite") as db:
        return db.execute(statement, args).fetchall()


def segment_files(col: Path) -> list[Path]:
    return sorted((col / "vectors").glob("*/*.npy"))


def put_nan(col: Path) -> None:
    path = segment_files(col)[0]
    a = np.load(path, mmap_mode="r+")
    a[2, 0] = np.nan
    a.flush()


def delete_a_segment(col: Path) -> None:
    segment_files(col)[0].unlink()


def cut_a_segment(col: Path) -> None:
    path = segment_files(col)[0]
    np.save(path, np.load(path)[:3])


def vectors_of_a_skipped_image(col: Path) -> None:
    sql(col, "UPDATE images SET status = 'skipped', reason = 'x' WHERE id = 1")


def an_unreadable_fitted_state(col: Path) -> None:
    (col / "models").mkdir(exist_ok=True)
    (col / "models" / "1.npz").write_bytes(b"not a zip file")


def an_index_out_of_step(col: Path) -> None:
    record = next((col / "indexes").glob("1-*.json"))
    data = json.loads(record.read_text())
    data["vectors"] += 5
    record.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (put_nan, "not-finite"),
        (delete_a_segment, "segment-file"),
        (cut_a_segment, "segment-file"),
        (vectors_of_a_skipped_image, "vectors-of-skipped"),
        (an_unreadable_fitted_state, "fitted-state"),
        (an_index_out_of_step, "index"),
    ],
)
def test_damage_is_found_repaired_and_redone_by_the_next_index(
    indexed: tuple[Path, Path], damage: Callable[[Path], None], what: str
) -> None:
    images, col = indexed
    assert json.loads(cbir("check", "--json", "-c", col))["ok"] is True
    before = sql(col, "SELECT descriptor_id, COUNT(*) FROM vectors GROUP BY descriptor_id")
    damage(col)
    found = json.loads(cbir("check", "--json", "-c", col, code=6))
    assert found["ok"] is False and what in {e["what"] for e in found["errors"]}
    assert "error" in cbir("check", "-c", col, code=6)
    repaired = json.loads(cbir("check", "--repair", "--json", "-c", col))
    assert repaired["ok"] is True and what in {f["what"] for f in repaired["repaired"]}
    if what == "vectors-of-skipped":
        sql(col, "UPDATE images SET status = 'ok', reason = NULL WHERE id = 1")
    cbir("index", images, "--index", "flat", "-c", col)  # the index kind it had
    after = json.loads(cbir("check", "--json", "-c", col))
    assert after["ok"] is True and not after["notes"]
    assert sql(col, "SELECT descriptor_id, COUNT(*) FROM vectors GROUP BY descriptor_id") == before


def test_a_file_left_by_a_killed_run_is_a_note_and_repair_removes_it(
    indexed: tuple[Path, Path],
) -> None:
    _, col = indexed
    orphan = col / "vectors" / "1" / ".tmp-0123.npy"
    orphan.write_bytes(b"half written")
    report = json.loads(cbir("check", "--json", "-c", col))
    assert report["ok"] is True and [n["what"] for n in report["notes"]] == ["orphan-files"]
    cbir("check", "--repair", "-c", col)
    assert not orphan.exists()


def test_a_damaged_catalogue_is_reported_not_read(indexed: tuple[Path, Path]) -> None:
    _, col = indexed
    catalogue = col / "catalogue.sqlite"
    data = bytearray(catalogue.read_bytes())
    data[0:16] = b"garbage garbage!"  # the header: no longer an SQLite database
    catalogue.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        Path(str(catalogue) + suffix).unlink(missing_ok=True)
    assert "catalogue" in cbir("check", "-c", col, code=6)


def test_check_reports_in_the_python_api_what_it_looked_at(indexed: tuple[Path, Path]) -> None:
    _, col = indexed
    with Collection(col, settings=Settings(collection=col, workers=1)) as c:
        report = c.check()
    assert report.ok and report.checked["images"] == 12
    assert report.checked["vectors"] == 12 * len(SPECS) and report.checked["indexes"] >= 1
