"""The namespace helpers clean up: on exit, on failure, and after a run that crashed."""

import os

import pytest

from tests.netns import PREFIX, HostNetwork, can_make_namespaces, ip, remove_leftovers

WHY_NOT = can_make_namespaces()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"namespace helpers {WHY_NOT}")


def namespaces() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()}


def dead_pid() -> int:
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid += 1
    return pid


def test_a_crashed_runs_namespaces_are_removed_and_a_live_ones_kept():
    crashed, live = f"{PREFIX}{dead_pid()}-a", f"{PREFIX}{os.getpid()}-keep"
    ip("netns", "add", crashed)
    ip("netns", "add", live)
    try:
        assert crashed in remove_leftovers()
        assert crashed not in namespaces() and live in namespaces()
    finally:
        ip("netns", "delete", crashed, check=False)
        ip("netns", "delete", live, check=False)


def test_everything_is_removed_even_when_the_body_fails():
    with pytest.raises(RuntimeError):
        with HostNetwork(["x", "y"]) as net:
            made = {net.switch, *(h.namespace for h in net.hosts.values())}
            assert made <= namespaces()
            raise RuntimeError("a failing test")
    assert not made & namespaces()
    assert f"{net.tag}c" not in ip("link", "show").stdout
