"""CNN extraction rate: the whole pipeline from files beside the network alone.

For each data set and precision, two rates in images/s on the same 2 worker processes (one
PyTorch thread each, as `cbir index` runs them):

- network alone: the images decoded and resized beforehand, only the forward passes (batches
  of the pipeline's chunk size) are timed;
- pipeline: `extraction.run_tasks` from the files: read, hash, decode (JPEG draft mode), resize,
  forward pass, pooling.

The goal is a pipeline at 80% or more of the network-alone rate: decoding hidden behind
inference. Usage: python benchmarks/bench_deep.py [limit per set]
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import dataset, image_files, md_table

from cbir import images
from cbir.extraction import Task, _init_worker, run_tasks
from cbir.features import create_descriptor
from cbir.features.cnn import _square, target_side

CHUNK = 16  # run_tasks' chunk: the batch each worker's forward pass sees
SETS = {"cifar10/test": None, "dtd10": None}


def _arrays(files: list[Path], spec: str) -> list[np.ndarray]:
    d = create_descriptor(spec)
    out = []
    for f in files:
        a = images.to_array(images.load(str(f), max_side=d.input_spec.max_side), d.input_spec)
        out.append(_square(a, target_side(a.shape[0], a.shape[1], d.size, d.small_scale)))
    return out


def _forward(spec: str, batches: list[np.ndarray]) -> float:
    """In a worker: the raw network time over pre-decoded batches (model loaded first)."""
    from cbir.features._backbone import backbone

    d = create_descriptor(spec)
    net = backbone(d.model, batches[0].shape[1], d.precision)
    net.features(net.tensor(list(batches[0][:2])), d.layers)  # warm-up
    started = time.perf_counter()
    for batch in batches:
        net.features(net.tensor(list(batch)), d.layers)
    return time.perf_counter() - started


def network_alone(spec: str, arrays: list[np.ndarray], workers: int = 2) -> float:
    """Images/s of the forward passes alone, on ``workers`` processes in parallel."""
    chunks = [np.stack(arrays[i : i + CHUNK]) for i in range(0, len(arrays), CHUNK)]
    shares = [chunks[w::workers] for w in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
        list(pool.map(_forward, [spec] * workers, [s[:1] for s in shares]))  # load models
        seconds = list(pool.map(_forward, [spec] * workers, shares))
    return len(arrays) / max(seconds)


def pipeline(spec: str, files: list[Path], workers: int = 2) -> tuple[float, float]:
    """Images/s of the extraction pipeline from the files: steady state (from the first chunk
    delivered to the last, the workers started and their model loaded) and the whole run
    (process start-up and model loading included)."""
    tasks = [Task(str(f), (spec,)) for f in files]
    first: float | None = None
    done = after_first = 0

    def count(update: object) -> None:
        nonlocal done, after_first, first
        done += 1
        if first is None:
            first = time.perf_counter()
        else:
            after_first += 1

    started = time.perf_counter()
    limits = images.Limits(max_pixels=10**8)
    run_tasks(tasks, workers=workers, limits=limits, chunk_size=CHUNK, on_result=count)
    end = time.perf_counter()
    assert first is not None
    return after_first / (end - first), done / (end - started)


def main(limit: int | None = None) -> str:
    rows = []
    for name in SETS:
        files = image_files(dataset(name), limit)
        for precision in ("bf16", "fp32"):
            spec = create_descriptor("cnn", center=False, augment=0, precision=precision).spec
            arrays = _arrays(files, spec)
            alone = network_alone(spec, arrays)
            steady, whole = pipeline(spec, files)
            side = arrays[0].shape[0]
            rows.append(
                [
                    name,
                    len(files),
                    f"{side} px",
                    precision,
                    f"{alone:.1f}",
                    f"{steady:.1f}",
                    f"{100 * steady / alone:.0f}%",
                    f"{whole:.1f}",
                ]
            )
            print(rows[-1], flush=True)
    table = md_table(
        [
            "set",
            "images",
            "network input",
            "precision",
            "network alone",
            "pipeline",
            "pipeline / network",
            "whole run with start-up",
        ],
        rows,
    )
    return (
        "`cnn` (EfficientNet-Lite0, stages 5-7 pooled), 2 worker processes with one PyTorch "
        f"thread each, batches of {CHUNK}; images/s. The pipeline rate is the steady state (from "
        "the first chunk delivered to the last); the last column also counts starting the "
        f"workers and loading the model in each.\n\n{table}\n"
    )


if __name__ == "__main__":
    print(main(int(sys.argv[1]) if len(sys.argv) > 1 else None))
