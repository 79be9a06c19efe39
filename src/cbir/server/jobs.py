"""Background jobs of the service: adding images, one at a time, with progress.

A collection has one writer at a time, so jobs run on a single thread, in the order they were
asked for; searches go on meanwhile (they read the committed catalogue and see the new images
as each batch commits, through the change feed). A job's report names skipped files by their
file name only: a client is never told a server path.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbir.collection import Collection, IndexInterrupted
from cbir.errors import NotFoundError, kind_of
from cbir.ingest import Labels

#: Finished jobs kept for clients to read before the oldest are forgotten.
KEEP_FINISHED = 100


@dataclass
class Job:
    """One add: its state ("queued", "running", "done", "failed"), progress and outcome."""

    id: str
    sources: int
    state: str = "queued"
    done: int = 0
    total: int = 0
    message: str | None = None
    report: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "message": self.message,
            "report": self.report,
        }


class Jobs:
    """Runs adds on one thread and keeps their state for ``/api/jobs/{id}``."""

    def __init__(self, collection: Collection) -> None:
        self.collection = collection
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbir-job")

    def add(self, sources: list[Path], *, labels: Labels = None) -> Job:
        """Queue an add of ``sources`` (files or folders); returns the job at once."""
        job = Job(id=uuid.uuid4().hex, sources=len(sources))
        with self._lock:
            self._forget_old()
            self._jobs[job.id] = job
        self._runner.submit(self._run, job, sources, labels)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id!r} (finished jobs are kept for a while only)")
        return job

    def close(self) -> None:
        """Stop a running add after its current batch (saved) and wait for it."""
        self._cancel.set()
        self._runner.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job, sources: list[Path], labels: Labels) -> None:
        job.state = "running"

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        try:
            report = self.collection.add(
                *sources, labels=labels, progress=progress, cancel=self._cancel
            )
            self.collection.build_indexes()
        except IndexInterrupted:
            job.state, job.message = "failed", "the server stopped; what was done is saved"
        except Exception as exc:
            if kind_of(exc) is None:
                job.state, job.message = "failed", f"internal error: {type(exc).__name__}"
                raise
            job.state, job.message = "failed", str(exc)
        else:
            job.state = "done"
            job.report = {
                "added": report.added,
                "updated": report.updated,
                "unchanged": report.unchanged,
                "skipped": [{"name": Path(p).name, "reason": r} for p, r in report.skipped],
                "seconds": round(report.seconds, 3),
            }
        finally:
            job.finished = time.time()

    def _forget_old(self) -> None:
        finished = sorted(
            (j for j in self._jobs.values() if j.finished is not None), key=lambda j: j.created
        )
        for j in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[j.id]
