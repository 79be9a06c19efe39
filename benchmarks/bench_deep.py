"""CNN extraction rate per inference engine: the whole pipeline from files beside the network
alone, every engine in the same run.

For each data set and engine, on the same 2 worker processes (one thread each, as `cbir index`
runs them; the engine comes from CBIR_ENGINE, which the workers inherit), in images/s:

- network alone: the images decoded and resized beforehand, only the forward passes (batches
  of the pipeline's chunk size) are timed;
- pipeline: `extraction.run_tasks` from the files: read, hash, decode (JPEG draft mode), resize,
  forward pass, pooling;
- the largest difference of the engine's vectors from today's path (PyTorch bfloat16), over
  every image of the set.

The descriptor is the same for every engine (`cnn:center=false,augment=0`, precision bf16): the
engine does not change the spec. Rates are given by the wall clock and in CPU time (images per
CPU-second times the cores), which other jobs on a shared machine hardly move. Goals: the
default engine's pipeline at least 2x PyTorch's on dtd10, and every pipeline at 80% or more of
its network alone. A second table compares the
layouts (2 processes x 1 thread, 1 process x 2 threads) and batch sizes of the network alone.
Usage: python benchmarks/bench_deep.py [limit per set]
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import dataset, image_files, md_table

from cbir import images
from cbir.extraction import Task, _init_worker, run_tasks
from cbir.features import _engines, create_descriptor
from cbir.features.cnn import _square, target_side
from cbir.store import ImageUpdate

CHUNK = 16  # run_tasks' chunk: the batch each worker's forward pass sees
CORES = 2  # the worker processes, one per core of this machine
SETS = ("dtd10", "cifar10/test")
#: (label, CBIR_ENGINE): today's path first, the reference of the speed-up and the differences
ENGINES = (("PyTorch bf16 (before)", "torch"), ("ONNX Runtime", "onnx"), ("OpenVINO", "openvino"))
SPEC = create_descriptor("cnn", center=False, augment=0).spec


def _arrays(files: list[Path]) -> list[np.ndarray]:
    d = create_descriptor(SPEC)
    out = []
    for f in files:
        a = images.to_array(images.load(str(f), max_side=d.input_spec.max_side), d.input_spec)
        out.append(_square(a, target_side(a.shape[0], a.shape[1], d.size, d.small_scale)))
    return out


def _forward(batches: list[np.ndarray]) -> tuple[float, float]:
    """In a worker: the network's wall and CPU time over pre-decoded batches (model loaded
    first)."""
    d = create_descriptor(SPEC)
    readout = _engines.Readout(d.layers, "mean")  # average pooling in the network, as `cnn`
    net = _engines.network(d.model, batches[0].shape[1], d.precision, readout)
    net.features(batches[0][:2])  # warm-up
    started, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        net.features(batch)
    return time.perf_counter() - started, time.process_time() - cpu


def _init_threads() -> None:
    """A worker that may use every core (the one-process layout)."""
    os.environ.pop("CBIR_WORKER", None)


def network_alone(
    arrays: list[np.ndarray], workers: int = 2, batch: int = CHUNK
) -> tuple[float, float]:
    """Images/s of the forward passes alone on ``workers`` processes in parallel (one thread
    each; a single process gets every core): by the wall clock, and per CPU-second times the
    cores (what the cores would do if nothing else ran on them)."""
    chunks = [np.stack(arrays[i : i + batch]) for i in range(0, len(arrays), batch)]
    shares = [chunks[w::workers] for w in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    init = _init_worker if workers > 1 else _init_threads
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init) as pool:
        list(pool.map(_forward, [s[:1] for s in shares]))  # load models
        times = list(pool.map(_forward, shares))
    wall = max(t for t, _ in times)
    return len(arrays) / wall, CORES * len(arrays) / sum(c for _, c in times)


def _cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the pool's workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def pipeline(files: list[Path], workers: int = 2) -> tuple[float, float, float, np.ndarray]:
    """Images/s of the extraction pipeline from the files: steady state (from the first chunk
    delivered to the last, the workers started and their model loaded), the whole run (process
    start-up and model loading included), and the CPU time the run took (parent and workers);
    and the vectors, in the files' order."""
    tasks = [Task(str(f), (SPEC,)) for f in files]
    first: float | None = None
    done = after_first = 0
    vectors: dict[str, np.ndarray] = {}

    def count(update: ImageUpdate) -> None:
        nonlocal done, after_first, first
        done += 1
        vectors[update.path] = update.vectors[SPEC]
        if first is None:
            first = time.perf_counter()
        else:
            after_first += 1

    started, cpu = time.perf_counter(), _cpu_seconds()
    limits = images.Limits(max_pixels=10**8)
    run_tasks(tasks, workers=workers, limits=limits, chunk_size=CHUNK, on_result=count)
    end = time.perf_counter()
    assert first is not None
    return (
        after_first / (end - first),
        done / (end - started),
        _cpu_seconds() - cpu,
        np.stack([vectors[str(f)] for f in files]),
    )


