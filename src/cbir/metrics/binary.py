"""Distances between binary vectors (hash bits stored as 0/1 floats): Hamming.

``prepare`` checks the values and packs each row's bits into 64-bit words (8 bytes per 64-bit
hash instead of 256 as float32), so ``compare`` is one XOR and one popcount per word and pair:
a query against 50,000 64-bit hashes is a few hundred microseconds. Counts are exact integers,
returned as float64 like every metric.
"""

from __future__ import annotations

import numpy as np

from cbir.metrics.base import Metric, Prepared, Route, register_metric
from cbir.metrics.vector import squared_l2

#: Elements of the (queries x rows x words) XOR temporary per step (~32 MB of uint64).
_CHUNK = 1 << 22

_POPCOUNT_TABLE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of each element of an unsigned integer array, as uint8.

    ``np.bitwise_count`` (numpy >= 2.0) uses the CPU's popcount; older numpy gets a byte table.
    """
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    return table_popcount(words)


def table_popcount(words: np.ndarray) -> np.ndarray:
    """``popcount`` through a 256-entry table over the bytes (the numpy < 2.0 path)."""
    w = np.ascontiguousarray(words)
    per_byte = _POPCOUNT_TABLE[w.view(np.uint8)].reshape(*w.shape, w.itemsize)
    return per_byte.sum(axis=-1, dtype=np.uint8)


def check_binary(X: np.ndarray, what: str = "the hamming metric") -> np.ndarray:
    """``X`` as a boolean array, or a ValueError naming a value that is not 0 or 1.

    Hamming distance on real vectors would silently count any difference as a whole bit, so
    feeding it e.g. histograms is an error rather than a meaningless ranking.
    """
    A = np.asarray(X)
    if A.dtype == np.bool_:
        return A
    bad = (A != 0) & (A != 1)
    if bad.any():
        value = A[bad].flat[0].item()
        raise ValueError(
            f"{what} needs binary vectors (0/1 hash bits from ahash, dhash, phash or whash), "
            f"got the value {value!r}; for real-valued vectors use e.g. euclidean or cosine"
        )
    return A != 0


def pack_bits(X: np.ndarray, what: str = "the hamming metric") -> np.ndarray:
    """(n, d) 0/1 rows to (n, ceil(d / 64)) uint64 words (zero-padded, big-endian bit order)."""
    B = check_binary(X, what)
    if B.ndim == 1:
        B = B[None, :]
    n, d = B.shape
    words = -(-d // 64)
    packed = np.zeros((n, words * 8), dtype=np.uint8)
    packed[:, : -(-d // 8)] = np.packbits(B, axis=1)
    return np.ascontiguousarray(packed).view(np.uint64)


def hamming_counts(Wq: np.ndarray, Wc: np.ndarray) -> np.ndarray:
    """(m, n) uint16/uint32 differing-bit counts between two sets of packed rows."""
    m, n = len(Wq), len(Wc)
    words = Wq.shape[1]
    dtype = np.uint16 if words * 64 < 2**16 else np.uint32
    out = np.zeros((m, n), dtype=dtype)
    if m == 0 or n == 0 or words == 0:
        return out
    step = max(1, _CHUNK // max(1, n * words))
    for lo in range(0, m, step):
        block = Wq[lo : lo + step]
        if words == 1:  # the common 64-bit hash: no word axis to sum over
            out[lo : lo + step] = popcount(block[:, 0, None] ^ Wc[None, :, 0])
        else:
            xor = block[:, None, :] ^ Wc[None, :, :]
            out[lo : lo + step] = popcount(xor).sum(axis=2, dtype=dtype)
    return out


def _prepare(X: np.ndarray) -> Prepared:
    return pack_bits(X)


def _compare(Pq: Prepared, Pc: Prepared) -> np.ndarray:
    if Pq.shape[1] != Pc.shape[1]:
        raise ValueError("cannot compare hashes of different lengths")
    return hamming_counts(Pq, Pc).astype(np.float64)


def half_signs(X: np.ndarray) -> np.ndarray:
    """Bits as -1/2 and +1/2: the squared L2 between two rows is their Hamming distance."""
    return check_binary(X) - 0.5


register_metric(
    Metric(
        name="hamming",
        summary="Number of differing bits between binary hashes (0/1 vectors only).",
        formula="sum_i [x_i != y_i], x, y in {0, 1}^d",
        prepare=_prepare,
        compare=_compare,
        binary=True,
        route=Route("embedded", "l2", half_signs, distance=squared_l2),
    )
)
