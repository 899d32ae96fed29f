"""`--ucx-host` forms: an address, an interface name, auto; errors name what this host has."""

import os
import socket

import pytest

from shared.transport.ucx_host import UcxHostError, interface_addresses, keep_ucx_on, resolve_ucx_host


def test_loopback_address_and_interface():
    assert resolve_ucx_host("127.0.0.1").address == "127.0.0.1"
    by_name = resolve_ucx_host("lo")
    assert (by_name.address, by_name.interface) == ("127.0.0.1", "lo")


def test_every_interface_resolves_to_its_own_address():
    addresses = interface_addresses()
    assert addresses.get("lo") == "127.0.0.1"
    for name, address in addresses.items():
        host = resolve_ucx_host(name)
        assert (host.address, host.interface) == (address, name)
        assert resolve_ucx_host(address).interface == name


def test_auto_is_an_address_of_this_host():
    host = resolve_ucx_host("auto")
    assert host.address in interface_addresses().values() or host.is_loopback
    socket.inet_aton(host.address)


@pytest.mark.parametrize("value", ["no-such-if0", "203.0.113.77"])
def test_unusable_values_are_refused_naming_the_interfaces(value):
    with pytest.raises(UcxHostError) as error:
        resolve_ucx_host(value)
    assert value in str(error.value) and "lo (127.0.0.1)" in str(error.value)


def test_ucx_lanes_stay_on_the_chosen_interface_unless_set(monkeypatch):
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    keep_ucx_on(resolve_ucx_host("lo"))  # loopback: UCX is left alone
    assert "UCX_NET_DEVICES" not in os.environ
    others = [name for name, address in interface_addresses().items() if not address.startswith("127.")]
    if not others:
        pytest.skip("no non-loopback interface here")
    keep_ucx_on(resolve_ucx_host(others[0]))
    assert os.environ["UCX_NET_DEVICES"] == others[0]
    monkeypatch.setenv("UCX_NET_DEVICES", "mlx5_0:1")
    keep_ucx_on(resolve_ucx_host(others[0]))
    assert os.environ["UCX_NET_DEVICES"] == "mlx5_0:1"  # the operator's choice wins


async def test_an_unreachable_decoder_is_named_by_host_and_port():
    from shared.processes import free_port
    from shared.transport.ucx_kv import KvSender

    port = free_port()  # nothing listens there
    sender = KvSender()
    with pytest.raises(ConnectionError) as error:
        await sender.connect("127.0.0.1", port)
    await sender.close()
    assert f"UCX listener at 127.0.0.1:{port}" in str(error.value)
