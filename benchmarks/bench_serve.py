"""Load and soak benchmark of ``cbir serve``: 32 concurrent clients on loopback for 60 seconds
per mix, against CIFAR-10 train (50,000 images) indexed with ``cnn``.

Mixes (each a closed loop: a client sends its next request when the last is answered):

- ``id``: searches by the id of an indexed image (``GET /api/search?id=..&k=10``).
- ``upload``: searches by an uploaded CIFAR-10 test JPEG (``POST /api/search``, multipart).
  Its throughput is compared with the network-alone embedding rate (the CNN's forward pass on
  batches of already decoded images, in this process, with the server idle) measured in the
  same run.
- ``soak``: good searches mixed with bad requests (decompression bombs, truncated files, ids
  that do not exist, writes without a key or with a wrong one). Every answer must have its
  expected status (zero 5xx); the server's memory growth over the run is reported.

The server is a separate process (``python -m cbir.cli serve``), so its peak memory is its own
(``VmHWM``). Clients are threads with one keep-alive connection each (``http.client``): light,
so most of the two cores go to the server.

``python benchmarks/bench_serve.py [--collection DIR] [--seconds 60] [--clients 32]
[--mixes id,upload,soak]``: the collection defaults to benchmarks/results/cifar10-train-cnn
(built from ../shared/datasets/cifar10/train when absent, as bench_index.py builds it). Prints
a Markdown section (for docs/serve.md) and writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, WORK, dataset, image_files, machine, md_table

from cbir.collection import Collection
from cbir.config import Settings

CLIENTS = 32
SECONDS = 60.0
K = 10
SPEC = "cnn"
KEY = uuid.uuid4().hex
#: Query images kept in memory for the upload mix (an even sample of CIFAR-10 test).
UPLOADS = 2000
#: Images and batch size of the network-alone reference.
REFERENCE_IMAGES, REFERENCE_BATCH = 512, 32
#: Goals of issue 12 on this 2-core machine.
GOAL_ID_P50_MS = 20.0
GOAL_UPLOAD_P50_MS = 150.0
GOAL_UPLOAD_RATIO = 0.8
STARTUP_SECONDS = 300


# -- the collection and the server ----------------------------------------------------------------
def collection_dir(given: Path | None) -> Path:
    col_dir = given or WORK / "cifar10-train-cnn"
    if not (col_dir / "catalogue.sqlite").exists():
        settings = Settings(collection=col_dir, workers=2)
        with Collection(col_dir, settings=settings) as col:
            col.add(dataset("cifar10/train"), descriptors=[SPEC], labels="folder")
            col.build_indexes()
    return col_dir


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(col_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CBIR_API_KEY": KEY, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cbir.cli", "serve", str(col_dir), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/stats")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def stats(port: int) -> dict[str, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/api/stats")
    return json.loads(conn.getresponse().read())


def memory(pid: int) -> dict[str, int]:
    """The process's resident memory now and at its peak, in bytes (Linux)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) * 1024
    return out


# -- requests --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]
    expect: int
    kind: str


def multipart(files: list[bytes], fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        parts.append(f"{head}{value}\r\n".encode())
    for n, data in enumerate(files):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="q{n}.jpg"'
            "\r\nContent-Type: image/jpeg\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def upload_request(data: bytes, expect: int = 200, kind: str = "upload") -> Request:
    body, ctype = multipart([data], {"k": str(K)})
    return Request("POST", "/api/search", body, {"Content-Type": ctype}, expect, kind)


def bomb_png(side: int = 60_000) -> bytes:
    """A valid PNG whose header claims ``side x side`` pixels (its data is one pixel)."""
    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, "PNG")
    data = bytearray(out.getvalue())
    at = data.index(b"IHDR")
    data[at + 4 : at + 12] = struct.pack(">II", side, side)
    data[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at : at + 17])))
    return bytes(data)


