"""Tests for the Ray executor (cbir.executors.ray_executor) on a local Ray instance of 2 CPUs.

One instance serves the whole file. It is started with the ``crashy`` test plug-in of
tests/test_extraction.py on PYTHONPATH, so the actors (started by that instance) find it as a
user's installed plug-in. Images are generated here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import cbir  # noqa: E402
from cbir import images  # noqa: E402
from cbir.config import DEFAULT_DESCRIPTORS, Settings  # noqa: E402
from cbir.errors import InvalidRequestError, UnavailableError  # noqa: E402
from cbir.executors.ray_executor import run_tasks_ray  # noqa: E402
from cbir.extraction import CRASH_REASON, Task, WorkerCrashError, extract_chunk  # noqa: E402
from cbir.ingest import IndexInterrupted  # noqa: E402
from tests.conftest import write_colour_set  # noqa: E402
from tests.test_extraction import (  # noqa: E402
    CRASHY_PLUGIN,
    N_TASKS,
    crashy,  # noqa: F401  (the fixture)
    mean_colour,
    tasks_for,
    write_images,
)

#: Learns a vocabulary from the images: its fitted state travels to the actors.
FITTED = "bovw:words=16"


@pytest.fixture(scope="module", autouse=True)
def ray_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A local Ray instance with 2 CPUs for this file, with the crashy plug-in on the
    actors' path; the executor uses a connection it finds open and leaves it open."""
    plugins = tmp_path_factory.mktemp("plugins")
    dist = plugins / "crashy_plugin-0.0.dist-info"
    dist.mkdir()
    (plugins / "crashy_plugin.py").write_text(textwrap.dedent(CRASHY_PLUGIN))
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: crashy-plugin\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[cbir.descriptors]\ncrashy = crashy_plugin:Crashy\n")
    with pytest.MonkeyPatch.context() as mp:  # the instance's processes inherit it
        path = [str(plugins), os.environ.get("PYTHONPATH", "")]
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, path)))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ray_settings(root: Path, **kw: Any) -> Settings:
    return Settings(collection=root, workers=2, executor="ray", **kw)


def catalogue(col: cbir.Collection) -> dict[str, tuple[Any, ...]]:
    return {
        r.path: (r.sha256, r.size, r.mtime_ns, r.status, r.reason, r.label, r.width, r.height)
        for r in col.store.images()
    }


def vectors_by_path(col: cbir.Collection, spec: str) -> dict[str, np.ndarray]:
    paths = {r.id: r.path for r in col.store.images()}
    ids, vectors = col.vectors(spec)
    return {paths[int(i)]: v for i, v in zip(ids, vectors, strict=True)}


def test_ray_gives_the_vectors_and_catalogue_of_the_local_executor(tmp_path: Path) -> None:
    write_colour_set(tmp_path / "images", per_class=6)
    cols = {}
    for executor in ("local", "ray"):
        settings = Settings(collection=tmp_path / executor, workers=2, executor=executor)
        col = cbir.Collection(tmp_path / executor, settings=settings)
        report = col.add(tmp_path / "images", descriptors=DEFAULT_DESCRIPTORS, labels="folder")
        assert (report.added, report.skipped, report.interrupted) == (24, [], False)
        cols[executor] = col
    local, on_ray = cols["local"], cols["ray"]
    try:
        assert catalogue(on_ray) == catalogue(local)
        assert [d.spec for d in on_ray.descriptors] == [d.spec for d in local.descriptors]
        for d in local.descriptors:
            got, want = vectors_by_path(on_ray, d.spec), vectors_by_path(local, d.spec)
            assert sorted(got) == sorted(want) and len(want) == 24
            for path, vector in want.items():
                np.testing.assert_array_equal(got[path], vector, err_msg=f"{d.spec} {path}")
    finally:
        local.close()
        on_ray.close()


def test_a_collection_fitted_here_grows_on_ray_with_its_fitted_state(tmp_path: Path) -> None:
    """Actors describe new images with the vocabulary fitted before, shipped to them: their
    vectors equal an in-process extraction with the collection's own state file."""
    write_colour_set(tmp_path / "first", per_class=3, seed=1)
    write_colour_set(tmp_path / "more", per_class=3, seed=2)
    settings = Settings(collection=tmp_path / "col", workers=1)  # in-process: quick
    with cbir.Collection(tmp_path / "col", settings=settings) as col:
        col.add(tmp_path / "first", descriptors=[FITTED, "color-hist"])
    with cbir.Collection(tmp_path / "col", settings=ray_settings(tmp_path / "col")) as col:
        report = col.add(tmp_path / "more")
        assert (report.added, report.fitted, len(col)) == (12, {}, 24)  # no refit
        record = col.descriptor("bovw")
        state = col.store.root / "models" / f"{record.id}.npz"
        new = sorted(str(p) for p in (tmp_path / "more").rglob("*.*"))
        want = extract_chunk(
            [Task(p, (record.spec,)) for p in new], images.Limits(), {record.spec: str(state)}
        )
        got = vectors_by_path(col, record.spec)
        for update in want:
            np.testing.assert_array_equal(got[update.path], update.vectors[record.spec])


