"""Labelled image sets in the forms users have them, and which items are relevant to which query.

Readers turn a folder per class, a CSV/JSON table, CIFAR-10 pickles or MNIST IDX files into a
:class:`LabelledSet`; :func:`load_labelled` picks the reader from what a path looks like.
:class:`Relevance` answers "is result *j* relevant to query *i*" for whole ranking matrices at
once, from shared labels or from explicit TREC judgments (:func:`from_qrels`).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import math
import os
import pickle
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import scipy.sparse as sp

from cbir.images import IMAGE_EXTENSIONS

__all__ = [
    "LabelledSet",
    "Qrels",
    "Relevance",
    "from_cifar_batches",
    "from_folders",
    "from_mnist_idx",
    "from_qrels",
    "from_table",
    "load_labelled",
]

#: qid -> docnos judged relevant (a judged query with nothing relevant maps to an empty set).
Qrels: TypeAlias = dict[str, set[str]]

LabelsLike: TypeAlias = frozenset[str] | set[str] | Sequence[str] | str | None

_SHOW = 5  # how many offending entries an error message lists


def _as_labels(value: LabelsLike) -> frozenset[str]:
    """A label set; a bare string is one label (not its characters)."""
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset((value,)) if value else frozenset()
    return frozenset(value)


def _first(items: Sequence[Any], n: int = _SHOW) -> str:
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f" … ({len(items)} in all)" if len(items) > n else "")


# --------------------------------------------------------------------------------------------
# The labelled set
# --------------------------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class LabelledSet:
    """Images with their labels and stable names: the unit an evaluation runs on.

    ``items`` are absolute file paths or decoded uint8 arrays (H x W or H x W x 3). ``labels``
    holds one set per item; an empty set means "relevant to nothing". ``ids`` name the items
    uniquely and stably (they become TREC docnos).
    """

    name: str
    items: list[str | np.ndarray]
    labels: list[frozenset[str]]
    ids: list[str]

    def __post_init__(self) -> None:
        self.items = list(self.items)
        self.labels = [_as_labels(x) for x in self.labels]
        self.ids = [str(x) for x in self.ids]
        if not len(self.items) == len(self.labels) == len(self.ids):
            raise ValueError(
                f"{self.name}: items, labels and ids must have the same length, got "
                f"{len(self.items)}, {len(self.labels)} and {len(self.ids)}"
            )
        if len(set(self.ids)) != len(self.ids):
            dupes = sorted(i for i, n in Counter(self.ids).items() if n > 1)
            raise ValueError(f"{self.name}: ids must be unique; repeated: {_first(dupes)}")

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:  # the default would print every array
        return f"LabelledSet(name={self.name!r}, items={len(self)}, classes={len(self.classes())})"

    def classes(self) -> list[str]:
        """Every distinct label, sorted."""
        return sorted(frozenset().union(*self.labels))

    def primary_labels(self) -> list[str]:
        """One label per item (the first in sorted order, "" if none), for per-class tables."""
        return [min(labels) if labels else "" for labels in self.labels]

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledSet:
        """The items at ``indices`` (integer positions or a boolean mask), in that order."""
        index = np.asarray(indices)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise ValueError(f"a boolean mask needs {len(self)} entries, got {index.shape}")
            index = np.flatnonzero(index)
        elif index.size == 0:
            index = index.astype(np.intp)
        elif not np.issubdtype(index.dtype, np.integer) or index.ndim != 1:
            raise ValueError("subset needs a 1-D sequence of integer positions or a boolean mask")
        chosen = [int(i) for i in index]
        bad = [i for i in chosen if not -len(self) <= i < len(self)]
        if bad:
            raise ValueError(f"positions out of range for {len(self)} items: {_first(bad)}")
        return LabelledSet(
            self.name,
            [self.items[i] for i in chosen],
            [self.labels[i] for i in chosen],
            [self.ids[i] for i in chosen],
        )


# --------------------------------------------------------------------------------------------
# Folder per class
# --------------------------------------------------------------------------------------------


def _existing_dir(path: str | os.PathLike[str], what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist; expected {what}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; expected {what}")
    return folder.resolve()


def from_folders(root: str | os.PathLike[str]) -> LabelledSet:
    """Images under ``root/<label>/...``: the first folder level below ``root`` is the label.

    Files deeper down belong to their top folder; files directly in ``root`` have no label.
    Hidden files and folders are skipped; only known image extensions count; order is sorted by
    relative path so runs are reproducible.
    """
    base = _existing_dir(root, "a folder with one sub-folder of images per class")
    found: list[str] = []
    for folder, dirs, names in os.walk(base):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_folder = os.path.relpath(folder, base)
        for name in names:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            found.append(Path(rel_folder, name).as_posix().removeprefix("./"))
    if not found:
        raise ValueError(
            f"no image files under {base}; expected sub-folders per class holding files with "
            "extensions such as .jpg, .png, .tif"
        )
    found.sort()
    labels = [frozenset((r.split("/", 1)[0],)) if "/" in r else frozenset() for r in found]
    items: list[str | np.ndarray] = [str(base.joinpath(*r.split("/"))) for r in found]
    return LabelledSet(base.name, items, labels, found)


# --------------------------------------------------------------------------------------------
# CSV / JSON tables
# --------------------------------------------------------------------------------------------

_LABEL_SPLIT = re.compile(r"[|;]")


def _split_labels(cell: str | None) -> frozenset[str]:
    """``"cat|pet"`` or ``"cat; pet"`` -> {"cat", "pet"}; blanks are dropped."""
    if not cell:
        return frozenset()
    return frozenset(p.strip() for p in _LABEL_SPLIT.split(cell) if p.strip())


def _read_csv_table(path: Path) -> list[tuple[str, frozenset[str], str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; expected a header row 'path,label' and data rows")
        columns = [h.strip().lower() for h in header]
        label_col = "labels" if "labels" in columns else "label"
        if "path" not in columns or label_col not in columns:
            raise ValueError(
                f"{path}: the first row must be a header naming the columns 'path' and 'label' "
                f"(or 'labels'); found {header!r}"
            )
        ip, il = columns.index("path"), columns.index(label_col)
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}, line {reader.line_num}"
            if len(row) <= ip or not row[ip].strip():
                raise ValueError(f"{where}: the 'path' cell is empty")
            rows.append((row[ip].strip(), _split_labels(row[il] if il < len(row) else ""), where))
    return rows


def _json_labels(value: Any, where: str) -> frozenset[str]:
    if value is None or isinstance(value, str):
        return _as_labels(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(v for v in value if v)
    raise ValueError(f"{where}: labels must be a string or a list of strings, got {value!r}")


def _read_json_table(path: Path) -> list[tuple[str, frozenset[str], str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    expected = (
        'expected {"path": "label" or ["label", ...]} or [{"path": ..., "labels": [...]}, ...]'
    )
    rows = []
    if isinstance(data, dict):
        for p, value in data.items():
            rows.append((p, _json_labels(value, f"{path}, entry {p!r}"), f"{path}, entry {p!r}"))
    elif isinstance(data, list):
        for n, entry in enumerate(data):
            where = f"{path}, entry {n}"
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise ValueError(f"{where}: needs a 'path' string; {expected}")
            value = entry["labels"] if "labels" in entry else entry.get("label")
            rows.append((entry["path"], _json_labels(value, where), where))
    else:
        raise ValueError(f"{path}: {expected}")
    for p, _labels, where in rows:
        if not p.strip():
            raise ValueError(f"{where}: the path is empty")
    return rows


def from_table(
    path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
) -> LabelledSet:
    """Images and labels listed in a CSV or JSON table.

    CSV needs a header with ``path`` and ``label`` (or ``labels``); several labels in a cell are
    separated by ``|`` or ``;``. JSON is ``{"path": "label" | [labels]}`` or a list of
    ``{"path": ..., "labels": [...]}``. Relative paths are relative to ``root`` (default: the
    table's folder). A path listed twice gets the union of its labels, so "one row per label"
    tables work. Every file must exist, so a typo is caught before hours of extraction.
    """
    table = Path(path).expanduser()
    if not table.is_file():
        raise FileNotFoundError(f"{table} does not exist; expected a .csv or .json label table")
    suffix = table.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv_table(table)
    elif suffix == ".json":
        rows = _read_json_table(table)
    else:
        raise ValueError(f"{table}: unknown table format {suffix!r}; expected .csv or .json")
    if not rows:
        raise ValueError(f"{table} lists no images")
    base = (Path(root).expanduser() if root is not None else table.parent).resolve()
    merged: dict[str, set[str]] = {}
    for p, labels, _where in rows:
        full = os.path.normpath(base / Path(p).expanduser())
        merged.setdefault(full, set()).update(labels)
    missing = [p for p in merged if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{table}: {len(missing)} listed file(s) do not exist (paths are relative to "
            f"{base}): {_first(missing)}"
        )
    items: list[str | np.ndarray] = list(merged)
    ids = []
    for full in merged:
        rel = Path(full)
        ids.append(rel.relative_to(base).as_posix() if rel.is_relative_to(base) else rel.as_posix())
    return LabelledSet(table.stem, items, [frozenset(v) for v in merged.values()], ids)


# --------------------------------------------------------------------------------------------
# CIFAR-10 pickles, read without letting them run code
# --------------------------------------------------------------------------------------------


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """What protocol-2 pickles call to rebuild ``bytes``; only the latin-1 form is accepted."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


def _trusted_globals() -> dict[tuple[str, str], Any]:
    """The only callables a CIFAR pickle may name: numpy's array/dtype reconstruction."""
    reconstruct = np.ndarray((0,)).__reduce__()[0]  # multiarray._reconstruct
    frombuffer = np.arange(1).__reduce_ex__(5)[0]  # numeric._frombuffer (pickle protocol 5)
    scalar = np.float64(0).__reduce__()[0]  # multiarray.scalar
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1 writes numpy.core, numpy 2 numpy._core
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _RefusedPickle(pickle.UnpicklingError):
    """A pickle asked for something outside the allow-list."""


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, str, ints and numpy arrays, and nothing that runs code.

    A plain ``pickle.load`` would execute whatever a crafted file names; CIFAR is only
    distributed as pickles, so instead every global is checked against a short allow-list.
    """

    _allowed = _trusted_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _RefusedPickle(
                f"it asks to call {module}.{name}; only dicts, lists, bytes, strings, numbers "
                "and numpy arrays are accepted"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedPickle("it uses persistent ids, which plain data never needs")


def _load_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with ``str`` keys (the files have ``bytes`` keys)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with open(path, "rb") as f:
            data = _DataOnlyUnpickler(f, encoding="bytes").load()
    except _RefusedPickle as exc:
        raise ValueError(f"{path} was not read because {exc}") from None
    except Exception as exc:  # a damaged pickle can fail in many ways; all mean "not usable"
        raise ValueError(f"{path} is not a readable CIFAR pickle ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(data).__name__}")
    return {(k.decode("latin-1") if isinstance(k, bytes) else str(k)): v for k, v in data.items()}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


_TRAIN_BATCH = re.compile(r"data_batch_(\d+)")


def _train_batches(folder: Path) -> list[Path]:
    """``data_batch_<n>`` files in numeric order (``_10`` after ``_2``)."""
    found = [(m, p) for p in folder.iterdir() if (m := _TRAIN_BATCH.fullmatch(p.name))]
    return [p for m, p in sorted(found, key=lambda mp: int(mp[0][1]))]


def from_cifar_batches(
    folder: str | os.PathLike[str], split: Literal["train", "test"] = "train"
) -> LabelledSet:
    """The CIFAR-10 "python version" (``data_batch_1..5``, ``test_batch``, ``batches.meta``).

    Items are (32, 32, 3) uint8 arrays, ids ``cifar-<split>-<n>``. The pickles are read by an
    unpickler that only rebuilds plain data and numpy arrays, so a tampered file cannot run code.
    ``train`` uses every ``data_batch_<n>`` present, in numeric order.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = _existing_dir(folder, "the CIFAR-10 'python version' folder (cifar-10-batches-py)")
    meta = _load_pickle(base / "batches.meta")
    if not isinstance(meta.get("label_names"), list):
        raise ValueError(f"{base / 'batches.meta'}: expected a 'label_names' list")
    names = [_text(n) for n in meta["label_names"]]
    if split == "train":
        files = _train_batches(base)
        if not files:
            raise FileNotFoundError(f"no data_batch_1 … data_batch_5 in {base}")
    else:
        files = [base / "test_batch"]
    blocks, label_blocks = [], []
    for path in files:
        batch = _load_pickle(path)
        data, labels = batch.get("data"), batch.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise ValueError(f"{path}: expected 'data' to be an (N, 3072) uint8 array")
        if data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{path}: 'data' rows hold {data.shape[1]} values; CIFAR images need 3072 "
                "(32 x 32 pixels x 3 colour planes)"
            )
        if labels is None or len(labels) != len(data):
            got = "no 'labels'" if labels is None else f"{len(labels)} labels"
            raise ValueError(f"{path}: {len(data)} images but {got}")
        label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
        if label_array.size and (label_array.min() < 0 or label_array.max() >= len(names)):
            raise ValueError(
                f"{path}: labels must lie in 0..{len(names) - 1} (batches.meta names "
                f"{len(names)} classes), found {label_array.min()}..{label_array.max()}"
            )
        blocks.append(data)
        label_blocks.append(label_array)
    pixels = np.concatenate(blocks)
    images = np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    label_sets = [frozenset((n,)) for n in names]
    all_labels = np.concatenate(label_blocks)
    return LabelledSet(
        f"{base.name}:{split}",
        list(images),
        [label_sets[i] for i in all_labels],
        [f"cifar-{split}-{i:05d}" for i in range(len(images))],
    )


