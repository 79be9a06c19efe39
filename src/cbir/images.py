"""The only code that opens image files.

It decodes every format Pillow reads, applies EXIF orientation, normalises the mode, enforces
size limits and turns a decoded image into the array a descriptor asks for. Anything it cannot use
becomes an :class:`ImageError` whose ``reason`` a user can read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Implemented by the images work package: see the docstrings below for the contract.

DEFAULT_MAX_PIXELS = 200_000_000


class ImageError(Exception):
    """An image file that cannot be used; ``reason`` says why in words a user understands."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        super().__init__(reason if path is None else f"{path}: {reason}")
        self.reason = reason
        self.path = path


@dataclass(frozen=True)
class InputSpec:
    """What a descriptor wants to see.

    ``mode`` is ``"RGB"`` (H x W x 3 uint8) or ``"L"`` (H x W uint8). ``size`` is an exact
    ``(width, height)`` resize (e.g. HOG); otherwise ``max_side`` shrinks the image so its longer
    side is at most that many pixels (never enlarging); ``None`` keeps the decoded size.
    """

    mode: Literal["RGB", "L"] = "RGB"
    max_side: int | None = 256
    size: tuple[int, int] | None = None

    @property
    def decode_side(self) -> int | None:
        """The smallest longer side the decoder must deliver for this spec (None: full size)."""
        if self.size is not None:
            return max(self.size)
        return self.max_side
