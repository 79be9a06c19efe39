"""The Ray executor beside the local process pool: images/s on the same files in one run.

Both index the same 2,000 COIL-100 images (128x128 JPEG, an even sample across the objects)
into a fresh collection with the six default hand-crafted descriptors
(``config.DEFAULT_DESCRIPTORS``), through ``Collection.add`` (discover, plan, extract, write),
on 2 CPUs each:

- local pool: ``--executor local --workers 2`` (2 worker processes, spawned by the run);
- Ray, running instance: ``--executor ray`` on a local Ray instance of 2 CPUs started before
  the run, as a cluster would be (the run starts its 2 actors and connects to nothing);
- Ray, own instance: ``--executor ray`` without an address, as ``cbir index`` runs it: the
  run starts a local 2-CPU instance and stops it, which is in the time.

The goal is the Ray rate (running instance) at least 0.8 of the pool's. The runs alternate,
``ROUNDS`` times each, and the best of each is kept (the machine is shared); the files are read
once first so the page cache favours none. Usage: python benchmarks/bench_ray.py [images]
(writes benchmarks/results/ray.md and its section of docs/benchmarks.md).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, dataset, image_files, md_table, publish, wrap

from cbir.collection import Collection
from cbir.config import DEFAULT_DESCRIPTORS, Settings

IMAGES = 2000
ROUNDS = 2
GOAL = 0.8
SECTION = "## Ray executor beside the local process pool"
INTRO = wrap(
    "`cbir index --executor ray` (2 Ray actors) beside `--executor local` (2 worker "
    f"processes) on the same files (`benchmarks/bench_ray.py`). Goal: Ray at least {GOAL} of "
    "the pool's rate, on a running instance."
)


def index_rate(files: list[Path], executor: str, name: str) -> float:
    """Images/s of one ``Collection.add`` of ``files`` into a fresh collection."""
    root = WORK / f"ray-bench-{name}"
    shutil.rmtree(root, ignore_errors=True)
    settings = Settings(collection=root, workers=2, executor=executor)
    started = time.perf_counter()
    with Collection(root, settings=settings) as col:
        report = col.add(*files, descriptors=list(DEFAULT_DESCRIPTORS))
    seconds = time.perf_counter() - started
    shutil.rmtree(root, ignore_errors=True)
    if report.extracted != len(files):
        raise SystemExit(f"{name}: {report.extracted} of {len(files)} images extracted")
    return len(files) / seconds


def main(limit: int = IMAGES) -> str:
    import ray

    files = image_files(dataset("coil100"), limit)
    for f in files:  # into the page cache, for every run alike
        f.read_bytes()
    best = {"pool": 0.0, "ray": 0.0, "own": 0.0}
    for _ in range(ROUNDS):
        best["pool"] = max(best["pool"], index_rate(files, "local", "pool"))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
        try:
            best["ray"] = max(best["ray"], index_rate(files, "ray", "ray"))
        finally:
            ray.shutdown()
        best["own"] = max(best["own"], index_rate(files, "ray", "own"))
        print({k: round(v, 1) for k, v in best.items()}, flush=True)
    ratio = best["ray"] / best["pool"]
    rows = [
        ["local pool, 2 worker processes", f"{best['pool']:,.0f}", "1.00", ""],
        [
            "Ray, running 2-CPU instance, 2 actors",
            f"{best['ray']:,.0f}",
            f"{ratio:.2f}",
            f">= {GOAL} ({'met' if ratio >= GOAL else 'not met'})",
        ],
        [
            "Ray, own instance started and stopped by the run",
            f"{best['own']:,.0f}",
            f"{best['own'] / best['pool']:.2f}",
            "",
        ],
    ]
    startup = len(files) / best["own"] - len(files) / best["ray"]
    text = (
        wrap(
            f"Ray {ray.__version__}. "
            f"{len(files)} COIL-100 images (128x128 JPEG), the six default hand-crafted "
            f"descriptors ({', '.join(DEFAULT_DESCRIPTORS)}), `Collection.add` into a fresh "
            f"collection; best of {ROUNDS} alternating runs each."
        )
        + "\n\n"
        + md_table(["executor", "images/s", "ratio to the pool", "goal"], rows)
        + "\n\n"
        + wrap(
            f"Starting and stopping its own instance cost the run {startup:.1f} s more than a "
            "running instance: paid once per run, it matters little at a size that needs a "
            "cluster."
        )
        + "\n"
    )
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "ray.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    publish(SECTION, INTRO, main(int(sys.argv[1]) if len(sys.argv) > 1 else IMAGES))
