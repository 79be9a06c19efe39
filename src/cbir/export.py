"""Writing a collection's catalogue and one descriptor's vectors for other tools."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from cbir.errors import InvalidRequestError, UnavailableError
from cbir.store import DescriptorRecord, Store

EXPORT_FORMATS = ("npy", "parquet")
CATALOGUE_COLUMNS = (
    "id",
    "path",
    "sha256",
    "size",
    "mtime_ns",
    "status",
    "reason",
    "label",
    "width",
    "height",
)


def export(
    store: Store, record: DescriptorRecord, out_dir: str | os.PathLike[str], format: str = "npy"
) -> list[Path]:
    """See :meth:`cbir.Collection.export`."""
    if format not in EXPORT_FORMATS:
        raise InvalidRequestError(
            f"format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}"
        )
    writer = _parquet if format == "parquet" else _npy
    if format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UnavailableError(
                "Parquet export needs pyarrow: pip install 'cbir[parquet]' (or use --format npy)"
            ) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids, matrix = store.load_vectors(record.id)
    order = np.argsort(ids, kind="stable")
    return writer(store, record, out, ids[order], matrix[order])


def _npy(
    store: Store, record: DescriptorRecord, out: Path, ids: np.ndarray, matrix: np.ndarray
) -> list[Path]:
    recs = store.records(ids)
    with open(out / "catalogue.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CATALOGUE_COLUMNS)
        w.writerows([getattr(r, c) for c in CATALOGUE_COLUMNS] for r in store.images())
    np.save(out / "vectors.npy", matrix)
    with open(out / "vectors.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["row", "id", "path", "label", "descriptor"])
        w.writerows([n, r.id, r.path, r.label, record.spec] for n, r in enumerate(recs))
    return [out / "catalogue.csv", out / "vectors.npy", out / "vectors.csv"]


def _parquet(
    store: Store, record: DescriptorRecord, out: Path, ids: np.ndarray, matrix: np.ndarray
) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    catalogue = store.images()
    recs = store.records(ids)
    table = pa.table({c: [getattr(r, c) for r in catalogue] for c in CATALOGUE_COLUMNS})
    pq.write_table(table, out / "catalogue.parquet")
    flat = pa.array(matrix.reshape(-1), type=pa.float32())
    vectors = pa.table(
        {
            "id": ids,
            "path": [r.path for r in recs],
            "label": [r.label for r in recs],
            "vector": pa.FixedSizeListArray.from_arrays(flat, record.dim),
        }
    )
    vectors = vectors.replace_schema_metadata({"descriptor": record.spec})
    pq.write_table(vectors, out / "vectors.parquet")
    return [out / "catalogue.parquet", out / "vectors.parquet"]
