"""``cbir serve``: the search service (REST API + web page) over one collection.

A face like the CLI: each route parses the request, calls one :class:`cbir.Collection` method
(in a worker thread) and renders its answer; errors of the ``cbir.errors`` kinds are mapped to
HTTP statuses in one place (``app.STATUS``). FastAPI and uvicorn are the ``serve`` extra and
are imported only here, so the rest of cbir works without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cbir.errors import UnavailableError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from cbir.config import Settings

INSTALL = "pip install 'cbir[serve]'"


def require_serve_extra() -> None:
    """Raise UnavailableError with the install command when FastAPI or uvicorn is missing."""
    import importlib.util

    missing = [
        m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise UnavailableError(
            f"the search service needs {', '.join(missing)}, which are not installed; "
            f"install them with: {INSTALL}"
        )


def create_app(settings: Settings | None = None, **kwargs: Any) -> FastAPI:
    """The service's ASGI app (see :func:`cbir.server.app.create_app`)."""
    require_serve_extra()
    from cbir.server.app import create_app as make

    return make(settings, **kwargs)