def test_a_stopped_run_keeps_what_was_delivered_and_the_next_one_completes(
    tmp_path: Path,
) -> None:
    n = 100  # more than the chunks in flight at once (2 actors x 2 chunks x 16 files)
    write_images(tmp_path / "images", n)
    cancel = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= 1:
            cancel.set()

    with cbir.Collection(tmp_path / "col", settings=ray_settings(tmp_path / "col")) as col:
        with pytest.raises(IndexInterrupted) as stopped:
            col.add(tmp_path / "images", descriptors=["fotf"], progress=progress, cancel=cancel)
        kept = len(col)
        assert stopped.value.report.added == kept
        assert 0 < kept < n
        assert len(col.vectors("fotf")[0]) == kept
        report = col.add(tmp_path / "images")  # the same command again
        assert (report.added, report.unchanged, report.skipped) == (n - kept, kept, [])
        assert len(col) == n


def test_the_file_that_kills_its_actor_is_skipped_and_the_rest_indexed(
    tmp_path: Path,
    crashy: None,  # noqa: F811
) -> None:
    killer = 5
    paths = write_images(tmp_path / "images", N_TASKS, killers=(killer,))
    with cbir.Collection(tmp_path / "col", settings=ray_settings(tmp_path / "col")) as col:
        report = col.add(tmp_path / "images", descriptors=["crashy"])
        assert report.skipped == [(str(paths[killer]), CRASH_REASON)]
        assert {Path(p).name: r for p, r in col.skipped()} == {paths[killer].name: CRASH_REASON}
        assert len(col) == N_TASKS - 1
        got = vectors_by_path(col, "crashy")
        assert sorted(got) == sorted(str(p) for i, p in enumerate(paths) if i != killer)
        for path, vector in got.items():
            np.testing.assert_allclose(vector, mean_colour(Path(path)), rtol=1e-5)
        again = col.add(tmp_path / "images")  # recorded as skipped: not retried until changed
        assert (again.still_skipped, again.unchanged) == (1, N_TASKS - 1)


def test_actors_that_always_die_stop_the_run_blaming_no_file(
    tmp_path: Path,
    crashy: None,  # noqa: F811
) -> None:
    """Every file kills its actor: after the chunks in flight, a chunk run on its own dies too,
    so the actors, not the files, are the likelier cause: the run stops, nothing is blamed."""
    paths = write_images(tmp_path / "images", 20, killers=tuple(range(20)))
    got: list[Any] = []
    with pytest.raises(WorkerCrashError, match="Ray extraction actors died 3 times"):
        run_tasks_ray(
            tasks_for(paths, "crashy"),
            workers=2,
            limits=images.Limits(),
            on_result=got.append,
            chunk_size=2,
        )
    assert got == []


def test_without_ray_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_images(tmp_path / "images", 4)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if not installed
    with cbir.Collection(tmp_path / "col", settings=ray_settings(tmp_path / "col")) as col:
        with pytest.raises(UnavailableError, match=r"pip install 'cbir\[ray\]'"):
            col.add(tmp_path / "images", descriptors=["fotf"])
        assert len(col) == 0


def test_an_unknown_executor_lists_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidRequestError, match="local, ray"):
        Settings(executor="spark")
    monkeypatch.setenv("CBIR_EXECUTOR", "ray")
    monkeypatch.setenv("CBIR_RAY_ADDRESS", "ray://head:10001")
    settings = Settings.from_env()
    assert (settings.executor, settings.ray_address) == ("ray", "ray://head:10001")


def test_cli_index_on_a_ray_cluster_prints_clean_json(tmp_path: Path) -> None:
    """``cbir index --address``: a separate process connects to a running cluster (this
    file's instance), indexes, disconnects; nothing of Ray's on stdout (the JSON) or stderr."""
    write_images(tmp_path / "images", 12)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CBIR_"))}
    env["RAY_AUTH_MODE"] = "token"  # as the instance (Ray's default); the token is in ~/.ray
    address = ray.get_runtime_context().gcs_address
    done = subprocess.run(
        [
            *(sys.executable, "-m", "cbir.cli", "index", str(tmp_path / "images")),
            *("--address", address, "--workers", "2", "-d", "fotf", "--json"),
            *("-c", str(tmp_path / "col")),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["added"], report["skipped"]) == (12, [])
    assert "ray" not in done.stderr.lower(), done.stderr


def test_an_address_where_nothing_listens_fails_at_once() -> None:
    from cbir.executors.ray_executor import _check_reachable

    with pytest.raises(UnavailableError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:1"):
        _check_reachable("127.0.0.1:1")
    _check_reachable("auto")  # no port: left to Ray


def test_cli_index_without_an_address_starts_and_stops_its_own_instance(tmp_path: Path) -> None:
    write_images(tmp_path / "images", 6)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CBIR_"))}
    done = subprocess.run(
        [
            *(sys.executable, "-m", "cbir.cli", "index", str(tmp_path / "images")),
            *("--executor", "ray", "--workers", "2", "-d", "fotf", "--json"),
            *("-c", str(tmp_path / "col")),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["added"] == 6
    assert "ray" not in done.stderr.lower(), done.stderr  # no notices (token auth, start)
