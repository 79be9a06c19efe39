"""The REST API. Each route parses its request, calls one Collection method on the worker pool
and renders the answer (``schemas``); nothing is decided here that the Python API does not
decide too.

Files are served only from the catalogue (an id, never a path from the request) and from the
thumbnail cache; folders to add are accepted only below the roots the server was started with.
"""

from __future__ import annotations

import io
import os
import secrets
import stat
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from cbir.errors import InvalidRequestError, NotFoundError
from cbir.search.feedback import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_GAMMA, Feedback
from cbir.search.region import Box, Region
from cbir.server.app import ApiError, Service
from cbir.server.schemas import (
    ErrorOut,
    JobOut,
    PageOut,
    SearchOut,
    record_out,
    search_out,
)
from cbir.thumbnails import DEFAULT_SIDE

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 422)
}
router = APIRouter(prefix="/api", responses=ERRORS)
#: Images per page of the listing, at most.
MAX_PAGE = 500


def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]


def require_key(request: Request) -> None:
    """Writes need the server's API key in ``X-API-Key``, compared in constant time."""
    key = request.app.state.service.settings.server.api_key
    if key is None:
        raise ApiError(
            403,
            "forbidden",
            "this server takes no writes: start it with CBIR_API_KEY set to allow adding and "
            "deleting images",
        )
    given = request.headers.get("x-api-key")
    if not given:
        raise ApiError(
            401,
            "unauthorized",
            "this request changes the collection: send the API key in the X-API-Key header",
        )
    if not secrets.compare_digest(given.encode(), key.encode()):
        raise ApiError(403, "forbidden", "wrong API key")


# -- stats and browsing ------------------------------------------------------------------------
@router.get("/stats")
async def stats(svc: ServiceDep) -> dict[str, Any]:
    """Counts, labels, descriptors with their metrics, and the server's limits."""
    summary = await svc.run(svc.collection.summary)
    server = svc.settings.server
    summary["limits"] = {
        "max_request_bytes": server.max_request_bytes,
        "max_upload_pixels": server.max_upload_pixels,
        "max_files": server.max_files,
        "max_k": server.max_k,
        "max_offset": server.max_offset,
    }
    summary["writes"] = server.api_key is not None
    summary["batching"] = {"batches": svc.batcher.batches, "images": svc.batcher.images}
    return summary


@router.get("/images", response_model=PageOut)
async def listing(
    svc: ServiceDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    label: str | None = None,
    folder: str | None = None,
) -> dict[str, Any]:
    """One page of the collection's images, optionally of one label or folder."""
    total, page = await svc.run(
        svc.collection.listing, offset, limit, label=label or None, folder=folder or None
    )
    return {
        "total": total,
        "offset": offset,
        "limit": limit,
        "images": [record_out(r) for r in page],
    }


@router.get("/images/{image_id}")
async def image_info(image_id: int, svc: ServiceDep) -> dict[str, Any]:
    record = await svc.run(svc.collection.image, image_id)
    return {**record_out(record), "width": record.width, "height": record.height}


@router.get("/images/{image_id}/thumbnail", response_class=FileResponse)
async def image_thumbnail(
    image_id: int, svc: ServiceDep, side: Annotated[int, Query()] = DEFAULT_SIDE
) -> FileResponse:
    """A JPEG thumbnail (longer side 128, 256 or 512), made once and kept."""
    path = await svc.run(svc.collection.thumbnail, image_id, side)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


@router.get("/images/{image_id}/file", response_class=FileResponse)
async def image_file(image_id: int, svc: ServiceDep) -> FileResponse:
    """The catalogued file itself, with the type its content shows (never its name's)."""
    record = await svc.run(svc.collection.image, image_id)
    media_type = await svc.run(_sniffed_type, record.path)
    return FileResponse(record.path, media_type=media_type)


