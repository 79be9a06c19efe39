"""What the service answers, as JSON schemas (they document the API at /docs).

Hits name images by id and display name (the file's folder and name), never by server path;
the URLs are the service's own thumbnail and image routes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cbir.search.result import Hit, SearchResult
from cbir.store import ImageRecord


class ErrorOut(BaseModel):
    """Every error: its kind (``cbir.errors``, or ``too_large``, ``unauthorized``...) and a
    message that says what to change."""

    error: str
    message: str


class ImageOut(BaseModel):
    id: int
    name: str = Field(description="The file's folder and name: no server path.")
    label: str | None
    thumbnail_url: str
    image_url: str


class HitOut(ImageOut):
    rank: int
    score: float


class SearchOut(BaseModel):
    """A :class:`cbir.SearchResult`, with hits as :class:`HitOut`."""

    descriptors: list[str]
    metrics: list[str]
    score: str = Field(description="distance (smaller is closer), similarity or rrf (larger).")
    fusion: str | None
    combine: str
    queries: int
    expand: int
    indexes: list[str]
    offset: int
    feedback: dict[str, int]
    seconds: float = Field(description="Seconds the search took (query vectors included).")
    server_seconds: float = Field(description="Seconds from the request to the answer.")
    hits: list[HitOut]


class PageOut(BaseModel):
    total: int
    offset: int
    limit: int
    images: list[ImageOut]


class JobOut(BaseModel):
    id: str
    state: str
    done: int
    total: int
    message: str | None
    report: dict[str, Any] | None
    url: str


def display_name(path: str) -> str:
    """What a client sees of a file: its folder and name."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def image_out(image_id: int, path: str, label: str | None) -> dict[str, Any]:
    return {
        "id": image_id,
        "name": display_name(path),
        "label": label,
        "thumbnail_url": f"/api/images/{image_id}/thumbnail",
        "image_url": f"/api/images/{image_id}/file",
    }


def hit_out(hit: Hit) -> dict[str, Any]:
    return {**image_out(hit.id, hit.path, hit.label), "rank": hit.rank, "score": hit.score}


def record_out(record: ImageRecord) -> dict[str, Any]:
    return image_out(record.id, record.path, record.label)


def search_out(result: SearchResult, server_seconds: float) -> dict[str, Any]:
    data = result.to_dict()
    data.pop("specs")  # full specs name vectors inside the collection; the labels suffice
    data["hits"] = [hit_out(h) for h in result.hits]
    data["server_seconds"] = round(server_seconds, 6)
    return data
