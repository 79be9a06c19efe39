"""One place for settings: defaults, overridden by environment variables, overridden by flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbir.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from cbir.images import Limits

#: Descriptors a new collection extracts when the user names none: every hand-crafted one is
#: cheap next to decoding, so one pass over the folder makes them all available for search.
DEFAULT_DESCRIPTORS: tuple[str, ...] = (
    "color-regional",
    "color-hist",
    "lbp",
    "glcm",
    "fotf",
    "hog",
)


def default_descriptors() -> tuple[str, ...]:
    """What a new collection extracts when the user names nothing: ``CBIR_DESCRIPTORS``
    (specs separated by spaces) if set; else the hand-crafted set, led by ``cnn`` (the best
    descriptor on real photos, see docs/deep.md) when the deep extra is installed."""
    chosen = os.environ.get("CBIR_DESCRIPTORS", "").split()
    if chosen:
        return tuple(chosen)
    from cbir.features._backbone import missing_requirements

    if missing_requirements() is None:
        return ("cnn", *DEFAULT_DESCRIPTORS)
    return DEFAULT_DESCRIPTORS


#: Inference engines of the CNN descriptors (``CBIR_ENGINE``): ``auto`` takes the fastest one
#: installed (cbir.features._engines). Not part of a descriptor's spec: vectors mean the same
#: whichever engine made them.
ENGINE_CHOICES = ("auto", "onnx", "openvino", "torch")


def deep_engine() -> str:
    """The engine ``CBIR_ENGINE`` names (``auto`` when unset). Read where a network is built, so
    extraction worker processes, which inherit the environment, use the same one."""
    value = (os.environ.get("CBIR_ENGINE") or "auto").strip().lower()
    if value not in ENGINE_CHOICES:
        from cbir.errors import InvalidRequestError

        raise InvalidRequestError(
            f"CBIR_ENGINE must be one of {', '.join(ENGINE_CHOICES)}, got {value!r}"
        )
    return value


def cache_dir() -> Path:
    """Where cbir keeps what it can remake (the CNN's exported graphs): ``CBIR_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/cbir``, else ``~/.cache/cbir``."""
    if os.environ.get("CBIR_CACHE_DIR"):
        return Path(os.environ["CBIR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cbir"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class Settings:
    """Run-time settings; ``Settings.from_env()`` reads the ``CBIR_*`` environment variables."""

    collection: Path = Path(".cbir")
    #: Worker processes for extraction (0 = one per core).
    workers: int = 0
    #: Images over this many pixels are skipped as decompression bombs.
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Files larger than this many bytes are skipped without being read.
    max_bytes: int = DEFAULT_MAX_BYTES
    #: Results collected before they are written to disk in one transaction.
    flush_every: int = 512
    #: A descriptor's vectors are held in RAM for search when they fit in this many bytes;
    #: larger collections are streamed from the memory-mapped files block by block.
    memory_budget: int = 4 << 30
    #: Rows compared with the queries at a time in exact search.
    block_rows: int = 16384
    #: The index kind searches use (``cbir.index.index_kinds()``), or ``auto``: exact search
    #: below ``auto_threshold`` images, an approximate index above (see cbir.index.manager).
    index: str = "auto"
    auto_threshold: int = 50_000
    #: Parameters of the index kind (e.g. ``{"M": 48}`` for hnsw, ``{"uri": ...}`` for a
    #: server), given to ``create_index`` as they are.
    index_params: Mapping[str, Any] = field(default_factory=dict)
    default_descriptors: tuple[str, ...] = field(default_factory=default_descriptors)
    #: Where extraction runs: "local" (worker processes here) or "ray" (a Ray cluster).
    executor: str = "local"
    #: The Ray cluster of the "ray" executor (None: ``RAY_ADDRESS``, else a local instance).
    ray_address: str | None = None

    def __post_init__(self) -> None:
        from cbir.executors import executor_names

        if self.executor not in executor_names():
            from cbir.errors import InvalidRequestError

            raise InvalidRequestError(
                f"unknown executor {self.executor!r} (CBIR_EXECUTOR, --executor); "
                f"choose one of {', '.join(executor_names())}"
            )

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Defaults, then ``CBIR_*`` environment variables, then explicit ``overrides``."""
        deep_engine()  # a wrong CBIR_ENGINE is told here, not as a reason on every skipped file
        base = cls(
            collection=Path(os.environ.get("CBIR_COLLECTION") or ".cbir"),
            workers=_env_int("CBIR_WORKERS", 0),
            max_pixels=_env_int("CBIR_MAX_PIXELS", DEFAULT_MAX_PIXELS),
            max_bytes=_env_int("CBIR_MAX_BYTES", DEFAULT_MAX_BYTES),
            memory_budget=_env_int("CBIR_MEMORY_BUDGET", 4 << 30),
            index=os.environ.get("CBIR_INDEX") or "auto",
            auto_threshold=_env_int("CBIR_AUTO_THRESHOLD", 50_000),
            flush_every=_env_int("CBIR_FLUSH_EVERY", 512),
            executor=os.environ.get("CBIR_EXECUTOR") or "local",
            ray_address=os.environ.get("CBIR_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS"),
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def limits(self) -> Limits:
        """What a file may be before it is refused: bytes read, pixels decoded."""
        from cbir.images import Limits

        return Limits(max_pixels=self.max_pixels, max_bytes=self.max_bytes)

    @property
    def worker_count(self) -> int:
        """Worker processes to use: ``workers``, or one per available core."""
        if self.workers > 0:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
