"""Thumbnails of catalogued images, made once and kept in the collection's ``thumbnails``
folder.

A thumbnail is named by the image's id, the content hash it was indexed with and its side, so a
file rewritten and indexed again gets a new one, and an old one is never served for new content.
Writes are safe without a lock: each maker writes a temporary file and renames it over the final
name (atomic on POSIX), and two makers of the same thumbnail write the same bytes.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from cbir import images
from cbir.errors import InvalidRequestError
from cbir.store import ImageRecord

#: The sides a thumbnail may have: a small fixed set, so a client cannot fill the disk with
#: one file per size it asks for.
THUMBNAIL_SIDES = (128, 256, 512)
DEFAULT_SIDE = 256
#: JPEG quality of thumbnails (small files, no visible blocks at these sizes).
JPEG_QUALITY = 85
FOLDER = "thumbnails"


def thumbnail(root: Path, record: ImageRecord, side: int, limits: images.Limits) -> Path:
    """The file of ``record``'s thumbnail (longer side ``side``), made now if not yet made."""
    if side not in THUMBNAIL_SIDES:
        raise InvalidRequestError(
            f"thumbnail side must be one of {', '.join(map(str, THUMBNAIL_SIDES))}, got {side!r}"
        )
    stamp = (record.sha256 or f"{record.size}-{record.mtime_ns}")[:16]
    path = root / FOLDER / str(side) / f"{record.id}-{stamp}.jpg"
    if path.exists():
        return path
    image = images.load(record.path, max_side=side, limits=limits)
    data = io.BytesIO()
    image.save(data, "JPEG", quality=JPEG_QUALITY)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jpg")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
