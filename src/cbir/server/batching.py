"""Uploads that arrive together are described together.

A CNN costs far less per image in a batch than one image at a time, and under load many
searches by upload arrive within a few milliseconds of each other. Each upload's image waits at
most ``window`` seconds (or until ``size`` images are waiting) for others with the same
descriptor; the batch is then described in one call in the worker pool and each request gets
its rows back. If the batch fails (one unreadable image), every image of it is described again
on its own, so each request gets its own answer and its own error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from cbir.store import DescriptorRecord

#: describe(record, items) -> one vector per item, run in the worker pool
Describe = Callable[[DescriptorRecord, Sequence[Any]], Awaitable[np.ndarray]]


class Batcher:
    """Collects query images per descriptor for ``window`` seconds, up to ``size`` images."""

    def __init__(self, describe: Describe, *, window: float, size: int) -> None:
        self._describe = describe
        self.window = window
        self.size = size
        self._waiting: dict[int, list[tuple[DescriptorRecord, Any, asyncio.Future[Any]]]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        #: batches described, and images in them (for the benchmark and tests)
        self.batches = 0
        self.images = 0

    async def vectors(self, record: DescriptorRecord, items: Sequence[Any]) -> np.ndarray:
        """The vectors of ``items`` (encoded images or regions), described with others."""
        loop = asyncio.get_running_loop()
        futures = []
        queue = self._waiting.setdefault(record.id, [])
        for item in items:
            future: asyncio.Future[Any] = loop.create_future()
            queue.append((record, item, future))
            futures.append(future)
        if len(queue) >= self.size:
            self._flush(record.id)
        elif record.id not in self._timers:
            self._timers[record.id] = loop.call_later(self.window, self._flush, record.id)
        rows = await asyncio.gather(*futures, return_exceptions=True)
        for row in rows:
            if isinstance(row, BaseException):
                raise row
        return np.stack(rows)

    def _flush(self, key: int) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        batch = self._waiting.pop(key, [])
        if batch:
            task = asyncio.ensure_future(self._run(batch))
            task.add_done_callback(_ignore)

    async def _run(self, batch: list[tuple[DescriptorRecord, Any, asyncio.Future[Any]]]) -> None:
        record = batch[0][0]
        self.batches += 1
        self.images += len(batch)
        try:
            vectors = await self._describe(record, [item for _, item, _ in batch])
        except Exception as exc:
            if len(batch) == 1:  # its own error already
                if not batch[0][2].done():
                    batch[0][2].set_exception(exc)
                return
            await asyncio.gather(*(self._alone(record, entry) for entry in batch))
            return
        for (_, _, future), vector in zip(batch, vectors, strict=True):
            if not future.done():
                future.set_result(vector)

    async def _alone(
        self, record: DescriptorRecord, entry: tuple[DescriptorRecord, Any, asyncio.Future[Any]]
    ) -> None:
        _, item, future = entry
        try:
            vector = (await self._describe(record, [item]))[0]
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(vector)


def _ignore(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
