"""Indexes: one interface (``VectorIndex``), a registry of kinds and a manager per collection.

``create_index("exact", metric="chi2", dim=405)`` makes an index by kind, as FAISS's
``index_factory``; ``IndexManager`` decides which index serves a descriptor and keeps it in step
with the collection's change feed.
"""

from cbir.index.base import (
    MISSING,
    SearchParams,
    VectorIndex,
    create_index,
    index_class,
    index_kinds,
    load_index,
    register_index,
)
from cbir.index.exact import ExactIndex, scan

__all__ = [
    "MISSING",
    "ExactIndex",
    "SearchParams",
    "VectorIndex",
    "create_index",
    "index_class",
    "index_kinds",
    "load_index",
    "register_index",
    "scan",
]
