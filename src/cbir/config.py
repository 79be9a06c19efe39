"""One place for settings: defaults, overridden by environment variables, overridden by flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbir.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS

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


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least one."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a number, got {value!r}") from None


#: The numeric settings besides the image limits (which ``images.Limits`` checks): setting ->
#: (environment variable, least allowed value, whether the least is excluded).
_RANGES: dict[str, tuple[str, float, bool]] = {
    "workers": ("CBIR_WORKERS", 0, False),
    "flush_every": ("CBIR_FLUSH_EVERY", 1, False),
    "flush_seconds": ("CBIR_FLUSH_SECONDS", 0, True),
    "memory_budget": ("CBIR_MEMORY_BUDGET", 0, False),
    "block_rows": ("CBIR_BLOCK_ROWS", 1, False),
    "auto_threshold": ("CBIR_AUTO_THRESHOLD", 0, False),
}
#: Settings that may be fractions (the others are whole numbers).
_FRACTIONAL = frozenset({"flush_seconds"})


@dataclass(frozen=True)
class MilvusSettings:
    """How the ``milvus`` index kind reaches a server when no ``uri`` parameter is given, and
    the credentials it presents: read from the environment only. A token or a database name is
    never a command-line flag (``ps`` shows every process's arguments) nor an index parameter
    (those are written into the collection's index records).

    ``CBIR_MILVUS_URI``: ``http(s)://HOST:19530`` (a server or a cluster's proxy) or a Milvus
    Lite ``.db`` path; ``CBIR_MILVUS_TOKEN``: ``user:password`` or an API key;
    ``CBIR_MILVUS_DB``: the database (Milvus's ``default`` when unset).
    """

    uri: str | None = None
    token: str = field(default="", repr=False)
    db_name: str = ""

    @classmethod
    def from_env(cls) -> MilvusSettings:
        return cls(
            uri=os.environ.get("CBIR_MILVUS_URI") or None,
            token=os.environ.get("CBIR_MILVUS_TOKEN", ""),
            db_name=os.environ.get("CBIR_MILVUS_DB", ""),
        )


@dataclass(frozen=True)
class ServerSettings:
    """Settings of ``cbir serve`` (see docs/security.md for what each limit protects)."""

    #: Where it listens: loopback unless told otherwise.
    host: str = "127.0.0.1"
    port: int = 8000
    #: Writes (adding, deleting images) are refused unless this is set and the request carries
    #: it in the ``X-API-Key`` header (``CBIR_API_KEY``; never a command-line flag, which other
    #: users of the machine can read).
    api_key: str | None = field(default=None, repr=False)
    #: A request body larger than this is refused (413) before it is read whole.
    max_request_bytes: int = 32 << 20
    #: An uploaded image larger than this many pixels is refused from its header.
    max_upload_pixels: int = 50_000_000
    #: Query images per search request, results per page, deepest page.
    max_files: int = 16
    max_k: int = 1000
    max_offset: int = 10_000
    #: Threads that run searches (0: one per core).
    workers: int = 0
    #: Uploads that arrive within this many seconds are described in one batch, up to
    #: ``batch_size`` images.
    batch_window: float = 0.004
    batch_size: int = 32
    #: Folders a client may ask to index (by a path below one of them); uploads are kept in
    #: ``upload_dir`` (default: the collection's ``uploads`` folder).
    roots: tuple[Path, ...] = ()
    upload_dir: Path | None = None

    @classmethod
    def from_env(cls) -> ServerSettings:
        """Defaults, then ``CBIR_API_KEY``, ``CBIR_MAX_REQUEST_BYTES``, ``CBIR_ROOTS`` (folders
        separated by the path separator) and the other ``CBIR_SERVE_*`` variables."""
        roots = os.environ.get("CBIR_ROOTS", "")
        return cls(
            api_key=os.environ.get("CBIR_API_KEY") or None,
            max_request_bytes=_env_int("CBIR_MAX_REQUEST_BYTES", cls.max_request_bytes),
            max_upload_pixels=_env_int("CBIR_MAX_UPLOAD_PIXELS", cls.max_upload_pixels),
            workers=_env_int("CBIR_SERVE_WORKERS", 0),
            roots=tuple(Path(r) for r in roots.split(os.pathsep) if r),
        )

    @property
    def worker_count(self) -> int:
        """Search threads: ``workers``, or one per available core."""
        return self.workers if self.workers > 0 else available_cores()


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
    #: Images whose decode would allocate more than this many bytes are skipped undecoded.
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    #: Results collected before they are written to disk in one transaction ...
    flush_every: int = 512
    #: ... or for this many seconds, whichever comes first (what a killed run can lose).
    flush_seconds: float = 5.0
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
    #: ``cbir serve``'s settings.
    server: ServerSettings = field(default_factory=ServerSettings)

    def __post_init__(self) -> None:
        """Refuse a setting out of its range, naming it, its variable and what is allowed:
        before any work, so a wrong flag cannot record every file as skipped."""
        from cbir.errors import InvalidRequestError
        from cbir.executors import executor_names

        for name, (env, least, excluded) in _RANGES.items():
            value = getattr(self, name)
            kinds = (int, float) if name in _FRACTIONAL else (int,)
            number = isinstance(value, kinds) and not isinstance(value, bool)
            if not number or value < least or (excluded and value == least):
                what = "a number" if name in _FRACTIONAL else "a whole number"
                allowed = f"more than {least:g}" if excluded else f"{least:g} or more"
                raise InvalidRequestError(
                    f"{name} ({env}) must be {what}, {allowed}; got {value!r}"
                )
        try:
            self.limits  # noqa: B018 - checks max_pixels, max_bytes and max_decode_bytes
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None

        if self.executor not in executor_names():
            raise InvalidRequestError(
                f"unknown executor {self.executor!r} (CBIR_EXECUTOR, --executor); "
                f"choose one of {', '.join(executor_names())}"
            )

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Defaults, then ``CBIR_*`` environment variables, then explicit ``overrides``."""
        deep_engine()  # a wrong CBIR_ENGINE is told here, not as a reason on every skipped file
        values: dict[str, Any] = dict(
            collection=Path(os.environ.get("CBIR_COLLECTION") or ".cbir"),
            workers=_env_int("CBIR_WORKERS", 0),
            max_pixels=_env_int("CBIR_MAX_PIXELS", DEFAULT_MAX_PIXELS),
            max_bytes=_env_int("CBIR_MAX_BYTES", DEFAULT_MAX_BYTES),
            max_decode_bytes=_env_int("CBIR_MAX_DECODE_BYTES", DEFAULT_MAX_DECODE_BYTES),
            memory_budget=_env_int("CBIR_MEMORY_BUDGET", 4 << 30),
            index=os.environ.get("CBIR_INDEX") or "auto",
            auto_threshold=_env_int("CBIR_AUTO_THRESHOLD", 50_000),
            flush_every=_env_int("CBIR_FLUSH_EVERY", 512),
            flush_seconds=_env_float("CBIR_FLUSH_SECONDS", 5.0),
            block_rows=_env_int("CBIR_BLOCK_ROWS", 16384),
            executor=os.environ.get("CBIR_EXECUTOR") or "local",
            ray_address=os.environ.get("CBIR_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS"),
            server=ServerSettings.from_env(),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # checked once, as it will be used

    @property
    def limits(self) -> Limits:
        """What a file may be before it is refused: bytes read, pixels decoded."""
        from cbir.images import Limits

        return Limits(
            max_pixels=self.max_pixels,
            max_bytes=self.max_bytes,
            max_decode_bytes=self.max_decode_bytes,
        )

    @property
    def worker_count(self) -> int:
        """Worker processes to use: ``workers``, or one per available core."""
        return self.workers if self.workers > 0 else available_cores()
