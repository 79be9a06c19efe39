"""Where extraction runs: the process pool of this machine, or a Ray cluster.

An executor takes the extraction tasks (:class:`cbir.extraction.Task`), has them processed
somewhere, a chunk at a time by :func:`cbir.extraction.extract_chunk`, and hands every result
to ``on_result`` *in the calling thread*. Nothing is written where the work runs: the caller
(``Ingest._extract``) writes the results it is handed in atomic batches, so what a killed or
stopped run keeps, and how the same command continues it, is the same whichever executor ran
the chunks. Every executor has the signature of :func:`cbir.extraction.run_tasks` and its
promises: each task delivered at most once, True only when every task was delivered, False
when ``cancel`` stopped the run.

A new executor is one module and one line in :data:`EXECUTORS` (a factory that reads what it
needs from the settings). Importing this module is cheap: each factory imports its executor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from cbir.errors import InvalidRequestError

if TYPE_CHECKING:
    import threading

    from cbir import images
    from cbir.config import Settings
    from cbir.extraction import StateFiles, Task
    from cbir.store import ImageUpdate


class Executor(Protocol):
    """Runs extraction tasks; see :func:`cbir.extraction.run_tasks` for the contract."""

    def __call__(
        self,
        tasks: Sequence[Task],
        *,
        workers: int,
        limits: images.Limits,
        on_result: Callable[[ImageUpdate], None],
        states: StateFiles | None = None,
        cancel: threading.Event | None = None,
        chunk_size: int = 16,
    ) -> bool: ...


def _local(settings: Settings) -> Executor:
    """Worker processes on this machine (in-process with one worker)."""
    from cbir.extraction import run_tasks

    return run_tasks


def _ray(settings: Settings) -> Executor:
    """Ray actors on a cluster (``ray_address``, ``RAY_ADDRESS``) or a local Ray instance; with
    ``workers`` unset, one actor per CPU of a cluster it connects to."""
    from cbir.executors.ray_executor import run_tasks_ray

    return functools.partial(
        run_tasks_ray, address=settings.ray_address, fill_cluster=settings.workers <= 0
    )


#: executor name -> factory of the executor from the settings
EXECUTORS: dict[str, Callable[[Settings], Executor]] = {"local": _local, "ray": _ray}


def executor_names() -> tuple[str, ...]:
    return tuple(EXECUTORS)


def executor_for(settings: Settings) -> Executor:
    """The executor ``settings.executor`` names."""
    try:
        factory = EXECUTORS[settings.executor]
    except KeyError:
        raise InvalidRequestError(
            f"unknown executor {settings.executor!r}; choose one of {', '.join(EXECUTORS)}"
        ) from None
    return factory(settings)
