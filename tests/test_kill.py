"""Kill trials: `cbir index`, `cbir remove` and re-indexing SIGKILLed at named moments.

Each trial runs the command in a child process paused at a point of the writer
(``CBIR_TEST_PAUSE_AT``, see cbir.faults), so the kill lands exactly there: during extraction,
with a batch's files written, inside its transaction, while a fitted state is saved, during each
step of a compaction. The main process alone is killed (its workers must die with it) or its
whole process group. After each kill: no process is left behind, `check` passes, what was
committed before the kill is all there, and running the command again completes with every file
once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import cbir
from cbir.collection import Collection
from cbir.config import Settings
from cbir.errors import NotFoundError
from cbir.faults import ENV, POINTS
from cbir.store import Store
from tests.conftest import colour_image, write_colour_set

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; parent-death signal is Linux's"
)

SPECS = ("color-hist", "fotf")
#: cheap enough to fit in a trial: few words, few keypoints, small images
BOVW = "bovw:words=4,max_keypoints=64,max_side=128"
PATIENCE = 60
FLUSH_EVERY = 2  # many batches: kills land between and inside them
REMOVED = ("red", "green")  # half the collection: enough dead rows to compact
CHANGED = 6


@dataclass(frozen=True)
class Trial:
    command: str  # index | fit | remove | reindex | newdesc
    point: str
    workers: int
    group: bool  # kill the whole process group, else the main process alone

    def __str__(self) -> str:
        return f"{self.command}-{self.point}-w{self.workers}-{'group' if self.group else 'main'}"


TRIALS = [
    Trial("index", "extract", 2, False),
    Trial("index", "extract", 2, True),
    Trial("index", "extract#5", 2, False),
    Trial("index", "batch-files", 1, False),
    Trial("index", "batch-files#3", 2, True),
    Trial("index", "batch-commit", 1, False),
    Trial("index", "batch-commit#4", 2, False),
    Trial("index", "batch-commit#2", 1, True),
    Trial("index", "compact-files", 1, False),
    Trial("index", "compact-commit", 1, True),
    Trial("index", "compact-unlink", 1, False),
    Trial("fit", "state-file", 1, False),
    Trial("fit", "state-commit", 1, True),
    Trial("fit", "extract#30", 1, False),
    Trial("remove", "remove-commit", 1, False),
    Trial("remove", "remove-commit", 1, True),
    Trial("remove", "compact-files", 1, False),
    Trial("remove", "compact-unlink", 1, True),
    Trial("reindex", "extract", 2, False),
    Trial("reindex", "batch-commit", 1, True),
    Trial("reindex", "batch-files#2", 2, False),
    Trial("newdesc", "batch-commit#2", 1, False),
    Trial("newdesc", "extract#3", 2, True),
]


def descendants(pid: int) -> set[int]:
    """Living processes below ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def committed(col: Path) -> tuple[dict[str, str | None], dict[int, int]]:
    """What a reader sees now: ok image -> content hash, and vectors per descriptor."""
    with Store(col, create=False) as store:
        images = {r.path: r.sha256 for r in store.images(status="ok")}
        return images, store.vector_counts()


def prepare(trial: Trial, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """The images and, for commands on an existing collection, the collection; returns the
    command's arguments."""
    images = tmp_path / "images"
    paths = write_colour_set(images, per_class=6, size=128 if trial.command == "fit" else 64)
    col = tmp_path / "col"
    specs = [*SPECS, BOVW] if trial.command == "fit" else list(SPECS)
    args = ["index", str(images), "--json", *(a for s in specs for a in ("-d", s))]
    if trial.command in ("remove", "reindex", "newdesc"):
        with Collection(settings=Settings(collection=col, workers=1)) as c:
            c.add(images, descriptors=specs)
        args = ["index", str(images), "--json"]
    if trial.command == "remove":
        args = ["remove", *(str(images / name) for name in REMOVED)]
    if trial.command == "reindex":
        rng = np.random.default_rng(99)
        for path in paths["blue"] + paths["yellow"][: CHANGED - len(paths["blue"])]:
            colour_image((90, 90, 90), rng, 64).save(path, quality=92)
    if trial.command == "newdesc":
        args += ["-d", "lbp"]
    return images, col, args


def rerun(trial: Trial, images: Path, col: Path) -> None:
    """The same command again, to completion, in this process."""
    with Collection(settings=Settings(collection=col, workers=1)) as c:
        if trial.command == "remove":
            with contextlib.suppress(NotFoundError):  # removed before the kill
                c.remove([images / name for name in REMOVED])
        else:
            c.add(images, descriptors=["lbp"] if trial.command == "newdesc" else None)


def launch(args: list[str], col: Path, trial: Trial) -> subprocess.Popen[str]:
    src = str(Path(cbir.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        ENV: trial.point,
        "CBIR_WORKERS": str(trial.workers),
        "CBIR_FLUSH_EVERY": str(FLUSH_EVERY),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "cbir.cli", *args, "--collection", str(col)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group: killing the group spares the test runner
    )


def wait_for_pause(child: subprocess.Popen[str]) -> None:
    assert child.stderr is not None
    deadline = time.monotonic() + PATIENCE
    lines = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([child.stderr], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = child.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("cbir: paused at"):
            return
    child.kill()
    raise AssertionError(f"never paused (exit {child.poll()}): {''.join(lines)[-2000:]}")


def test_every_pause_point_is_tried() -> None:
    assert {t.point.partition("#")[0] for t in TRIALS} == POINTS
    assert len(TRIALS) >= 20


@pytest.mark.parametrize("trial", TRIALS, ids=str)
def test_a_killed_run_loses_nothing_committed_and_the_rerun_completes(
    trial: Trial, tmp_path: Path
) -> None:
    images, col, args = prepare(trial, tmp_path)
    child = launch(args, col, trial)
    try:
        wait_for_pause(child)
        before = committed(col) if (col / "catalogue.sqlite").exists() else ({}, {})
        below = descendants(child.pid)
        if trial.workers > 1 and trial.point.startswith("extract"):
            assert below, "the workers of a paused extraction are running"
        if trial.group:
            os.killpg(child.pid, signal.SIGKILL)
        else:
            child.kill()
        child.wait(PATIENCE)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        assert child.stderr is not None
        child.stderr.close()
    deadline = time.monotonic() + PATIENCE
    while any(alive(p) for p in below) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in below if alive(p)], "processes left behind"
    with Collection(col, settings=Settings(collection=col, workers=1), create=False) as c:
        assert c.check().ok
    assert committed(col) == before  # everything committed is there, nothing half-written
    rerun(trial, images, col)
    with Collection(col, settings=Settings(collection=col, workers=1), create=False) as c:
        report = c.check()
        # a removal done before the kill leaves the rerun nothing to write, so a file the
        # killed compaction made stays until the next writer: harmless, and only then
        harmless = {"index", "orphan-files"} if trial.command == "remove" else {"index"}
        assert report.ok and not [f for f in report.findings if f.what not in harmless]
        ok = {r.path for r in c.store.images(status="ok")}
        assert c.store.counts()["skipped"] == 0
        n_descriptors = len(c.descriptors)
        counts = c.store.vector_counts()
    every = {str(p) for p in images.rglob("*") if p.is_file()}
    if trial.command == "remove":
        every = {p for p in every if Path(p).parent.name not in REMOVED}
    assert ok == every  # every file once (paths are unique), and only those
    assert sorted(counts.values()) == [len(every)] * n_descriptors
    hashes, _ = committed(col)  # each as it is on disk now (the changed files re-extracted)
    assert hashes == {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in every}
