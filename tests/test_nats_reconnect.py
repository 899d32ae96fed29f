"""connect_nats over a real two-node cluster: failover to the other node, one log line per
backoff step while no node answers (not a flood), and back once one returns."""

import asyncio

import pytest
from structlog.testing import capture_logs

from shared.nats_server import NatsCluster
from shared.runtime import connect_nats


async def until(condition, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


async def test_fails_over_then_backs_off_then_comes_back():
    with NatsCluster(2) as cluster, capture_logs() as logs:
        first, second = cluster.nodes
        nc = await connect_nats(cluster.url_list(0), "pd-test")
        try:
            assert nc.connected_url.port == first.port  # the order given is the preference
            first.kill()
            await until(lambda: nc.is_connected and nc.connected_url.port == second.port, 5)
            reconnecting = events(logs, "nats_reconnecting")
            assert reconnecting[0]["server"] == f"127.0.0.1:{second.port}" and reconnecting[0]["wait_s"] == 0.0

            second.stop()  # no node left
            await asyncio.sleep(3.0)
            steps = events(logs, "nats_reconnecting")[len(reconnecting):]
            assert 3 <= len(steps) <= 12  # backoff: a handful of lines in 3 s, not one per millisecond
            waits = [step["wait_s"] for step in steps]
            assert waits[-1] > waits[1] > 0
            assert "Connect call failed" in steps[-1]["error"] or "Refused" in steps[-1]["error"]

            second.start()  # the same address comes back
            await until(lambda: nc.is_connected, 10)
            assert events(logs, "nats_reconnected")[-1]["server"] == f"127.0.0.1:{second.port}"
        finally:
            await nc.close()


async def test_first_connection_gives_up_naming_every_server():
    with capture_logs() as logs:
        with pytest.raises(ConnectionError) as error:
            await connect_nats("nats://127.0.0.1:1,nats://127.0.0.1:2", "pd-test", first_connect_timeout=1.5)
    assert "nats://127.0.0.1:1, nats://127.0.0.1:2" in str(error.value)
    assert 2 <= len(events(logs, "nats_unreachable")) <= 8  # one line per round of tries
