"""Search by a part of an image: a box on a query image, as fractions of its width and height.

Fractions, not pixels, so a box drawn on a thumbnail or a scaled preview means the same part of
the full image, whatever size it is decoded at (JPEG draft decodes, EXIF rotation applied).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from cbir.errors import InvalidRequestError

#: The smallest side a box may have, as a fraction of the image's (a sliver is not a query).
MIN_BOX_SIDE = 0.02


@dataclass(frozen=True)
class Box:
    """``(left, top, right, bottom)`` as fractions 0..1 of the image's width and height."""

    left: float
    top: float
    right: float
    bottom: float

    def __post_init__(self) -> None:
        values = (self.left, self.top, self.right, self.bottom)
        if any(
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            for v in values
        ):
            raise InvalidRequestError(f"a box is four numbers between 0 and 1, got {values!r}")
        if not all(0.0 <= v <= 1.0 for v in values):
            raise InvalidRequestError(
                f"a box's coordinates are fractions of the image, between 0 and 1; got {values!r}"
            )
        if self.right - self.left < MIN_BOX_SIDE or self.bottom - self.top < MIN_BOX_SIDE:
            raise InvalidRequestError(
                "a box is left, top, right, bottom with left < right and top < bottom, each "
                f"side at least {MIN_BOX_SIDE:g} of the image's; got {values!r}"
            )

    @classmethod
    def parse(cls, value: str | Sequence[float]) -> Box:
        """From ``"0.1,0.2,0.6,0.8"`` or four numbers."""
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
            try:
                numbers = [float(p) for p in parts]
            except ValueError:
                raise InvalidRequestError(
                    f"a box is four numbers left,top,right,bottom (fractions 0..1), got {value!r}"
                ) from None
        else:
            numbers = list(value)
        if len(numbers) != 4:
            raise InvalidRequestError(
                f"a box is four numbers left,top,right,bottom (fractions 0..1), got {value!r}"
            )
        return cls(*numbers)

    def crop(self, image: Image.Image) -> Image.Image:
        """The part of ``image`` inside the box (at least one pixel each way)."""
        w, h = image.size
        x0, y0 = math.floor(self.left * w), math.floor(self.top * h)
        x1, y1 = max(x0 + 1, math.ceil(self.right * w)), max(y0 + 1, math.ceil(self.bottom * h))
        return image.crop((x0, y0, min(x1, w), min(y1, h)))


@dataclass(frozen=True)
class Region:
    """A query: the part of an image inside ``box``. ``source`` is an image file, its encoded
    bytes, or the id of an image in the collection."""

    source: str | os.PathLike[str] | bytes | int
    box: Box

    def __post_init__(self) -> None:
        if not isinstance(self.box, Box):
            object.__setattr__(self, "box", Box.parse(self.box))