# --------------------------------------------------------------------------------------------
# MNIST IDX files
# --------------------------------------------------------------------------------------------

_IDX_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions (count x rows x columns)
_IDX_LABELS = 0x00000801  # unsigned bytes, 1 dimension (count)
_IDX_NAMES = {_IDX_IMAGES: "images", _IDX_LABELS: "labels"}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array in an IDX file (gzipped or not), after checking its header and size."""
    what = _IDX_NAMES[magic]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected an IDX {what} file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: damaged gzip file ({exc})") from None
    ndim = magic & 0xFF
    expected = f"0x{magic:08X} (IDX {what}: unsigned bytes, {ndim} dimension(s))"
    if len(raw) < 4:
        raise ValueError(f"{path} is too short to be an IDX file; expected magic number {expected}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        hint = ""
        if found in _IDX_NAMES:
            hint = f" — this is an IDX {_IDX_NAMES[found]} file; were the two files swapped?"
        raise ValueError(
            f"{path} is not an IDX {what} file: magic number 0x{found:08X}, "
            f"expected {expected}{hint}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: the header is cut short ({len(raw)} bytes, needs {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(dims)
    if len(raw) - header != size:
        raise ValueError(
            f"{path}: the header promises {' x '.join(map(str, dims))} = {size} bytes of data "
            f"but the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _mnist_prefix(images_path: Path) -> str:
    """``t10k-images-idx3-ubyte.gz`` -> ``t10k``: the part that pairs images with labels."""
    name = images_path.name.removesuffix(".gz")
    cut = name.lower().find("images")
    prefix = name[:cut] if cut > 0 else name
    return prefix.rstrip("-_.") or name


def from_mnist_idx(
    images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str]
) -> LabelledSet:
    """MNIST-style IDX files (optionally gzipped): N x rows x cols uint8 images, N labels.

    Items are (rows, cols) uint8 arrays; labels are the digits as strings ("0".."9").
    """
    images_file, labels_file = Path(images_path).expanduser(), Path(labels_path).expanduser()
    images = _read_idx(images_file, _IDX_IMAGES)
    labels = _read_idx(labels_file, _IDX_LABELS)
    if len(images) != len(labels):
        raise ValueError(
            f"{images_file} holds {len(images)} images but {labels_file} holds "
            f"{len(labels)} labels; they must pair one to one"
        )
    label_sets = [frozenset((str(v),)) for v in range(256)]
    prefix = _mnist_prefix(images_file)
    width = max(5, len(str(len(images) - 1)))
    return LabelledSet(
        f"mnist-{prefix}",
        list(images),
        [label_sets[v] for v in labels.tolist()],
        [f"mnist-{prefix}-{i:0{width}d}" for i in range(len(images))],
    )


# --------------------------------------------------------------------------------------------
# TREC qrels
# --------------------------------------------------------------------------------------------


def from_qrels(
    qrels_path: str | os.PathLike[str], collection: LabelledSet, *, strict: bool = True
) -> Qrels:
    """Explicit judgments from a TREC qrels file (``qid iter docno rel``; rel > 0 is relevant).

    Docnos are checked against ``collection.ids`` because a mismatch (absolute paths versus
    relative ids, say) would otherwise silently score every run as zero; ``strict=False``
    drops unknown docnos instead. Lines starting with ``#`` are comments.
    """
    path = Path(qrels_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a TREC qrels file")
    known = set(collection.ids)
    qrels: Qrels = {}
    unknown: list[str] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 4:
                raise ValueError(
                    f"{path}, line {n}: expected 4 fields 'qid iter docno rel', got {len(fields)}"
                )
            qid, _iter, docno, rel = fields
            try:
                relevance = int(rel)
            except ValueError:
                raise ValueError(
                    f"{path}, line {n}: the relevance {rel!r} is not an integer"
                ) from None
            judged = qrels.setdefault(qid, set())
            if docno not in known:
                unknown.append(docno)
            elif relevance > 0:
                judged.add(docno)
    if not qrels:
        raise ValueError(f"{path} holds no judgments; expected lines 'qid iter docno rel'")
    if unknown and strict:
        raise ValueError(
            f"{path}: {len(unknown)} judged docno(s) are not ids of {collection.name}: "
            f"{_first(unknown)}; ids look like {_first(collection.ids, 3)}"
        )
    return qrels


# --------------------------------------------------------------------------------------------
# Picking the reader
# --------------------------------------------------------------------------------------------

_FORMS = (
    "a folder with one sub-folder per class; a .csv or .json label table; a CIFAR-10 python "
    "folder (data_batch_1 … / test_batch, optionally suffixed ':train' or ':test'); or a folder "
    "of MNIST IDX files (*-images-idx3-ubyte[.gz] with matching *-labels-idx1-ubyte[.gz])"
)


def _mnist_labels_for(images_file: Path) -> Path:
    """``t10k-images-idx3-ubyte[.gz]`` -> the ``t10k-labels-idx1-ubyte[.gz]`` beside it."""
    name = images_file.name.replace("images", "labels").replace("idx3", "idx1")
    plain = name.removesuffix(".gz")
    for candidate in dict.fromkeys((name, plain, plain + ".gz")):  # same compression first
        if (images_file.parent / candidate).is_file():
            return images_file.parent / candidate
    raise FileNotFoundError(f"no labels file for {images_file}; expected {name} beside it")


def _mnist_from_folder(folder: Path, split: str | None) -> LabelledSet:
    """The images/labels pair in an MNIST folder; ``split`` picks train or t10k when both exist."""
    found = sorted(p for p in folder.iterdir() if "idx3-ubyte" in p.name and p.is_file())
    by_stem: dict[str, Path] = {}
    for p in found:  # "x" sorts before "x.gz": an unpacked copy wins over its archive
        by_stem.setdefault(p.name.removesuffix(".gz"), p)
    candidates = list(by_stem.values())
    if split is None and len(candidates) == 1:
        chosen = candidates
    else:
        wanted = ("train",) if split in (None, "train") else ("t10k", "test")
        chosen = [p for p in candidates if _mnist_prefix(p).lower().startswith(wanted)]
        if len(chosen) != 1:
            raise ValueError(
                f"{folder}: cannot tell which IDX images file is the {split or 'train'} split "
                f"among {_first([p.name for p in candidates])}; pass the files to "
                "from_mnist_idx(images_path, labels_path)"
            )
    return from_mnist_idx(chosen[0], _mnist_labels_for(chosen[0]))


def _split_suffix(spec: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``folder:test`` -> (folder, "test"), unless ``folder:test`` itself exists."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if not path.exists():
        head, sep, tail = text.rpartition(":")
        if sep and tail in ("train", "test") and head:
            return Path(head).expanduser(), tail
    return path, None


def load_labelled(spec: str | os.PathLike[str]) -> LabelledSet:
    """Read labelled data from whatever form ``spec`` points at.

    A folder holding ``data_batch_1`` or ``test_batch`` is CIFAR-10 (train split by default,
    test when only ``test_batch`` is there; ``folder:test`` chooses), a folder holding
    ``*idx3-ubyte*`` files is MNIST (``:train``/``:test`` choose the pair when both exist), any
    other folder is a folder per class, ``.csv``/``.json`` is a label table.
    """
    path, split = _split_suffix(spec)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {_FORMS}")
    if path.is_dir():
        if (path / "data_batch_1").exists() or (path / "test_batch").exists():
            if split is None:  # train by default, test when that is all there is
                return from_cifar_batches(path, "train" if _train_batches(path) else "test")
            return from_cifar_batches(path, "test" if split == "test" else "train")
        if any("idx3-ubyte" in p.name for p in path.iterdir()):
            return _mnist_from_folder(path, split)
        if split is not None:
            raise ValueError(
                f"{path} is a folder per class; ':{split}' selects a split only for CIFAR or "
                "MNIST folders"
            )
        return from_folders(path)
    if split is None:
        if path.suffix.lower() in (".csv", ".json"):
            return from_table(path)
        if "idx3-ubyte" in path.name:
            return from_mnist_idx(path, _mnist_labels_for(path))
    raise ValueError(f"{spec} is not a form of labelled data this reads; expected {_FORMS}")


# --------------------------------------------------------------------------------------------
# Relevance
# --------------------------------------------------------------------------------------------

_BLOCK = 1 << 22  # pairs handled per vectorised step: bounds temporaries to tens of MB


def _indicator(sets: Sequence[frozenset[str]], index: dict[str, int]) -> sp.csr_matrix:
    """Rows = sets, columns = labels, 1 where a set holds a label."""
    indptr = np.zeros(len(sets) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(s) for s in sets])
    indices = np.fromiter((index[x] for s in sets for x in s), dtype=np.int64, count=indptr[-1])
    data = np.ones(len(indices), dtype=np.int32)
    return sp.csr_matrix((data, indices, indptr), shape=(len(sets), len(index)))


class _SingleLabel:
    """At most one label per item: compare label ids; -1 (no label) matches nothing."""

    name = "single"

    def __init__(self, query: np.ndarray, collection: np.ndarray, n_labels: int) -> None:
        self.query, self.collection = query, collection
        self.totals = np.bincount(collection[collection >= 0], minlength=max(n_labels, 1))

    def relevant(self, rows: np.ndarray, ranked: np.ndarray) -> np.ndarray:
        q = self.query[rows]
        return (self.collection[ranked] == q[:, None]) & (q >= 0)[:, None]

    def counts(self, rows: np.ndarray) -> np.ndarray:
        q = self.query[rows]
        return np.where(q >= 0, self.totals[np.maximum(q, 0)], 0)


class _Bitmask:
    """Up to 64 labels: one uint64 per item; relevant when the masks share a bit."""

    name = "bitmask"

    def __init__(self, query: np.ndarray, collection: np.ndarray) -> None:
        self.query, self.collection = query, collection
        # Items with the same label set are counted together: few distinct sets in practice.
        self.sets, self.set_sizes = np.unique(collection, return_counts=True)

    def relevant(self, rows: np.ndarray, ranked: np.ndarray) -> np.ndarray:
        return (self.collection[ranked] & self.query[rows][:, None]) != 0

    def counts(self, rows: np.ndarray) -> np.ndarray:
        masks, inverse = np.unique(self.query[rows], return_inverse=True)
        out = np.empty(len(masks), dtype=np.int64)
        step = max(1, _BLOCK // max(len(self.sets), 1))
        for lo in range(0, len(masks), step):
            shares = (masks[lo : lo + step, None] & self.sets[None, :]) != 0
            out[lo : lo + step] = shares @ self.set_sizes
        return out[inverse.reshape(-1)]


class _SparseLabels:
    """More than 64 labels: sparse item x label indicators; relevant when a product is > 0."""

    name = "sparse"

    def __init__(
        self,
        query: sp.csr_matrix,
        collection: sp.csr_matrix,
        sets: sp.csr_matrix,
        set_sizes: np.ndarray,
    ) -> None:
        self.query, self.collection = query, collection
        self.sets_t, self.set_sizes = sets.T.tocsc(), set_sizes

    def relevant(self, rows: np.ndarray, ranked: np.ndarray) -> np.ndarray:
        pairs_q = self.query[np.repeat(rows, ranked.shape[1])]
        pairs_c = self.collection[ranked.reshape(-1)]
        shared = sp.csr_matrix(pairs_q.multiply(pairs_c))
        shared.eliminate_zeros()
        return (np.diff(shared.indptr) > 0).reshape(ranked.shape)

    def counts(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.int64)
        step = max(1, _BLOCK // max(self.sets_t.shape[1], 1))
        for lo in range(0, len(rows), step):
            shares = sp.csr_matrix(self.query[rows[lo : lo + step]] @ self.sets_t)
            shares.data[:] = 1  # any shared label makes the whole label set relevant
            out[lo : lo + step] = shares @ self.set_sizes
        return out


class _Judgments:
    """Explicit (query, item) pairs, kept as sorted keys ``query * n + item``."""

    name = "qrels"

    def __init__(self, rows: np.ndarray, cols: np.ndarray, n_queries: int, n_items: int) -> None:
        self.n_items = n_items
        self.keys = np.unique(rows.astype(np.int64) * n_items + cols)
        per_query = self.keys // n_items if len(self.keys) else self.keys
        self.per_query = np.bincount(per_query, minlength=n_queries)

    def relevant(self, rows: np.ndarray, ranked: np.ndarray) -> np.ndarray:
        if not len(self.keys):
            return np.zeros(ranked.shape, dtype=bool)
        keys = rows.astype(np.int64)[:, None] * self.n_items + ranked
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[at] == keys

    def counts(self, rows: np.ndarray) -> np.ndarray:
        return self.per_query[rows].astype(np.int64)


_Strategy: TypeAlias = _SingleLabel | _Bitmask | _SparseLabels | _Judgments


def _index_array(values: Any, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.size == 0:
        return np.zeros(array.shape, dtype=np.intp)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must hold integer indices, got dtype {array.dtype}")
    return array.astype(np.intp, copy=False)


class Relevance:
    """Which collection items are relevant to which queries.

    Built once per evaluation, then asked about whole ranking matrices, so it stores labels as
    integer ids (single labels), uint64 bitmasks (up to 64 labels) or sparse indicators, or
    explicit judgment pairs from qrels, and never loops over items when answering.
    """

    def __init__(self, strategy: _Strategy, n_queries: int, n_collection: int) -> None:
        self._strategy = strategy
        self.n_queries = n_queries
        self.n_collection = n_collection

    def __repr__(self) -> str:
        sizes = f"queries={self.n_queries}, collection={self.n_collection}"
        return f"Relevance({self.method}, {sizes})"

    @property
    def method(self) -> str:
        """How relevance is stored: "single", "bitmask", "sparse" or "qrels"."""
        return self._strategy.name

    @classmethod
    def from_labels(
        cls,
        query_labels: Sequence[LabelsLike],
        collection_labels: Sequence[LabelsLike],
        *,
        method: Literal["auto", "single", "bitmask", "sparse"] = "auto",
    ) -> Relevance:
        """Relevant = shares at least one label; an item without labels is relevant to nothing.

        ``method="auto"`` picks the cheapest exact representation; the others exist to compare
        them and fail when they cannot represent the labels.
        """
        queries = [_as_labels(x) for x in query_labels]
        items = [_as_labels(x) for x in collection_labels]
        vocabulary = sorted(frozenset().union(*queries, *items))
        index = {label: i for i, label in enumerate(vocabulary)}
        widest = max((len(s) for s in (*queries, *items)), default=0)
        if method == "auto":
            method = "single" if widest <= 1 else "bitmask" if len(index) <= 64 else "sparse"
        if method == "single":
            if widest > 1:
                raise ValueError("method='single' needs at most one label per item")

            def ids(sets: list[frozenset[str]]) -> np.ndarray:
                return np.fromiter(
                    (index[next(iter(s))] if s else -1 for s in sets), np.int64, len(sets)
                )

            strategy: _Strategy = _SingleLabel(ids(queries), ids(items), len(index))
        elif method == "bitmask":
            if len(index) > 64:
                raise ValueError(f"method='bitmask' holds 64 labels at most, got {len(index)}")

            def masks(sets: list[frozenset[str]]) -> np.ndarray:
                return np.array(
                    [sum(1 << index[x] for x in s) for s in sets], dtype=np.uint64
                ).reshape(-1)

            strategy = _Bitmask(masks(queries), masks(items))
        elif method == "sparse":
            size: dict[frozenset[str], int] = {}
            for s in items:
                if s:
                    size[s] = size.get(s, 0) + 1
            distinct = list(size)
            strategy = _SparseLabels(
                _indicator(queries, index),
                _indicator(items, index),
                _indicator(distinct, index),
                np.array([size[s] for s in distinct], dtype=np.int64),
            )
        else:
            raise ValueError(
                f"method must be 'auto', 'single', 'bitmask' or 'sparse', got {method!r}"
            )
        return cls(strategy, len(queries), len(items))

    @classmethod
    def from_qrels(
        cls, qrels: Qrels, query_ids: Sequence[str], collection_ids: Sequence[str]
    ) -> Relevance:
        """Relevance from explicit judgments; query ``i`` is qid ``query_ids[i]``.

        Queries without judgments have nothing relevant; judged docnos that are not in
        ``collection_ids`` cannot be retrieved and are not counted.
        """
        position = {docno: i for i, docno in enumerate(collection_ids)}
        rows: list[int] = []
        cols: list[int] = []
        for q, qid in enumerate(query_ids):
            found = [position[d] for d in qrels.get(qid, ()) if d in position]
            rows.extend([q] * len(found))
            cols.extend(found)
        strategy = _Judgments(
            np.array(rows, dtype=np.int64),
            np.array(cols, dtype=np.int64),
            len(query_ids),
            len(collection_ids),
        )
        return cls(strategy, len(query_ids), len(collection_ids))

    def _queries(self, query_index: Any) -> np.ndarray:
        q = _index_array(query_index, "query_index")
        if q.ndim != 1:
            raise ValueError(f"query_index must be 1-D, got shape {q.shape}")
        if q.size and (q.min() < 0 or q.max() >= self.n_queries):
            raise ValueError(
                f"query_index must lie in 0..{self.n_queries - 1}, found {q.min()}..{q.max()}"
            )
        return q

    def matrix(self, query_index: np.ndarray, ranked: np.ndarray) -> np.ndarray:
        """Boolean (q, depth): is collection item ``ranked[i, j]`` relevant to query
        ``query_index[i]``? ``-1`` marks "no result" and is never relevant."""
        q = self._queries(query_index)
        r = _index_array(ranked, "ranked")
        if r.ndim != 2 or r.shape[0] != len(q):
            raise ValueError(
                f"ranked must be a ({len(q)}, depth) array of collection indices, got {r.shape}"
            )
        if r.size and (r.min() < -1 or r.max() >= self.n_collection):
            raise ValueError(
                f"ranked must hold collection indices 0..{self.n_collection - 1} or -1 for "
                f"no result, found {r.min()}..{r.max()}"
            )
        out = np.zeros(r.shape, dtype=bool)
        if r.size == 0 or self.n_collection == 0:
            return out
        step = max(1, _BLOCK // r.shape[1])
        for lo in range(0, len(q), step):
            block = r[lo : lo + step]
            missing = block < 0
            rel = self._strategy.relevant(q[lo : lo + step], np.where(missing, 0, block))
            out[lo : lo + step] = rel & ~missing
        return out

    def counts(self, query_index: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        """Number of relevant collection items per query (recall's denominator).

        ``exclude_self`` is for leave-one-out, where query ``i`` is collection item ``i`` and
        must not count itself.
        """
        q = self._queries(query_index)
        counts = self._strategy.counts(q).astype(np.int64)
        if exclude_self and len(q):
            if q.max() >= self.n_collection:
                raise ValueError(
                    "exclude_self needs queries that are collection items (query index < "
                    f"{self.n_collection})"
                )
            counts -= self.matrix(q, q[:, None])[:, 0]
        return counts
