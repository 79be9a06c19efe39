"""A real standalone Milvus server for the tests and benchmarks, from the PyPI package ``milvus``
(the ``milvus-server`` extra), on 127.0.0.1 only.

The package unpacks a Milvus 2.3 binary under a data folder and runs it with a config written
from its template. Here every port is one the OS just gave as free (so two runs on one machine
do not collide), every component registers itself as 127.0.0.1, and the embedded etcd, which
the template leaves on localhost:2379 and 2380, gets a config file of its own with free ports
too. The server ignores SIGTERM for a long while; :meth:`MilvusProcess.kill` sends SIGKILL to
its pid and every process under it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

#: The template's port settings, each given a free port.
PORT_KEYS = (
    "etcd_port", "root_coord_port", "proxy_port", "proxy_internal_port", "query_coord_port",
    "query_node_port", "index_coord_port", "index_node_port", "data_coord_port",
    "data_node_port",
)  # fmt: skip
#: The components that register an address for the others to reach them.
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
LOOPBACK = "127.0.0.1"
#: Milliseconds the package waits for the server's health check.
START_TIMEOUT_MS = 120_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class MilvusProcess:
    uri: str
    pid: int
    folder: Path

    def kill(self) -> None:
        """SIGKILL to the server and everything under it (the only signal it obeys at once);
        once (its pid may be another process's afterwards)."""
        if not self.pid:
            return
        for pid in [*_descendants(self.pid), self.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)  # reap it: the package started it as our child
        self.pid = 0


def _descendants(pid: int) -> list[int]:
    """The processes under ``pid``, from /proc (children before their parents' turn)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found.extend(children)
        frontier = children
    return found[::-1]


def _etcd_config(folder: Path) -> tuple[Path, int]:
    """A config for Milvus's embedded etcd that listens on free loopback ports."""
    client, peer = free_port(), free_port()
    path = folder / "etcd.yaml"
    path.write_text(
        f"name: default\n"
        f"listen-client-urls: http://{LOOPBACK}:{client}\n"
        f"advertise-client-urls: http://{LOOPBACK}:{client}\n"
        f"listen-peer-urls: http://{LOOPBACK}:{peer}\n"
        f"initial-advertise-peer-urls: http://{LOOPBACK}:{peer}\n"
        f"initial-cluster: default=http://{LOOPBACK}:{peer}\n"
    )
    return path, client


def start(folder: Path) -> MilvusProcess:
    """Start a standalone Milvus server with its data under ``folder``; returns once it
    answers its health check."""
    from milvus import MilvusServer, MilvusServerConfig

    folder.mkdir(parents=True, exist_ok=True)
    etcd_file, etcd_port = _etcd_config(folder)
    default = MilvusServerConfig()
    template = Path(default.template_file).read_text()
    # the template has no setting for the embedded etcd's own config file: add one
    anchor = "  data:\n    dir: {{ etcd_data_dir }}\n"
    if anchor not in template:
        raise RuntimeError("the milvus package's config template has changed; update this file")
    template = template.replace(anchor, f"{anchor}  config:\n    path: {etcd_file}\n")
    (folder / "milvus.yaml.template").write_text(template)
    ports = {key: free_port() for key in PORT_KEYS}
    ports["etcd_port"] = etcd_port
    config = MilvusServerConfig(
        template=str(folder / "milvus.yaml.template"), data_dir=str(folder / "server"), **ports
    )
    config.glog_conf_file = default.glog_conf_file  # set only when no template is given
    for component in COMPONENTS:
        config.set(f"{component}.ip", LOOPBACK)
    server = MilvusServer(config, wait_for_started=False)
    server.webservice_port = free_port()  # its health check and metrics (the package: 9091 up)
    server.start()
    uri = f"http://{LOOPBACK}:{ports['proxy_port']}"
    process = MilvusProcess(uri, server.server_proc.pid, folder)
    atexit.register(process.kill)  # if the caller never gets to it
    try:
        server.wait_started(timeout=START_TIMEOUT_MS)
    except BaseException:
        process.kill()
        raise
    finally:
        server.server_proc = None  # ours to stop (the package's stop() waits on SIGTERM)
    return process
