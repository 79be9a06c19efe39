"""The index interface and its registry, in the manner of FAISS's ``Index`` / ``index_factory``
and timm's ``register_model`` / ``create_model``.

An index holds the vectors of one descriptor under one metric and answers k-nearest-neighbour
queries with ``(distances, ids)``. Every kind (exact today; approximate and distributed kinds
later) is one class with ``@register_index`` in a module of this package, made by name:

>>> index = create_index("exact", metric="chi2", dim=405)
>>> index.add(ids, vectors); D, I = index.search(queries, k=10)

Conventions shared by every kind (the contract test in ``tests/test_index.py`` checks them):

- ``search`` returns two ``(m, min(k, len(index)))`` arrays, each row sorted by distance (ties by
  id); where fewer results exist (``exclude``), the row ends with id ``MISSING`` and distance
  ``inf``, as FAISS pads with -1.
- ``add`` with an id already held replaces that row (the change feed reports rewritten images as
  added); ``remove`` ignores ids it does not hold and returns how many it removed.
- ``save(path)`` writes one file atomically; ``load_index(path)`` reads it back as the kind that
  wrote it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from cbir.errors import CorruptError, InvalidRequestError
from cbir.metrics import Metric, as_matrix

#: The id of an empty result slot (FAISS's convention).
MISSING = -1


@dataclass(frozen=True)
class SearchParams:
    """Per-query settings of approximate kinds (None: the index's own); exact kinds ignore
    them. ``ef``: HNSW search breadth; ``nprobe``: IVF lists visited; ``rerank``: candidates per
    result ranked again by the true metric."""

    ef: int | None = None
    nprobe: int | None = None
    rerank: int | None = None

    def __post_init__(self) -> None:
        for name in ("ef", "nprobe", "rerank"):
            value = getattr(self, name)
            if value is not None:
                positive_int(name, value)


def positive_int(name: str, value: object) -> int:
    """``value`` as an int; an InvalidRequestError naming ``name`` unless it is a positive
    integer (a bool is not): every count and size an index takes is checked here."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@runtime_checkable
class VectorIndex(Protocol):
    """What every index kind offers; see the module docstring for the shared conventions."""

    kind: ClassVar[str]
    #: Whether results may miss true neighbours (the price of speed); exact kinds break ties
    #: by id.
    approximate: ClassVar[bool]
    metric: Metric
    dim: int

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Hold ``vectors`` (rows named by ``ids``), replacing rows of ids already held."""

    def remove(self, ids: np.ndarray) -> int:
        """Drop the rows of ``ids``; returns how many were held."""

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: np.ndarray | None = None,
        params: SearchParams | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows of each query: ``(distances, ids)``, never an ``exclude`` id;
        distances are the metric's."""

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to one file, atomically."""


_KINDS: dict[str, type] = {}
_loaded = False


def register_index(cls: type) -> type:
    """Class decorator: make an index kind available by its ``kind`` name."""
    kind = getattr(cls, "kind", "")
    if not kind:
        raise TypeError(f"{cls.__name__} has no kind")
    if kind in _KINDS and _KINDS[kind] is not cls:
        raise ValueError(f"index kind {kind!r} is already registered")
    _KINDS[kind] = cls
    return cls


def _ensure_builtins() -> None:
    """Import every module of this package, so each kind's ``@register_index`` has run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import cbir.index as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in ("base", "manager") and not module.name.startswith("_"):
            importlib.import_module(f"cbir.index.{module.name}")


def index_kinds() -> list[str]:
    """Registered index kinds, sorted."""
    _ensure_builtins()
    return sorted(_KINDS)


def index_class(kind: str) -> type:
    """The class of an index kind, or an error listing the registered kinds."""
    _ensure_builtins()
    if kind not in _KINDS:
        raise InvalidRequestError(
            f"unknown index kind {kind!r}; registered kinds: {', '.join(sorted(_KINDS))}"
        )
    return _KINDS[kind]


def create_index(kind: str, *, metric: str | Metric, dim: int, **params: Any) -> VectorIndex:
    """A new, empty index of ``kind`` for ``dim``-dimensional vectors under ``metric``."""
    dim = positive_int("dim", dim)
    cls = index_class(kind)
    allowed = index_parameters(cls)
    unknown = sorted(set(params) - set(allowed) - set(MANAGED))
    if unknown:
        raise InvalidRequestError(
            f"index kind {kind!r} takes no parameter {', '.join(map(repr, unknown))}; its "
            f"parameters: {', '.join(allowed)}"
        )
    index: VectorIndex = cls(metric, dim=dim, **params)
    return index


#: Parameters the index manager gives every kind (full vectors for a re-rank, a name for a
#: server-held index, the folder of the collection's indexes); a kind takes or ignores them.
MANAGED = ("source", "label", "home")


def index_parameters(cls: type) -> list[str]:
    """The parameters a user may set on an index kind: its constructor's keywords, through the
    ``**params`` it passes on to its base classes, less those it fixes itself
    (``fixed_parameters``) and those the manager gives (:data:`MANAGED`)."""
    fixed = {"self", "metric", "dim", *MANAGED, *getattr(cls, "fixed_parameters", ())}
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        passes_on = False
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                passes_on = True
            elif p.kind is not p.VAR_POSITIONAL and p.name not in fixed | set(names):
                names.append(p.name)
        if not passes_on:
            break
    return names


def load_index(
    path: str | os.PathLike[str], source: Callable[[np.ndarray], np.ndarray] | None = None
) -> VectorIndex:
    """Read an index written by ``save``, as the kind that wrote it (a clear error if the file
    is not one). ``source`` reads full vectors by id, for kinds that re-rank with them."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            kind = str(data["kind"])
    except (OSError, KeyError, ValueError) as exc:
        raise CorruptError(f"{path} is not a saved cbir index ({exc}); it will be rebuilt") from exc
    index: VectorIndex = index_class(kind).load(path, source=source)
    return index


def check_query(queries: np.ndarray, k: int, dim: int) -> np.ndarray:
    """Validate a search's arguments, the same way for every kind: a 2-D float matrix of
    ``dim`` columns and a positive integer ``k``."""
    positive_int("k", k)
    try:
        return as_matrix(queries, dim)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


def check_rows(ids: np.ndarray, vectors: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate rows to add: int64 ids, one per row of a finite ``dim``-column matrix, unique."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    try:
        vectors = as_matrix(vectors, dim) if len(ids) else np.empty((0, dim), np.float32)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    if len(ids) != len(vectors):
        raise InvalidRequestError(f"{len(ids)} ids for {len(vectors)} vectors")
    if len(np.unique(ids)) != len(ids):
        raise InvalidRequestError("the ids to add must be unique")
    return ids, vectors


def atomic_save(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    """``np.savez`` to a temp name, fsync, rename: a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
