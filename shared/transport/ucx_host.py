"""`--ucx-host`: the address a worker's UCX listener is reached on, from what an operator types.

    resolve_ucx_host("10.0.0.5")  -> UcxHost("10.0.0.5", interface="eth0")
    resolve_ucx_host("eth0")      -> the interface's IPv4 address
    resolve_ucx_host("auto")      -> the address of the interface that carries the default
                                     route (a pod's or container's own IP), else the host
                                     name's address
    resolve_ucx_host("decode-0.pd") -> the name's IPv4 address

The worker advertises the address in its heartbeats; prefill workers connect to exactly
that. ucxx's listener takes a port but no address (it listens on every interface), so
binding "there" means: the address must belong to this host (checked here), and UCX's
own data lanes are kept on its interface (`UCX_NET_DEVICES`, unless the operator set it),
so KV bytes do not wander onto another network. Loopback leaves UCX untouched.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

_SIOCGIFADDR = 0x8915
# Any routable address: connecting a UDP socket sends nothing, it only picks the route.
_ROUTE_PROBE = ("192.0.2.1", 9)


class UcxHostError(ValueError):
    pass


@dataclass(frozen=True)
class UcxHost:
    address: str  # what peers connect to (IPv4)
    interface: str | None  # the local interface holding it (None if none was found)

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


def interface_addresses() -> dict[str, str]:
    """Interface name -> its IPv4 address, for every interface that has one."""
    found = {}
    for _, name in socket.if_nameindex():
        address = _ipv4_of(name)
        if address is not None:
            found[name] = address
    return found


def _ipv4_of(interface: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", interface.encode()[:15]))
        except OSError:  # no such interface, or no IPv4 address on it
            return None
    return socket.inet_ntoa(packed[20:24])


def _default_route_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(_ROUTE_PROBE)
        except OSError:  # no route at all
            return None
        return sock.getsockname()[0]


def resolve_ucx_host(value: str) -> UcxHost:
    """UcxHostError names the value and what this host has when it cannot be used."""
    addresses = interface_addresses()
    interface_of = {address: name for name, address in addresses.items()}
    text = value.strip()
    if text == "auto":
        address = _default_route_address() or socket.gethostbyname(socket.gethostname())
    elif text in addresses:
        address = addresses[text]
    else:
        address = _address_of(text, addresses)
    if address not in interface_of and not ipaddress.ip_address(address).is_loopback:
        raise UcxHostError(f"--ucx-host {value}: {address} is not an address of this host; {_choices(addresses)}")
    return UcxHost(address, interface_of.get(address))


def _address_of(text: str, addresses: dict[str, str]) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(text)
    except OSError:
        raise UcxHostError(f"--ucx-host {text}: not an IPv4 address, interface or resolvable name; {_choices(addresses)}") from None


def _choices(addresses: dict[str, str]) -> str:
    listed = ", ".join(f"{name} ({address})" for name, address in sorted(addresses.items()))
    return f"interfaces here: {listed or 'none with IPv4'}; or 'auto'"


def keep_ucx_on(host: UcxHost) -> None:
    """Restricts UCX's network lanes to the host's interface (before UCX starts; an operator's setting wins)."""
    if host.interface is not None and not host.is_loopback:
        os.environ.setdefault("UCX_NET_DEVICES", host.interface)
