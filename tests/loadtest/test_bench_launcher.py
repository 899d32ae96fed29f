"""The stack launcher of `bench compare`: worker layouts, ready detection, process-group cleanup."""

import os
import sys
import time

import pytest

from loadtest.stack import StackFailed, StackSpec, running

# Prints a ready line like `pdserve up`, with a grandchild in the same group, then waits.
FAKE_UP = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.pid, flush=True)
print("pdserve ready: http://127.0.0.1:4321/v1 (model m, mode disagg, nats nats://x)", flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead for our purposes
        return stat.read().split()[2] != "Z"


def test_layouts_give_both_modes_the_same_total():
    assert StackSpec("m", "colocated", 3).up_flags() == ["--model", "m", "--mode", "colocated", "--prefill", "1", "--decode", "2"]
    assert StackSpec("m", "disagg", 4).up_flags()[-4:] == ["--prefill", "2", "--decode", "2"]
    assert StackSpec("m", "disagg", 4, prefill_workers=3, threads=1).up_flags()[-6:] == ["--prefill", "3", "--decode", "1", "--threads", "1"]
    assert StackSpec("m", "disagg", 2).layout() == "1 prefill + 1 decode"
    assert StackSpec("m", "colocated", 2).layout() == "2 x both"


@pytest.mark.parametrize("kwargs", [{"mode": "mixed", "workers": 2}, {"mode": "disagg", "workers": 1}, {"mode": "disagg", "workers": 2, "prefill_workers": 2}])
def test_impossible_layouts_are_rejected(kwargs):
    with pytest.raises(ValueError):
        StackSpec("m", **kwargs)


def test_running_yields_the_url_and_stops_the_whole_group(tmp_path):
    log = tmp_path / "up.log"
    with running([sys.executable, "-c", FAKE_UP], log, ready_timeout_s=30) as url:
        assert url == "http://127.0.0.1:4321/v1"
        child = int(log.read_text().split()[1])
        assert alive(child)
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_a_stack_that_dies_before_ready_is_reported(tmp_path):
    with pytest.raises(StackFailed, match="exited with code 3"):
        with running([sys.executable, "-c", "import sys; print('no luck'); sys.exit(3)"], tmp_path / "up.log", 30):
            pass


def test_a_stack_that_never_gets_ready_times_out(tmp_path):
    with pytest.raises(StackFailed, match="not ready after"):
        with running([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "up.log", 1):
            pass
