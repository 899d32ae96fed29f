"""Stopping: SIGTERM drains a serving `pdserve up`; Ctrl-C at any moment of start-up leaves no process."""

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest

from shared.processes import alive, children_of, free_port
from loadtest.fault_stack import greedy_body, stream
from tests.stack import start_stack

pytestmark = pytest.mark.slow

PROMPT = [1000 + (i * 7) % 300 for i in range(24)]
DRAIN_TIMEOUT_S = 4.0
SHORT, LONG = 40, 3000  # the short streams finish within the drain timeout, the long ones cannot


async def test_sigterm_drains_streams_in_flight_then_stops_everything():
    running = start_stack("--model", "tiny-llama", "--threads", "1", "--drain-timeout", str(DRAIN_TIMEOUT_S))
    children = children_of(running.proc.pid)
    started = asyncio.Event()
    streaming: set[int] = set()

    async def client(index: int, max_tokens: int):
        async def first_token(result):
            streaming.add(index)
            if len(streaming) == 8:
                started.set()

        return await stream(running.base_url, greedy_body(PROMPT, max_tokens), on_tokens=first_token)

    lengths = [SHORT, LONG] * 4
    clients = [asyncio.create_task(client(i, n)) for i, n in enumerate(lengths)]
    await asyncio.wait_for(started.wait(), 60)
    running.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    await asyncio.sleep(0.5)
    refused = await stream(running.base_url, greedy_body(PROMPT, 4, stream=False))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{running.root_url}/health") as health:
            health_status = health.status
    results = await asyncio.gather(*clients)
    ended = time.monotonic() - signalled
    exit_code = running.proc.wait(timeout=DRAIN_TIMEOUT_S + 30)
    stopped = time.monotonic() - signalled

    assert refused.status == 503 and refused.retry_after == "1"
    assert "shutting down" in refused.errors[0]["message"]
    assert health_status == 503
    for max_tokens, result in zip(lengths, results):
        assert result.status == 200 and result.done, "a stream was cut without [DONE]"
        if max_tokens == SHORT:
            assert (len(result.token_ids), result.finish_reason, result.errors) == (SHORT, "length", [])
        else:  # ended by the drain timeout: an OpenAI-style error event, then [DONE]
            assert len(result.token_ids) < LONG and result.finish_reason is None
            assert [e["code"] for e in result.errors] == [503] and "drain timeout" in result.errors[0]["message"]
    assert ended < DRAIN_TIMEOUT_S + 5
    assert exit_code == 0
    assert not [pid for pid in children if alive(pid)], "pdserve up left processes behind"
    print(f"SIGTERM with 8 streams: streams ended {ended:.2f}s after it, whole stack stopped after {stopped:.2f}s")


def processes_marked(mark: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"PDSERVE_FAULT_MARK={mark}".encode() in f.read().split(b"\0") and alive(int(entry)):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def command_lines(pids: list[int]) -> list[str]:
    lines = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                lines.append(f.read().replace("\0", " "))
        except OSError:
            pass
    return lines


def first_process_with(mark: str, word: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(word in line for line in command_lines(processes_marked(mark))):
        assert time.monotonic() < deadline, f"no {word!r} process appeared"
        time.sleep(0.05)


# Every child starts at once, so "workers loading" also finds the scheduler and gateway starting.
# 0.5 s and 0.8 s after launch `pdserve` is still importing; at 0.8 s an interrupt was once
# swallowed by a third-party import and the stack started anyway (services/early_interrupt.py).
@pytest.mark.parametrize("moment", ["at-once", "importing", "workers-loading"])
def test_ctrl_c_during_start_up_leaves_no_process(moment):
    mark = uuid.uuid4().hex
    env = {**os.environ, "PDSERVE_FAULT_MARK": mark, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "services.cli", "up", "--model", "tiny-llama", "--threads", "1", "--port", str(free_port())]
    launcher = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if moment == "at-once":
            time.sleep(0.5)
        elif moment == "importing":
            time.sleep(0.8)
        else:
            first_process_with(mark, "--role decode")
        launcher.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        _, stderr = launcher.communicate(timeout=30)
        deadline = interrupted + 15
        while processes_marked(mark) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = processes_marked(mark)
        assert not left, f"left running after Ctrl-C: {command_lines(left)}"
        print(f"Ctrl-C {moment}: everything gone {time.monotonic() - interrupted:.2f}s after it")
        assert "Traceback" not in stderr, stderr
    finally:
        for pid in processes_marked(mark):
            os.kill(pid, signal.SIGKILL)
