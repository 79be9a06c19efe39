"""Images per second of each descriptor beside decoding alone, on the same files in one run.

Rates are single-process (one core), measured from bytes already in memory so disk speed does not
enter. Decode-only is reported twice: at full size, and with JPEG draft mode for the 256 px the
descriptors ask for; the faster of the two is the floor a descriptor is compared with. The last
row is the whole pipeline (`Collection.add`, every default descriptor, both cores, from disk).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, dataset, image_files, md_table, publish, rate, wrap

from cbir import images
from cbir.collection import Collection
from cbir.config import DEFAULT_DESCRIPTORS, Settings
from cbir.features import create_descriptor

BATCH = 64
SECTION = "## Extraction rate (images/s, one process, from bytes in memory)"
INTRO = wrap(
    "Goal: colour histograms at least half the decode-only rate, every hand-crafted descriptor "
    "at least a quarter. A descriptor's rate includes its own decode (JPEG draft mode at the "
    "size it asks for), resize and description; the percentage compares it with the faster of "
    "two decode-only rates: full size, and draft for the descriptor's own size without the "
    "resize. On a shared machine the absolute rates move by up to 40% between runs; the "
    "percentages are steadier. Compare runs before drawing conclusions."
)


def _descriptor_rate(blobs: list[bytes], spec: str) -> float:
    d = create_descriptor(spec)
    side = d.input_spec.decode_side

    def run() -> int:
        for lo in range(0, len(blobs), BATCH):
            arrays = [
                images.to_array(images.decode(b, max_side=side, shrink=False), d.input_spec)
                for b in blobs[lo : lo + BATCH]
            ]
            d.transform(arrays)
        return len(blobs)

    return rate(run, repeats=2)


def _decode_rate(blobs: list[bytes], side: int | None) -> float:
    return rate(lambda: sum(1 for b in blobs if images.decode(b, max_side=side, shrink=False)), 2)


def bench(name: str, limit: int | None) -> tuple[str, dict[str, float]]:
    files = image_files(dataset(name), limit)
    blobs = [f.read_bytes() for f in files]
    out: dict[str, float] = {"decode (full size)": _decode_rate(blobs, None)}
    for spec in DEFAULT_DESCRIPTORS:
        side = create_descriptor(spec).input_spec.decode_side
        key = f"decode (draft for {side} px)"
        if key not in out:
            out[key] = _decode_rate(blobs, side)
        out[spec] = _descriptor_rate(blobs, spec)
    col_dir = WORK / f"extract-{name.replace('/', '-')}"
    shutil.rmtree(col_dir, ignore_errors=True)
    settings = Settings(collection=col_dir, workers=2)
    t0 = time.perf_counter()
    with Collection(col_dir, settings=settings) as col:
        col.add(*files, descriptors=list(DEFAULT_DESCRIPTORS))
    out["pipeline: all 6, 2 processes"] = len(files) / (time.perf_counter() - t0)
    shutil.rmtree(col_dir, ignore_errors=True)
    return f"{name} ({len(files)} images)", out


def main() -> str:
    results = [bench("dtd10", None), bench("cifar10/test", None)]
    names = list(results[0][1])
    header = ["", *[title for title, _ in results]]
    rows = []
    for key in names:
        row: list[object] = [key]
        for _, r in results:
            cell = f"{r[key]:,.0f} img/s"
            if key in DEFAULT_DESCRIPTORS:
                # the floor: the faster of a full decode and a draft decode at its own size
                side = create_descriptor(key).input_spec.decode_side
                floor = max(r["decode (full size)"], r[f"decode (draft for {side} px)"])
                cell += f" ({r[key] / floor:.0%} of decode)"
            row.append(cell)
        rows.append(row)
    text = md_table(header, rows)
    print(text)
    return text


if __name__ == "__main__":
    publish(SECTION, INTRO, main())