def mixes(ids: list[int], uploads: list[bytes]) -> dict[str, Callable[[random.Random], Request]]:
    def by_id(rng: random.Random) -> Request:
        return Request("GET", f"/api/search?id={rng.choice(ids)}&k={K}", None, {}, 200, "id")

    def by_upload(rng: random.Random) -> Request:
        return upload_request(rng.choice(uploads))

    bomb = bomb_png()
    missing = max(ids) + 1_000_000

    def soak(rng: random.Random) -> Request:
        roll = rng.random()
        if roll < 0.45:
            return by_id(rng)
        if roll < 0.6:
            return by_upload(rng)
        if roll < 0.7:
            return upload_request(bomb, 413, "bomb")
        if roll < 0.8:
            data = rng.choice(uploads)
            return upload_request(data[: len(data) // 3], 400, "truncated")
        if roll < 0.9:
            return Request("GET", f"/api/search?id={missing}&k={K}", None, {}, 404, "bad id")
        if roll < 0.95:
            return Request("DELETE", f"/api/images/{rng.choice(ids)}", None, {}, 401, "no key")
        return Request(
            "DELETE",
            f"/api/images/{rng.choice(ids)}",
            None,
            {"X-API-Key": "wrong"},
            403,
            "wrong key",
        )

    return {"id": by_id, "upload": by_upload, "soak": soak}


# -- the load ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    wrong: Counter[str] = field(default_factory=Counter)
    failures: int = 0


def run_load(
    port: int, make: Callable[[random.Random], Request], seconds: float, clients: int
) -> tuple[Outcome, float]:
    deadline = time.monotonic() + seconds
    outcomes = [Outcome() for _ in range(clients)]

    def client(n: int) -> None:
        rng = random.Random(n)
        out = outcomes[n]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < deadline:
            req = make(rng)
            t0 = time.perf_counter()
            try:
                conn.request(req.method, req.path, body=req.body, headers=req.headers)
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException):
                out.failures += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            out.latencies.append(time.perf_counter() - t0)
            out.statuses[resp.status] += 1
            if resp.status != req.expect or (req.expect >= 400 and b'"message"' not in body):
                out.wrong[f"{req.kind}: {resp.status}"] += 1
            if resp.getheader("connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    total = Outcome()
    for o in outcomes:
        total.latencies += o.latencies
        total.statuses.update(o.statuses)
        total.wrong.update(o.wrong)
        total.failures += o.failures
    return total, elapsed


def network_alone(col_dir: Path, uploads: list[bytes]) -> float:
    """Images/s of the CNN's forward pass alone (decoded arrays in, raw features out)."""
    from cbir.extraction import extract_arrays

    with Collection(col_dir, settings=Settings(collection=col_dir), create=False) as col:
        record = col.descriptor(SPEC)
        descriptor = col.instance(record)
        limits = col.settings.limits
        arrays = [extract_arrays(u, descriptor, limits=limits) for u in uploads[:REFERENCE_IMAGES]]
    descriptor.transform_raw(arrays[:REFERENCE_BATCH])  # warm up
    t0 = time.perf_counter()
    for lo in range(0, len(arrays), REFERENCE_BATCH):
        descriptor.transform_raw(arrays[lo : lo + REFERENCE_BATCH])
    return len(arrays) / (time.perf_counter() - t0)


def main(
    col_dir: Path | None = None,
    seconds: float = SECONDS,
    clients: int = CLIENTS,
    wanted: tuple[str, ...] = ("id", "upload", "soak"),
) -> str:
    col_dir = collection_dir(col_dir)
    with Collection(col_dir, settings=Settings(collection=col_dir), create=False) as col:
        ids = [r.id for r in col.store.images(status="ok")]
    files = image_files(dataset("cifar10/test"), UPLOADS)
    uploads = [f.read_bytes() for f in files]
    reference = network_alone(col_dir, uploads) if "upload" in wanted else None

    port = free_port()
    server = start_server(col_dir, port)
    results: dict[str, dict[str, object]] = {}
    try:
        warm = mixes(ids, uploads)
        run_load(port, warm["id"], 3, 4)
        run_load(port, warm["upload"], 3, 4)
        for name in wanted:
            before, batching = memory(server.pid), stats(port)["batching"]
            outcome, elapsed = run_load(port, warm[name], seconds, clients)
            after, batched = memory(server.pid), stats(port)["batching"]
            described = batched["images"] - batching["images"]
            batches = batched["batches"] - batching["batches"]
            lat = np.asarray(outcome.latencies) * 1000
            results[name] = {
                "requests": len(lat),
                "rate": len(lat) / elapsed,
                "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
                "errors": sum(outcome.wrong.values()) + outcome.failures,
                "wrong": dict(outcome.wrong),
                "statuses": dict(outcome.statuses),
                "server_5xx": sum(v for s, v in outcome.statuses.items() if s >= 500),
                "rss_before": before["VmRSS"],
                "rss_after": after["VmRSS"],
                "peak_rss": after["VmHWM"],
                "mean_batch": described / batches if batches else None,
            }
    finally:
        server.terminate()
        server.wait(timeout=60)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "serve.json").write_text(
        json.dumps({"reference_img_s": reference, "clients": clients, "results": results}, indent=2)
    )
    return report(results, reference, clients, seconds, len(ids))


def report(
    results: dict[str, dict[str, object]],
    reference: float | None,
    clients: int,
    seconds: float,
    n_images: int,
) -> str:
    mib = 1 << 20
    rows = []
    for name, r in results.items():
        rows.append(
            [
                name,
                f"{r['rate']:.1f}",
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                r["errors"],
                r["server_5xx"],
                f"{r['peak_rss'] / mib:,.0f}",
                f"{(int(r['rss_after']) - int(r['rss_before'])) / mib:+,.0f}",
                "" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}",
            ]
        )
    lines = [
        f"{clients} clients on loopback, {seconds:.0f} s per mix, {n_images:,} images "
        f"({SPEC}), k={K}. Measured {time.strftime('%Y-%m-%d')} on {machine()}.",
        "",
        md_table(
            [
                "mix",
                "requests/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "5xx",
                "server peak MiB",
                "RSS change MiB",
                "uploads per batch",
            ],
            rows,
        ),
        "",
    ]
    if reference is not None:
        lines.append(
            f"Network alone (the CNN's forward pass, batches of {REFERENCE_BATCH}): "
            f"{reference:.1f} images/s."
        )
        if "upload" in results:
            ratio = float(results["upload"]["rate"]) / reference
            lines.append(f"Searches by upload: {ratio:.2f} of it (goal {GOAL_UPLOAD_RATIO}).")
    for name, r in results.items():
        if r["wrong"]:
            lines.append(f"Unexpected answers in {name}: {r['wrong']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collection", type=Path)
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--mixes", default="id,upload,soak")
    args = parser.parse_args()
    print(main(args.collection, args.seconds, args.clients, tuple(args.mixes.split(","))))
