"""Hosts made of Linux network namespaces, for tests that need several machines (root only).

    with HostNetwork(["a", "b", "c"]) as net:
        net.hosts["a"].address          # 198.18.N.1: reachable from this process and the other hosts
        net.hosts["b"].argv("python", ...)   # the command, run inside host b
        net.hosts["c"].link_down()      # cut host c off the others (and back: link_up)

Topology: every host is a namespace with one veth whose peer sits on a bridge in a
"switch" namespace of its own; this process (the root namespace) joins the switch with a
veth too, so the tests reach every host while the root namespace forwards nothing (its
firewall rules never see the traffic). Names start with `pdmh<pid>-`, so a later run can
tell and remove what a crashed run left (its pid is gone). Everything is removed on exit,
on failure and on Ctrl-C.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "pdmh"
_NAME = re.compile(rf"^{PREFIX}(\d+)-")
_SUBNETS = ipaddress.ip_network("198.18.0.0/16")  # RFC 2544 benchmarking range: nobody routes it


def can_make_namespaces() -> str | None:
    """None when this process may build namespaces, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and a bridge)"
    if shutil.which("ip") is None:
        return "needs the `ip` tool (iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"  # root without CAP_SYS_ADMIN/NET_ADMIN (a plain container) cannot
    made = ip("netns", "add", probe, check=False)
    ip("netns", "delete", probe, check=False)
    if made.returncode != 0:
        return f"cannot make network namespaces here: {made.stderr.strip()}"
    return None


def ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=check, timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Deletes namespaces of earlier runs whose process is gone; returns their names."""
    removed = []
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _NAME.match(name)
        if match and not _alive(int(match[1])):
            ip("netns", "delete", name, check=False)
            removed.append(name)
    for link in json.loads(ip("-j", "link", "show").stdout or "[]"):
        match = re.match(rf"^{PREFIX}(\d+)", link["ifname"])
        if match and not _alive(int(match[1])):
            ip("link", "delete", link["ifname"], check=False)
            removed.append(link["ifname"])
    return removed


@dataclass(frozen=True)
class Host:
    label: str
    namespace: str
    address: str
    interface: str  # this host's veth, inside its namespace
    switch_port: str  # its peer, on the bridge
    switch: str  # the switch namespace

    def argv(self, *command: str) -> list[str]:
        """`command` run inside this host (its program must be an absolute path: `ip netns exec` sets no PATH lookup rules)."""
        return ["ip", "netns", "exec", self.namespace, *command]

    def link_down(self) -> None:
        ip("-n", self.switch, "link", "set", self.switch_port, "down")

    def link_up(self) -> None:
        ip("-n", self.switch, "link", "set", self.switch_port, "up")


class HostNetwork:
    """Namespaces joined by a bridge; a context manager that always removes them."""

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self.client_address = ""
        self._made_namespaces: list[str] = []

    def __enter__(self) -> HostNetwork:
        remove_leftovers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _subnet(self) -> ipaddress.IPv4Network:
        used = {
            ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
            for link in json.loads(ip("-j", "addr", "show").stdout or "[]")
            for a in link.get("addr_info", [])
            if a.get("family") == "inet"
        }
        for subnet in _SUBNETS.subnets(new_prefix=24):
            if subnet not in used:
                return subnet
        raise RuntimeError("no free /24 left in 198.18.0.0/16")

    def _namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._made_namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        subnet = self._subnet()
        addresses = list(subnet.hosts())
        self._namespace(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for index, label in enumerate(self.labels):
            host = Host(
                label=label,
                namespace=f"{self.tag}-{label}",
                address=str(addresses[index]),
                interface=f"eth-{label}"[:15],
                switch_port=f"p-{label}"[:15],
                switch=self.switch,
            )
            self._namespace(host.namespace)
            self._veth(host.interface, host.namespace, host.switch_port)
            ip("-n", host.namespace, "addr", "add", f"{host.address}/{subnet.prefixlen}", "dev", host.interface)
            ip("-n", host.namespace, "link", "set", host.interface, "up")
            self.hosts[label] = host
        # This process's own port on the switch: tests talk to every host through it.
        client = f"{self.tag}c"
        self._veth(client, None, "p-client")
        self.client_address = str(addresses[-1])
        ip("addr", "add", f"{self.client_address}/{subnet.prefixlen}", "dev", client)
        ip("link", "set", client, "up")

    def _veth(self, inside: str, namespace: str | None, switch_port: str) -> None:
        """A veth pair: `inside` in `namespace` (None: this one), its peer on the bridge."""
        where = ["netns", namespace] if namespace is not None else []
        ip("link", "add", inside, *where, "type", "veth", "peer", "name", switch_port, "netns", self.switch)
        ip("-n", self.switch, "link", "set", switch_port, "master", "br0")
        ip("-n", self.switch, "link", "set", switch_port, "up")

    def close(self) -> None:
        # Deleting a namespace deletes its veths, and a veth's peer goes with it.
        for name in reversed(self._made_namespaces):
            ip("netns", "delete", name, check=False)
        self._made_namespaces.clear()
        ip("link", "delete", f"{self.tag}c", check=False)
