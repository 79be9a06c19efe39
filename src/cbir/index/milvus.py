"""An index held by Milvus: Milvus Lite in a file beside the collection, a standalone server or
a cluster, for every registered metric.

One Milvus collection per cbir index (descriptor and metric), named by the label the index
manager gives (the collection's identity, the descriptor, the metric), with two fields: the cbir
image id as an int64 primary key and the metric's route embedding as a float vector. ``add``
upserts (a rewritten image replaces its row), ``remove`` deletes by id, ``exclude`` becomes a
filter expression. Milvus computes L2 and inner product (its COSINE is the inner product of unit
rows, which is the cosine route's embedding); every other metric goes through its declared
:class:`~cbir.metrics.base.Route` as on FAISS, and candidate routes, quantised index types and
inner products on a graph (searched as L2, :class:`~cbir.index.routing.InnerProductAsL2`) are
ranked again by the true metric on cbir's own vectors (``source``, or a copy kept by an index
made on its own).

Where: the ``uri`` parameter (``cbir --uri``), else ``CBIR_MILVUS_URI``, else a Milvus Lite file
``milvus.db`` in the collection's ``indexes`` folder. The token and the database name come only
from the environment (:class:`cbir.config.MilvusSettings`): never from a flag (``ps`` shows
them), never written into a saved file, and a ``uri`` that carries credentials is refused.

Seeing writes: a search right after a write of this index, or the first after connecting, asks
Milvus for strong consistency (it waits until the server has applied every write, up to one
time tick); later searches take what the server holds without waiting. Every write a cbir search
must see passes through this object first: the index manager replays the collection's change
feed into it before each search, so another process's writes come back as this one's.

Saving: the server keeps what it acknowledged; ``save`` asks it to flush (seal what was written,
so it builds its index on it) and writes a small file: where the collection lives (without
secrets), its name, the ids it holds, the metric, the widths and the route's state. ``load``
reconnects and checks the server's collection against it (present, same width, metric and index
type, same row count, a sample of the ids): a missing or mismatched one is a
:class:`~cbir.errors.CorruptError`, and the manager rebuilds it.

``pymilvus`` (and ``milvus-lite`` for a local file) is imported only here, when an index of this
kind is made: ``pip install 'cbir[milvus]'``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import numpy as np

from cbir.config import MilvusSettings
from cbir.errors import CorruptError, InvalidRequestError, UnavailableError
from cbir.index.base import (
    MISSING,
    SearchParams,
    atomic_save,
    check_query,
    check_rows,
    positive_int,
    register_index,
)
from cbir.index.faiss import DEFAULT_EF_CONSTRUCTION, DEFAULT_EF_SEARCH, DEFAULT_M, DEFAULT_NPROBE
from cbir.index.routing import (
    DEFAULT_RERANK,
    InnerProductAsL2,
    RoutedIndex,
    VectorCopy,
    VectorSource,
    ranked,
    rerank,
)
from cbir.metrics import Metric, get_metric
from cbir.metrics.base import Route

INSTALL = "pip install 'cbir[milvus]'"
#: The Milvus Lite file of a collection's indexes (in its ``indexes`` folder).
LITE_FILE = "milvus.db"
#: The index type built when none is named: the graph that Milvus Lite and every Milvus server
#: (2.3 on) build, whose search breadth is ``ef`` (``cbir search --ef``).
DEFAULT_INDEX_TYPE = "HNSW"
#: IVF cells per segment (Milvus builds an index per sealed segment); Milvus's own default.
DEFAULT_NLIST = 128
#: Milvus answers at most this many results per query (its ``topk`` limit).
MAX_TOPK = 16384
#: Bytes of vectors sent per upsert (Milvus refuses gRPC messages past 64 MiB).
WRITE_BATCH_BYTES = 16 << 20
#: Ids per delete expression.
DELETE_BATCH = 10_000
#: Held ids looked up on the server when a saved index is loaded (spread over all of them).
ID_SAMPLE = 1000
#: Bytes of one float32 value.
VALUE_BYTES = 4

FIELD_ID, FIELD_VECTOR = "id", "vector"
#: Milvus's metric type for each route space it computes (as FAISS: squared L2, raw inner
#: product); l1 and linf routes take their metric's fallback.
_METRIC_TYPES = {"l2": "L2", "ip": "IP"}
#: Index types that keep approximations of the vectors (or, for AUTOINDEX, may: the server
#: chooses): their candidates are re-ranked on the full vectors.
_LOSSY = re.compile(r"SQ|PQ|PRQ|SCANN|RABITQ|AUTOINDEX")
#: Index types that are graphs (an inner-product route is searched on them as L2).
_GRAPH = re.compile(r"HNSW|DISKANN|AUTOINDEX")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_]")

_DEFAULT_PARAMS = SearchParams()
_clients: dict[tuple[str, str, str], Any] = {}
_clients_lock = threading.Lock()


def import_pymilvus() -> Any:
    """The ``pymilvus`` module, or an error saying what to install."""
    try:
        import pymilvus
    except ImportError as exc:
        raise UnavailableError(f"the milvus index needs pymilvus ({exc}); {INSTALL}") from None
    return pymilvus


def is_lite(uri: str) -> bool:
    """Whether ``uri`` names a Milvus Lite file (in this process) rather than a server."""
    return uri.endswith(".db") and "://" not in uri


def _checked_uri(uri: str) -> str:
    """A server address or a Lite path, with no credentials in it (a command line shows it)."""
    if is_lite(uri):
        return os.path.abspath(uri)
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https", "tcp", "unix") or not (parts.netloc or parts.path):
        raise InvalidRequestError(
            f"milvus uri must be http(s)://HOST:PORT, tcp://HOST:PORT, unix:PATH or a Milvus Lite "
            f"file ending in .db, got {uri!r}"
        )
    if parts.username or parts.password:
        raise InvalidRequestError(
            "the milvus uri must not carry credentials (a command line shows them); "
            "put them in CBIR_MILVUS_TOKEN as user:password or an API key"
        )
    return uri


def _resolve_uri(
    uri: str | None, access: MilvusSettings, home: str | os.PathLike[str] | None
) -> tuple[str, str]:
    """Where the index lives, and what said so: "param", "env" or "home"."""
    if uri:
        return _checked_uri(str(uri)), "param"
    if access.uri:
        return _checked_uri(access.uri), "env"
    if home is not None:
        return os.path.abspath(Path(home) / LITE_FILE), "home"
    raise InvalidRequestError(
        "the milvus index needs to know where Milvus is: give uri (cbir --uri "
        "http://HOST:19530 or a .db file), set CBIR_MILVUS_URI, or use it in a collection "
        "(a Milvus Lite file in its indexes folder)"
    )


def _client(uri: str, access: MilvusSettings) -> Any:
    """One client per server, token and database in this process (a gRPC channel each)."""
    key = (uri, access.token, access.db_name)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            pymilvus = import_pymilvus()
            hint = ""
            if is_lite(uri):
                if importlib.util.find_spec("milvus_lite") is None:
                    raise UnavailableError(f"a Milvus Lite file needs milvus-lite; {INSTALL}")
                Path(uri).parent.mkdir(parents=True, exist_ok=True)
                hint = (
                    " (one process at a time opens a Milvus Lite file: is another one using "
                    "it? Several processes need a Milvus server)"
                )
            try:
                client = pymilvus.MilvusClient(uri=uri, token=access.token, db_name=access.db_name)
            except pymilvus.exceptions.MilvusException as exc:
                message = f"cannot open Milvus at {uri}: {exc.message}{hint}"
                raise UnavailableError(message) from None
            _clients[key] = client
    return client


def _collection_name(label: str | None) -> str:
    """The Milvus collection of an index: its label with only the characters Milvus allows
    (letters, digits, underscores; not led by a digit), or a new unique name."""
    if not label:
        return f"cbir_{uuid.uuid4().hex}"
    name = _NAME_UNSAFE.sub("_", label)
    return name if not name[0].isdigit() else f"_{name}"


@register_index
class MilvusIndex(RoutedIndex):
    """A Milvus collection over a metric's route embedding (see the module docstring).

    ``uri``: a server (``http://HOST:19530``) or a Milvus Lite file (default: see the module).
    ``index_type``: Milvus's (Lite 3: FLAT, IVF_FLAT, IVF_SQ8, HNSW, HNSW_SQ, AUTOINDEX;
    servers: those and more); ``M``, ``ef_construction`` build an HNSW graph, ``nlist`` IVF
    cells; ``ef_search`` (per query: ``ef``) and ``nprobe`` set the search breadth; ``rerank``:
    candidates per result re-ranked exactly (where needed). ``label``: the Milvus collection's
    name (the index manager's); ``home``: the folder of the default Lite file.
    """

    kind: ClassVar[str] = "milvus"
    approximate: ClassVar[bool] = True

    def __init__(
        self,
        metric: str | Metric = "euclidean",
        *,
        dim: int,
        uri: str | None = None,
        index_type: str = DEFAULT_INDEX_TYPE,
        M: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
        nlist: int = DEFAULT_NLIST,
        nprobe: int = DEFAULT_NPROBE,
        rerank: int = DEFAULT_RERANK,
        source: VectorSource | None = None,
        label: str | None = None,
        home: str | os.PathLike[str] | None = None,
    ) -> None:
        import_pymilvus()
        self.metric = get_metric(metric)
        self.dim = dim
        self.index_type = str(index_type).upper()
        self.M = positive_int("M", M)
        self.ef_construction = positive_int("ef_construction", ef_construction)
        self.ef_search = positive_int("ef_search", ef_search)
        self.nlist = positive_int("nlist", nlist)
        self.nprobe = positive_int("nprobe", nprobe)
        self.rerank = positive_int("rerank", rerank)
        self.source = source
        self._access = MilvusSettings.from_env()
        self.uri, self._uri_from = _resolve_uri(uri, self._access, home)
        self.name = _collection_name(label)
        self.lossy = bool(_LOSSY.search(self.index_type))
        self.route: Route = self.metric.route_for(tuple(_METRIC_TYPES))
        graph = bool(_GRAPH.search(self.index_type))
        self._mips = InnerProductAsL2() if self.route.space == "ip" and graph else None
        self._width = 0  # columns of the Milvus collection; 0: not made yet
        self._ids = np.empty(0, np.int64)  # the ids held, sorted
        self._copy: VectorCopy | None = None  # full vectors, when no source reads them
        self._strong = True  # the next search waits for every write (see the module)
        self._unflushed = False

    # -- what it holds -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def stale(self) -> bool:
        """Whether it must be rebuilt: rows past the radius of the inner-product-as-L2 map
        (Milvus compacts deleted rows itself)."""
        return self._mips is not None and self._mips.outgrown

    def memory_bytes(self) -> int:
        """Bytes held in this process: the id list and any vector copy (the vectors and the
        index are the server's; Milvus Lite's, in this process, are not counted)."""
        return self._ids.nbytes + (0 if self._copy is None else self._copy.nbytes)

    @property
    def metric_type(self) -> str:
        """Milvus's metric over the held rows."""
        return "L2" if self._mips is not None else _METRIC_TYPES[self.route.space]

    # -- the server ----------------------------------------------------------------------------
    def _client(self) -> Any:
        return _client(self.uri, self._access)

    @contextlib.contextmanager
    def _server(self, doing: str) -> Iterator[Any]:
        """The client, with Milvus's errors told as unavailability of the server."""
        client = self._client()
        pymilvus = import_pymilvus()
        try:
            yield client
        except pymilvus.exceptions.MilvusException as exc:
            raise UnavailableError(
                f"Milvus at {self.uri} failed {doing} {self.name}: {exc.message}"
            ) from None

    def _build_params(self) -> dict[str, int]:
        if self.index_type.startswith("HNSW"):
            return {"M": self.M, "efConstruction": self.ef_construction}
        if self.index_type.startswith("IVF"):
            return {"nlist": self.nlist}
        return {}

    def _search_params(self, wanted: int, params: SearchParams) -> dict[str, int]:
        if self.index_type.startswith("HNSW"):
            return {"ef": max(params.ef or self.ef_search * self.route.breadth, wanted)}
        if self.index_type == "DISKANN":
            return {"search_list": max(params.ef or self.ef_search * self.route.breadth, wanted)}
        if self.index_type.startswith("IVF"):
            return {"nprobe": min(params.nprobe or self.nprobe, self.nlist)}
        return {}

    def _create(self, width: int) -> None:
        """A new, empty Milvus collection of ``width`` columns under this index's name (one
        left by an earlier index of the same name is dropped: this index starts empty)."""
        pymilvus = import_pymilvus()
        with self._server("to create") as client:
            if client.has_collection(self.name):
                client.drop_collection(self.name)
            schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field(FIELD_ID, pymilvus.DataType.INT64, is_primary=True)
            schema.add_field(FIELD_VECTOR, pymilvus.DataType.FLOAT_VECTOR, dim=width)
            client.create_collection(self.name, schema=schema, consistency_level="Strong")
            index_params = client.prepare_index_params()
            index_params.add_index(
                field_name=FIELD_VECTOR,
                index_type=self.index_type,
                metric_type=self.metric_type,
                params=self._build_params(),
            )
            try:
                # sync=False: the collection is empty, there is nothing to wait for
                client.create_index(self.name, index_params, sync=False)
            except pymilvus.exceptions.MilvusException as exc:
                client.drop_collection(self.name)
                raise InvalidRequestError(
                    f"Milvus at {self.uri} cannot build {self.index_type} "
                    f"{self._build_params()}: {exc.message}"
                ) from None
            client.load_collection(self.name)
        self._width = width

    # -- updating ------------------------------------------------------------------------------
    def train(self, vectors: np.ndarray, expected: int | None = None) -> None:
        """Make the Milvus collection, its width from a sample of the vectors (Milvus trains
        its IVF cells itself, per segment; ``expected`` is not needed)."""
        del expected
        if self._width:
            raise InvalidRequestError("the index is already trained")
        _, sample = check_rows(np.arange(len(vectors)), vectors, self.dim)
        self._create(self._embedded(sample).shape[1])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = check_rows(ids, vectors, self.dim)
        if not len(ids):
            return
        E = self._embedded(vectors)
        if not self._width:
            self._create(E.shape[1])
        batch = max(1, WRITE_BATCH_BYTES // (E.shape[1] * VALUE_BYTES))
        with self._server("to write into") as client:
            for lo in range(0, len(ids), batch):
                part = ids[lo : lo + batch]
                # pymilvus's client takes rows as dicts; it packs them into columns itself
                rows = [
                    {FIELD_ID: i, FIELD_VECTOR: v}
                    for i, v in zip(part.tolist(), E[lo : lo + batch], strict=True)
                ]
                client.upsert(self.name, rows)
                self._ids = np.union1d(self._ids, part)
                self._strong = self._unflushed = True
        if self.needs_rerank and self.source is None:
            self._copy = self._copy or VectorCopy(self.dim)
            self._copy.add(ids, vectors)

    def remove(self, ids: np.ndarray) -> int:
        held = np.intersect1d(np.asarray(ids, dtype=np.int64).reshape(-1), self._ids)
        if not len(held):
            return 0
        with self._server("to delete from") as client:
            for lo in range(0, len(held), DELETE_BATCH):
                client.delete(self.name, ids=held[lo : lo + DELETE_BATCH].tolist())
        self._ids = np.setdiff1d(self._ids, held, assume_unique=True)
        self._strong = self._unflushed = True
        if self._copy is not None:
            self._copy.remove(held)
        return len(held)

    # -- searching -----------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: np.ndarray | None = None,
        params: SearchParams | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        Q = check_query(queries, k, self.dim)
        params = params or _DEFAULT_PARAMS
        held = self._ids
        k = min(k, len(held))
        m = len(Q)
        if k == 0 or not self._width:
            return np.full((m, k), np.inf), np.full((m, k), MISSING, np.int64)
        if k > MAX_TOPK:
            raise InvalidRequestError(f"Milvus answers at most {MAX_TOPK} results, asked {k}")
        wanted = k * (params.rerank or self.rerank) if self.needs_rerank else k
        wanted = min(wanted, len(held), MAX_TOPK)
        S, ids = self._milvus_search(self._embedded(Q, query=True), wanted, held, exclude, params)
        if self.needs_rerank:
            return rerank(self.metric, Q, ids, k, self._full_vectors())
        found = ids != MISSING
        D = np.where(found, self.route.distance(np.where(found, S, 0.0), Q), np.inf)
        return ranked(D, ids, k)

    def _milvus_search(
        self,
        embedded: np.ndarray,
        wanted: int,
        held: np.ndarray,
        exclude: np.ndarray | None,
        params: SearchParams,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Milvus's ``wanted`` best rows per query: (scores, ids), MISSING where none."""
        expression = ""
        if exclude is not None and len(exclude):
            # only the excluded ids it holds change anything: the expression stays short
            drop = np.intersect1d(np.asarray(exclude, np.int64).reshape(-1), held)
            if len(drop):
                expression = f"{FIELD_ID} not in [{','.join(map(str, drop.tolist()))}]"
        strong, self._strong = self._strong, False  # a write during the search sets it again
        try:
            with self._server("to search") as client:
                results = client.search(
                    self.name,
                    data=list(embedded),
                    limit=wanted,
                    filter=expression,
                    output_fields=[FIELD_ID],
                    search_params={
                        "metric_type": self.metric_type,
                        "params": self._search_params(wanted, params),
                    },
                    consistency_level="Strong" if strong else "Eventually",
                )
        except BaseException:
            self._strong = self._strong or strong  # the next search waits instead
            raise
        S = np.zeros((len(embedded), wanted))
        ids = np.full((len(embedded), wanted), MISSING, np.int64)
        for row, hits in enumerate(results):  # one per query
            n = min(len(hits.ids), wanted)
            ids[row, :n] = hits.ids[:n]
            S[row, :n] = hits.distances[:n]
        return S, ids

    # -- saving --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        if self._width and self._unflushed:
            with self._server("to flush") as client:
                client.flush(self.name)
            self._unflushed = False
        # a Lite file in the collection's folder is found again beside this file, wherever the
        # collection has moved; a server's address is kept (it holds no secret)
        uri = LITE_FILE if self._uri_from == "home" else self.uri
        settings = [self.M, self.ef_construction, self.ef_search, self.nlist, self.nprobe,
                    self.rerank, self._width]  # fmt: skip
        atomic_save(
            path,
            kind=np.array(self.kind),
            metric=np.array(self.metric.name),
            dim=np.array(self.dim),
            uri=np.array(uri),
            uri_from=np.array(self._uri_from),
            db_name=np.array(self._access.db_name),
            collection=np.array(self.name),
            index_type=np.array(self.index_type),
            settings=np.array(settings),
            mips=np.empty(0) if self._mips is None else self._mips.state(),
            ids=self._ids,
            **({} if self._copy is None else self._copy.arrays("copy_")),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], source: VectorSource | None = None) -> MilvusIndex:
        """Reconnect to the Milvus collection a saved index names; a
        :class:`~cbir.errors.CorruptError` when it is not there as saved."""
        import_pymilvus()
        path = Path(path)
        access = MilvusSettings.from_env()
        try:
            with np.load(path, allow_pickle=False) as data:
                uri, uri_from = str(data["uri"]), str(data["uri_from"])
                M, efc, ef_search, nlist, nprobe, rerank_, width = (
                    int(v) for v in data["settings"]
                )
                home = path.parent if uri_from == "home" else None
                if uri_from == "env" and access.uri != uri:
                    raise CorruptError(
                        f"{path} was built on CBIR_MILVUS_URI={uri}, which now says "
                        f"{access.uri}; it will be rebuilt there"
                    )
                if str(data["db_name"]) != access.db_name:
                    raise CorruptError(
                        f"{path} was built in Milvus database {str(data['db_name']) or 'default'!r}"
                        f", CBIR_MILVUS_DB now says {access.db_name or 'default'!r}; it will be "
                        "rebuilt there"
                    )
                index = cls(
                    str(data["metric"]), dim=int(data["dim"]),
                    uri=uri if uri_from == "param" else None, index_type=str(data["index_type"]),
                    M=M, ef_construction=efc, ef_search=ef_search, nlist=nlist, nprobe=nprobe,
                    rerank=rerank_, source=source, label=str(data["collection"]), home=home,
                )  # fmt: skip
                index._ids = data["ids"].astype(np.int64)
                index._copy = VectorCopy.from_arrays(data, "copy_", index.dim)
                if index._mips is not None:
                    radius2, outgrown = (float(v) for v in data["mips"])
                    index._mips = InnerProductAsL2(radius2, bool(outgrown))
        except (OSError, KeyError, ValueError, InvalidRequestError) as exc:
            raise CorruptError(
                f"{path} is not a saved Milvus index ({exc}); it will be rebuilt"
            ) from exc
        if index.needs_rerank and source is None and index._copy is None:
            raise CorruptError(f"{path} keeps no vectors to re-rank with and none were given")
        index._width = width
        if width or len(index._ids):
            try:
                index._check_server(path)
            except UnavailableError as exc:
                # rebuilt where the settings now say: if that is the same server, still down,
                # the rebuild says so
                raise CorruptError(f"{path}: {exc}; it will be rebuilt") from exc
        return index

    def _check_server(self, path: Path) -> None:
        """The server's collection is the one saved: present, same width, metric and index
        type, the same number of rows, and a sample of the saved ids among them."""
        gone = f"{path}: Milvus at {self.uri} has no collection {self.name}"
        with self._server("to read") as client:
            if not client.has_collection(self.name):
                raise CorruptError(f"{gone}; it will be rebuilt")
            fields = client.describe_collection(self.name)["fields"]
            dims = [f.get("params", {}).get("dim") for f in fields if f["name"] == FIELD_VECTOR]
            index = client.describe_index(self.name, FIELD_VECTOR) or {}
            built = (index.get("index_type"), index.get("metric_type"))
            if dims != [self._width] or built != (self.index_type, self.metric_type):
                raise CorruptError(
                    f"{path}: Milvus collection {self.name} holds {dims} columns as {built}, "
                    f"expected [{self._width}] as {(self.index_type, self.metric_type)}; it "
                    "will be rebuilt"
                )
            client.load_collection(self.name)  # a restarted server may have released it
            (counted,) = client.query(
                self.name, filter="", output_fields=["count(*)"], consistency_level="Strong"
            )
            rows = int(counted["count(*)"])
            ids = self._ids
            spread = np.linspace(0, len(ids) - 1, min(len(ids), ID_SAMPLE)).astype(int)
            sample = np.unique(ids[spread])
            found = []
            if len(sample):
                found = client.query(
                    self.name,
                    filter=f"{FIELD_ID} in [{','.join(map(str, sample.tolist()))}]",
                    output_fields=[FIELD_ID],
                    consistency_level="Strong",
                )
        if rows != len(ids) or len(found) != len(sample):
            raise CorruptError(
                f"{path}: Milvus collection {self.name} holds {rows} rows, the saved index "
                f"{len(ids)} ids ({len(found)} of {len(sample)} sampled found); it will be rebuilt"
            )
