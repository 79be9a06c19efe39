"""Uploads that arrive together are described together.

A CNN costs far less per image in a batch than one image at a time, and under load many
searches by upload arrive within a few milliseconds of each other. Each upload's image waits
``window`` seconds (or until ``size`` images are waiting) for others with the same descriptor;
the batch is then described in one call in the worker pool and each request gets its rows back.
One batch per descriptor runs at a time: images that arrive meanwhile wait for it to end and go
together in the next, so batches grow with the load instead of queueing up small. If a batch
fails (one unreadable image), each of its images is described again on its own, so each request
gets its own answer and its own error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

#: describe(descriptor, items) -> one vector per item, run in the worker pool; the descriptor
#: is a spec as a client names it (None: the collection's first), resolved in the pool
Describe = Callable[[str | None, Sequence[Any]], Awaitable[np.ndarray]]
Entry = tuple[Any, "asyncio.Future[Any]"]


class Batcher:
    """Collects query images per descriptor for ``window`` seconds, up to ``size`` images."""

    def __init__(self, describe: Describe, *, window: float, size: int) -> None:
        self._describe = describe
        self.window = window
        self.size = size
        self._waiting: dict[str | None, list[Entry]] = {}
        self._timers: dict[str | None, asyncio.TimerHandle] = {}
        self._running: set[str | None] = set()
        #: batches described, and images in them (for the benchmark and tests)
        self.batches = 0
        self.images = 0

    async def vectors(self, descriptor: str | None, items: Sequence[Any]) -> np.ndarray:
        """The vectors of ``items`` (encoded images or regions) under ``descriptor``,
        described together with other requests' items."""
        loop = asyncio.get_running_loop()
        futures = []
        queue = self._waiting.setdefault(descriptor, [])
        for item in items:
            future: asyncio.Future[Any] = loop.create_future()
            queue.append((item, future))
            futures.append(future)
        self._schedule(descriptor)
        rows = await asyncio.gather(*futures, return_exceptions=True)
        for row in rows:
            if isinstance(row, BaseException):
                raise row
        return np.stack(rows)

    def _schedule(self, descriptor: str | None) -> None:
        """Start the next batch now if it is full, else after the window; not while one runs."""
        if descriptor in self._running or not self._waiting.get(descriptor):
            return
        if len(self._waiting[descriptor]) >= self.size:
            self._flush(descriptor)
        elif descriptor not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[descriptor] = loop.call_later(self.window, self._flush, descriptor)

    def _flush(self, descriptor: str | None) -> None:
        timer = self._timers.pop(descriptor, None)
        if timer is not None:
            timer.cancel()
        waiting = self._waiting.get(descriptor, [])
        batch, self._waiting[descriptor] = waiting[: self.size], waiting[self.size :]
        if batch:
            self._running.add(descriptor)
            task = asyncio.ensure_future(self._run(descriptor, batch))
            task.add_done_callback(_ignore)

    async def _run(self, descriptor: str | None, batch: list[Entry]) -> None:
        try:
            await self._describe_batch(descriptor, batch)
        finally:
            self._running.discard(descriptor)
            self._schedule(descriptor)

    async def _describe_batch(self, descriptor: str | None, batch: list[Entry]) -> None:
        self.batches += 1
        self.images += len(batch)
        try:
            vectors = await self._describe(descriptor, [item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1:  # its own error already
                if not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                return
            await asyncio.gather(*(self._alone(descriptor, entry) for entry in batch))
            return
        for (_, future), vector in zip(batch, vectors, strict=True):
            if not future.done():
                future.set_result(vector)

    async def _alone(self, descriptor: str | None, entry: Entry) -> None:
        item, future = entry
        try:
            vector = (await self._describe(descriptor, [item]))[0]
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(vector)


def _ignore(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
