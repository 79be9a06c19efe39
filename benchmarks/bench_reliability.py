"""Figures of docs/reliability.md: the peak memory of `cbir index` runs with 2 workers (the
indexing process and its workers together, resident, sampled from /proc), and what single hostile
files cost to refuse or decode. Needs no data set: every image is made here.

    python benchmarks/bench_reliability.py        # prints a Markdown table
"""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine

sys.path.insert(0, str(REPO))
from tests.test_hostile import make_corpus, png_chunk, tree_rss

HAND_CRAFTED = ("color-regional", "color-hist", "lbp", "glcm", "fotf", "hog")
PHOTOS = 400
PHOTO_SIZE = (1024, 768)
SAMPLE_SECONDS = 0.02
MIB = 1 << 20


def photos(folder: Path) -> None:
    """Photo-sized JPEGs: smooth gradients with noise."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w, h = PHOTO_SIZE
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    for i in range(PHOTOS):
        base = ramp * rng.random(3, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg")


def grey16_png(path: Path, side: int) -> None:
    """A 16-bit grey PNG of side x side, compressed row by row (a few MB on disk)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    row = b"\0" + (np.arange(side, dtype=">u2") % 4096).tobytes()
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data)
                     + png_chunk(b"IEND", b""))  # fmt: skip


def index_run(folder: Path, col: Path, env: dict[str, str] | None = None) -> tuple[int, float]:
    """Peak resident bytes of `cbir index` (2 workers) and its seconds."""
    args = [sys.executable, "-m", "cbir.cli", "index", str(folder), "--json", "-c", str(col),
            *(a for s in HAND_CRAFTED for a in ("-d", s))]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.Popen(args, env={**os.environ, "CBIR_WORKERS": "2", **(env or {})},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(child.pid))
        time.sleep(SAMPLE_SECONDS)
    if child.returncode != 0:
        raise SystemExit(f"cbir index failed on {folder}")
    return peak, time.perf_counter() - started


def one_file(path: Path) -> tuple[str, int, float]:
    """Extract one file in a fresh process: its outcome, the process's peak RSS and seconds."""
    code = (
        "import resource, sys, time\n"
        "from cbir import images\n"
        "from cbir.extraction import Task, extract_chunk\n"
        "t = time.perf_counter()\n"
        f"(u,) = extract_chunk([Task({str(path)!r}, {HAND_CRAFTED!r})], images.Limits())\n"
        "print(u.status, '|', u.reason or '', '|',\n"
        "      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, '|', time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    status, reason, rss_kib, seconds = (p.strip() for p in out.stdout.split("|"))
    return f"{status}: {reason}" if reason else status, int(rss_kib) * 1024, float(seconds)


def main() -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_corpus(root / "hostile")
        peak, seconds = index_run(root / "hostile", root / "c1")
        rows.append(f"| hostile corpus ({len(list((root / 'hostile').iterdir()))} files), "
                    f"2 workers | {peak / MIB:,.0f} MiB | {seconds:.1f} s |")  # fmt: skip
        photos(root / "photos")
        peak, seconds = index_run(root / "photos", root / "c2")
        rows.append(f"| {PHOTOS} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, 2 workers | "
                    f"{peak / MIB:,.0f} MiB | {seconds:.1f} s |")  # fmt: skip
        singles = []
        grey16_png(root / "grey16-14000.png", 14000)
        singles.append(("16-bit grey PNG, 14,000²", root / "grey16-14000.png"))
        sparse = root / "sparse-1GiB.jpg"
        with open(sparse, "wb") as fh:
            fh.truncate(1 << 30)
        singles.append(("1 GiB file of zeros named .jpg", sparse))
        for what, path in singles:
            outcome, rss, secs = one_file(path)
            rows.append(f"| {what} ({path.stat().st_size / 1e6:,.1f} MB): {outcome} | "
                        f"{rss / MIB:,.0f} MiB (one process) | {secs:.2f} s |")  # fmt: skip
    idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return "\n".join([
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; this script's own peak "
        f"{idle / MIB:,.0f} MiB.", "", "| run | peak memory | time |", "|---|---|---|", *rows,
    ])  # fmt: skip


if __name__ == "__main__":
    print(main())
