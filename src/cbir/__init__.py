"""cbir: content-based image retrieval.

``Collection`` is the Python API; ``cbir.features`` and ``cbir.metrics`` hold the registries of
descriptors and distances.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "Box",
    "Collection",
    "Feedback",
    "Hit",
    "ImageError",
    "Region",
    "SearchResult",
    "Settings",
    "__version__",
]

if TYPE_CHECKING:
    from cbir.collection import Collection
    from cbir.config import Settings
    from cbir.images import ImageError
    from cbir.search import Box, Feedback, Hit, Region, SearchResult


def __getattr__(name: str) -> Any:
    # Lazy, so `import cbir` stays light and fast.
    if name == "Collection":
        from cbir.collection import Collection

        return Collection
    if name == "Settings":
        from cbir.config import Settings

        return Settings
    if name == "ImageError":
        from cbir.images import ImageError

        return ImageError
    if name in ("Box", "Feedback", "Hit", "Region", "SearchResult"):
        import cbir.search

        return getattr(cbir.search, name)
    raise AttributeError(f"module 'cbir' has no attribute {name!r}")