def _sniffed_type(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        raise NotFoundError("the image's file is no longer there") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotFoundError("the image's file is no longer a regular file")
    try:
        with Image.open(path) as im:
            return Image.MIME.get(im.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError):
        return "application/octet-stream"


@router.get("/images/{image_id}/duplicates", response_model=SearchOut)
async def duplicates(
    image_id: int,
    svc: ServiceDep,
    descriptor: str = "phash",
    threshold: Annotated[int | None, Query(ge=0)] = None,
) -> dict[str, Any]:
    """Near copies of an image by a hash descriptor, scored in differing bits."""
    started = time.perf_counter()
    result = await svc.run(svc.collection.copies_of, image_id, descriptor, threshold=threshold)
    return search_out(result, time.perf_counter() - started)


# -- searching -----------------------------------------------------------------------------------
class SearchForm(BaseModel):
    """A search's parameters, from a form (POST) or a query string (GET)."""

    id: list[int] = []
    box: str | None = None
    descriptor: list[str] = []
    metric: list[str] = []
    k: int = 10
    offset: int = 0
    combine: str = "mean"
    label: str | None = None
    folder: str | None = None
    like: list[int] = []
    unlike: list[int] = []
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    gamma: float = DEFAULT_GAMMA
    expand: int = 0
    exclude_queries: bool = False


@router.post("/search", response_model=SearchOut)
async def search_upload(
    svc: ServiceDep,
    form: Annotated[SearchForm, Form()],
    files: Annotated[list[UploadFile], File(description="Query image(s).")] = [],  # noqa: B006
) -> dict[str, Any]:
    """Search by uploaded image(s) and/or ids of indexed images (several are combined), or by
    a region (``box``: left,top,right,bottom as fractions) of the one query image; refine with
    the ids marked relevant (``like``) and not relevant (``unlike``)."""
    uploads = [await f.read() for f in files]
    return await _search(svc, form, uploads)


@router.get("/search", response_model=SearchOut)
async def search_ids(svc: ServiceDep, form: Annotated[SearchForm, Query()]) -> dict[str, Any]:
    """Search by the id(s) of indexed images (``?id=3&k=10``), with the same parameters."""
    return await _search(svc, form, [])


async def _search(svc: Service, form: SearchForm, uploads: list[bytes]) -> dict[str, Any]:
    started = time.perf_counter()
    server = svc.settings.server
    _check_page(form.k, form.offset, server.max_k, server.max_offset)
    query = _query(uploads, form.id, form.box, server.max_files)
    feedback = Feedback(tuple(form.like), tuple(form.unlike), form.alpha, form.beta, form.gamma)
    descriptors = form.descriptor or [None]
    if uploads and len(descriptors) == 1:
        # described with other requests' uploads, in one batch
        images = [q for q in query if not isinstance(q, int)]
        vectors = await svc.batcher.vectors(descriptors[0], images)
        query = [vectors, *(q for q in query if isinstance(q, int))]
    result = await svc.run(
        svc.collection.search,
        query,
        form.k,
        descriptor=descriptors,
        metric=form.metric or None,
        combine=form.combine,
        exclude_queries=form.exclude_queries,
        expand=form.expand,
        offset=form.offset,
        feedback=feedback,
        label=form.label or None,
        folder=form.folder or None,
    )
    return search_out(result, time.perf_counter() - started)


def _check_page(k: int, offset: int, max_k: int, max_offset: int) -> None:
    if not 1 <= k <= max_k:
        raise InvalidRequestError(f"k must be between 1 and {max_k}, got {k}")
    if not 0 <= offset <= max_offset:
        raise InvalidRequestError(f"offset must be between 0 and {max_offset}, got {offset}")


def _query(
    uploads: list[bytes], ids: list[int], box: str | None, max_files: int
) -> list[bytes | int | Region]:
    """The query items: uploads first, then ids; a box makes the one item a region."""
    if len(uploads) > max_files:
        raise InvalidRequestError(
            f"at most {max_files} query images per search, got {len(uploads)}"
        )
    items: list[bytes | int | Region] = [*uploads, *ids]
    if not items:
        raise InvalidRequestError(
            "give a query: upload an image (files) or name an indexed one (id)"
        )
    if box is not None and box.strip():
        if len(items) != 1:
            raise InvalidRequestError(
                f"a box is a region of one query image; this search has {len(items)}"
            )
        return [Region(items[0], Box.parse(box))]
    return items


@router.post("/explain")
async def explain(
    svc: ServiceDep,
    hit: Annotated[int, Form(description="Id of the result to explain.")],
    id: Annotated[int | None, Form(description="Id of an indexed query image.")] = None,
    box: Annotated[str | None, Form()] = None,
    descriptor: Annotated[str | None, Form()] = None,
    metric: Annotated[str | None, Form()] = None,
    files: Annotated[list[UploadFile], File()] = [],  # noqa: B006
) -> dict[str, Any]:
    """Why ``hit`` matched the query: blocks' shares, shared colours or heat maps."""
    uploads = [await f.read() for f in files]
    query = _query(uploads, [] if id is None else [id], box, svc.settings.server.max_files)
    explanation = await svc.run(
        svc.collection.explain, query, hit, descriptor=descriptor or None, metric=metric or None
    )
    return explanation.to_dict()


# -- writing -------------------------------------------------------------------------------------
@router.post("/images", status_code=202, response_model=JobOut, dependencies=[Depends(require_key)])
async def add_uploads(
    svc: ServiceDep,
    files: Annotated[list[UploadFile], File()],
    label: Annotated[str | None, Form()] = None,
) -> dict[str, Any]:
    """Add uploaded images (kept in the server's upload folder) as a background job."""
    if not files:
        raise InvalidRequestError("upload at least one image (files)")
    if len(files) > svc.settings.server.max_files:
        raise InvalidRequestError(
            f"at most {svc.settings.server.max_files} images per request, got {len(files)}"
        )
    datas = [await f.read() for f in files]
    paths = await svc.run(_keep_uploads, svc.upload_dir, datas)
    labels = {str(p.resolve()): label for p in paths} if label else None
    return _job_out(svc.jobs.add(paths, labels=labels))


def _keep_uploads(folder: Path, datas: list[bytes]) -> list[Path]:
    """Write uploads under new names, with the extension their content shows; refuse the
    request (nothing written) if one is not an image."""
    formats = []
    for n, data in enumerate(datas):
        try:
            with Image.open(io.BytesIO(data)) as im:
                formats.append((im.format or "img").lower())
        except (UnidentifiedImageError, OSError, ValueError):
            raise InvalidRequestError(
                f"upload {n + 1} is not an image file Pillow can read"
            ) from None
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for data, fmt in zip(datas, formats, strict=True):
        path = folder / f"{uuid.uuid4().hex}.{'jpg' if fmt == 'jpeg' else fmt}"
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        paths.append(path)
    return paths


class FolderIn(BaseModel):
    folder: str
    labels: str | None = None


@router.post(
    "/images/folder", status_code=202, response_model=JobOut, dependencies=[Depends(require_key)]
)
async def add_folder(body: FolderIn, svc: ServiceDep) -> dict[str, Any]:
    """Add a folder below one of the server's roots (``CBIR_ROOTS``) as a background job."""
    target = _under_roots(body.folder, svc.settings.server.roots)
    return _job_out(svc.jobs.add([target], labels=body.labels))


def _under_roots(folder: str, roots: tuple[Path, ...]) -> Path:
    if not roots:
        raise ApiError(
            403,
            "forbidden",
            "this server adds no folders: start it with CBIR_ROOTS naming the folders it may index",
        )
    if "\x00" in folder:
        raise InvalidRequestError("a folder name cannot hold a NUL character")
    for root in roots:
        base = root.resolve()
        target = (base / folder).resolve()  # an absolute folder replaces base, then is checked
        if target.is_relative_to(base) and target.is_dir():
            return target
    raise InvalidRequestError(f"{folder!r} is not a folder below one of the server's roots")


@router.delete("/images/{image_id}", dependencies=[Depends(require_key)])
async def delete_image(image_id: int, svc: ServiceDep) -> dict[str, int]:
    """Remove an image from the collection (its file is left alone)."""
    removed = await svc.run(svc.collection.remove_ids, [image_id])
    return {"removed": removed}


@router.get("/jobs/{job_id}", response_model=JobOut)
async def job(job_id: str, svc: ServiceDep) -> dict[str, Any]:
    return _job_out(svc.jobs.get(job_id))


def _job_out(job: Any) -> dict[str, Any]:
    return {**job.to_dict(), "url": f"/api/jobs/{job.id}"}