def pipeline_cpu_rate(files: list[Path]) -> tuple[float, float, float, np.ndarray]:
    """:func:`pipeline`, plus its rate per CPU-second times the cores at steady state: the CPU
    time of a run of one chunk per worker (start-up, model loading) is taken off a full run's."""
    steady, whole, cpu, vectors = pipeline(files)
    small = 2 * CHUNK
    _, _, start_cpu, _ = pipeline(files[:small])
    return steady, whole, CORES * (len(files) - small) / (cpu - start_cpu), vectors


def _differences(x: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Largest component difference and smallest block cosine of ``x`` against ``ref``."""
    d = create_descriptor(SPEC)
    edges = np.cumsum([0, *d.block_dims])
    cosine = min(
        float((x[:, a:b] * ref[:, a:b]).sum(1).min()) for a, b in itertools.pairwise(edges)
    )
    return float(np.abs(x - ref).max()), cosine


def main(limit: int | None = None) -> str:
    rows, layout_rows = [], []
    default = _engines.resolve("auto")
    for name in SETS:
        files = image_files(dataset(name), limit)
        arrays = _arrays(files)
        side = arrays[0].shape[0]
        before = reference = None
        for label, engine in ENGINES:
            if engine != "torch" and not _engines.installed(engine):
                continue
            os.environ["CBIR_ENGINE"] = engine
            alone, alone_cpu = network_alone(arrays)
            steady, whole, steady_cpu, vectors = pipeline_cpu_rate(files)
            if reference is None:
                before, before_cpu, reference = steady, steady_cpu, vectors
            diff, cosine = _differences(vectors, reference)
            rows.append(
                [
                    name,
                    len(files),
                    f"{side} px",
                    label + (" (default)" if engine == default else ""),
                    f"{alone_cpu:.1f}",
                    f"{steady_cpu:.1f}",
                    f"{100 * steady_cpu / alone_cpu:.0f}%",
                    f"{steady_cpu / before_cpu:.2f}x",
                    f"{alone:.1f}",
                    f"{steady:.1f}",
                    f"{100 * steady / alone:.0f}%",
                    f"{steady / before:.2f}x",
                    f"{whole:.1f}",
                    f"{diff:.1e} / {cosine:.4f}",
                ]
            )
            print(rows[-1], flush=True)
        os.environ["CBIR_ENGINE"] = default
        sample = arrays[: min(len(arrays), 480)]
        layouts = {
            "2 processes x 1 thread, batch 16": network_alone(sample, 2, 16),
            "1 process x 2 threads, batch 16": network_alone(sample, 1, 16),
            "2 processes x 1 thread, batch 8": network_alone(sample, 2, 8),
            "2 processes x 1 thread, batch 32": network_alone(sample, 2, 32),
        }
        for layout, value in layouts.items():
            layout_rows.append(
                [name, f"{side} px", default, layout, f"{value[1]:.1f}", f"{value[0]:.1f}"]
            )
            print(layout_rows[-1], flush=True)
    table = md_table(
        [
            "set",
            "images",
            "network input",
            "engine",
            "CPU: network alone",
            "CPU: pipeline",
            "CPU: pipeline / network",
            "CPU: pipeline vs before",
            "wall: network alone",
            "wall: pipeline",
            "wall: pipeline / network",
            "wall: pipeline vs before",
            "wall: whole run with start-up",
            "vs before: max diff / min block cosine",
        ],
        rows,
    )
    layout_table = md_table(
        ["set", "network input", "engine", "layout", "CPU: images/s", "wall: images/s"],
        layout_rows,
    )
    return (
        f"`{create_descriptor(SPEC).short_spec}` (EfficientNet-Lite0, stages 5-7 pooled, "
        "precision bf16), 2 worker processes with one thread each, batches of "
        f"{CHUNK}; images/s. 'CPU' rates are images per CPU-second of the processes times the 2 "
        "cores: what the two cores do when nothing else runs on them, and hardly moved by "
        "other jobs on a shared machine; 'wall' rates are by the clock, in this run's load. "
        "The pipeline rate is the steady state (by the wall clock from the first chunk "
        "delivered to the last; in CPU time without a run of one chunk per worker, i.e. without "
        "starting the workers and loading the model); 'whole run' also counts start-up."
        f"\n\n{table}\n\nThe network alone of the default engine by process layout and "
        f"batch size (the first {len(sample)} images of each set):\n\n"
        f"{layout_table}\n"
    )


if __name__ == "__main__":
    print(main(int(sys.argv[1]) if len(sys.argv) > 1 else None))
