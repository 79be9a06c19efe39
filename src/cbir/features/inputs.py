"""Checks shared by the descriptor families: parameter validation and input arrays."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from PIL import Image


def is_int(value: Any) -> bool:
    """True for Python/numpy integers but not bools (``True`` is not a bin count)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``, or a ValueError naming the parameter."""
    if not is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """The (H, W, 3) uint8 array colour descriptors work on; gray or RGBA input is converted."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2 and a.size:
        return cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_GRAY2RGB)
    if a.ndim == 3 and a.shape[2] == 4 and a.size:
        return cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGBA2RGB)
    if a.ndim != 3 or a.shape[2] != 3 or a.size == 0:
        raise ValueError(f"expected a non-empty (H, W, 3) RGB image, got shape {a.shape}")
    return np.ascontiguousarray(a)


def as_gray_uint8(image: np.ndarray) -> np.ndarray:
    """The (H, W) uint8 grey array texture, shape and hash descriptors work on.

    RGB(A) input is converted with Pillow's ITU-R 601-2 luma, the conversion the image pipeline
    (and ``imagehash``) uses, so a descriptor gives the same vector for an RGB array as for the
    "L" array the pipeline would have handed it."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[2] in (3, 4) and a.size:
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).convert("L"))
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"expected a non-empty (H, W) grayscale image, got shape {a.shape}")
    return np.ascontiguousarray(a)
