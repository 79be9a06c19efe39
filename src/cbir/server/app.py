"""The service's app: ``create_app(settings)`` builds it over one collection.

One place maps errors to HTTP (``STATUS``): the ``cbir.errors`` kinds, an unusable image, a
validation error of FastAPI. Every error answer is ``{"error": kind, "message": text}``.
Searches and every other call into the collection run on a thread pool (``Service.run``), so
the event loop keeps accepting and reading requests while NumPy, FAISS and PyTorch work (they
release the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from cbir import errors
from cbir.collection import Collection
from cbir.config import Settings
from cbir.images import ImageError
from cbir.server.batching import Batcher
from cbir.server.jobs import Jobs
from cbir.server.limits import BodyLimit

STATIC = Path(__file__).parent / "static"

#: HTTP status of each kind of error (``cbir.errors``).
STATUS = {
    errors.InvalidRequestError.kind: 400,
    errors.NotFoundError.kind: 404,
    errors.BusyError.kind: 409,
    errors.UnavailableError.kind: 501,
    errors.CorruptError.kind: 500,
}
#: Words of an ImageError's reason that mean the image is over the pixel limit (413, not 400):
#: ``cbir.images`` words every such refusal "... megapixels, over the limit of ...".
_PIXEL_LIMIT_WORDS = ("megapixels",)

#: Headers on every answer: no sniffing of types, no framing, only our own scripts and images.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'",
}

_T = TypeVar("_T")


class ApiError(HTTPException):
    """An error the service words itself (missing key, too many files...)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(status, message)
        self.kind = kind


class Service:
    """What every route uses: the collection, the worker pool, the upload batcher, the jobs."""

    def __init__(self, settings: Settings, collection: Collection | None = None) -> None:
        server = settings.server
        # uploads are held to the service's limits, tighter than indexing's
        limited = replace(
            settings,
            max_pixels=min(settings.max_pixels, server.max_upload_pixels),
            max_bytes=min(settings.max_bytes, server.max_request_bytes),
        )
        self.settings = limited
        self.collection = collection or Collection(
            settings.collection, settings=limited, create=False
        )
        self.pool = ThreadPoolExecutor(server.worker_count, thread_name_prefix="cbir-search")
        self.batcher = Batcher(self._describe, window=server.batch_window, size=server.batch_size)
        self.jobs = Jobs(self.collection)
        self.upload_dir = server.upload_dir or self.collection.path / "uploads"

    async def run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` on the worker pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    async def _describe(self, descriptor: str | None, items: Sequence[Any]) -> np.ndarray:
        return await self.run(self._vectors, descriptor, list(items))

    def _vectors(self, descriptor: str | None, items: list[Any]) -> np.ndarray:
        record = self.collection.descriptor(descriptor)
        return self.collection.query_vectors(items, record)[0]

    def close(self) -> None:
        self.jobs.close()
        self.pool.shutdown(wait=True)
        self.collection.close()


def create_app(settings: Settings | None = None, *, collection: Collection | None = None) -> Any:
    """The ASGI app over ``settings.collection`` (or an open ``collection``)."""
    settings = settings or Settings.from_env()
    service = Service(settings, collection)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(
        title="cbir",
        summary="Find the images in a collection that look most like yours.",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service
    _error_handlers(app)

    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit, limit=settings.server.max_request_bytes)

    from cbir.server.routes import router

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every answer (plain ASGI: it leaves the request body
    stream, and the body limit's error, untouched)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                have = {name.lower() for name, _ in message.get("headers", [])}
                extra = [
                    (n.lower().encode(), v.encode())
                    for n, v in SECURITY_HEADERS.items()
                    if n.lower().encode() not in have
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def error_answer(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message}, status_code=status)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.CbirError)
    async def cbir_error(request: Request, exc: errors.CbirError) -> JSONResponse:
        return error_answer(STATUS[exc.kind], exc.kind, str(exc))

    @app.exception_handler(ImageError)
    async def image_error(request: Request, exc: ImageError) -> JSONResponse:
        if "over the limit" in exc.reason and any(w in exc.reason for w in _PIXEL_LIMIT_WORDS):
            return error_answer(413, "too_large", str(exc))
        return error_answer(400, errors.InvalidRequestError.kind, str(exc))

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> JSONResponse:
        # a bad argument deep in a registry (errors.kind_of counts it as invalid)
        return error_answer(400, errors.InvalidRequestError.kind, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else e.get("msg", ""))
        return error_answer(422, errors.InvalidRequestError.kind, "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = getattr(exc, "kind", None) or {413: "too_large", 404: "not_found"}.get(
            exc.status_code, "http"
        )
        response = error_answer(exc.status_code, kind, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response
