"""`--watch`: take a snapshot every interval and show it until Ctrl-C.

On a terminal the screen is redrawn (ANSI home + clear); otherwise each snapshot is
appended as plain lines (or one JSON object per line with --json), so a pipe or a log
file gets a readable history. SIGINT and SIGTERM end the loop cleanly (exit status 0),
even in the middle of a snapshot.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TextIO

CLEAR_SCREEN = "\x1b[H\x1b[2J"

Snapshot = Callable[[], Awaitable[dict]]
Present = Callable[[dict], None]
Lines = Callable[[dict], list[str]]


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def watch(snapshot: Snapshot, present: Present, interval: float, stop: asyncio.Event) -> None:
    """Presents a snapshot every `interval` seconds until `stop` is set."""
    while not stop.is_set():
        started = time.monotonic()
        taking = asyncio.ensure_future(snapshot())
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({taking, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if taking not in done:
            taking.cancel()
            await asyncio.gather(taking, return_exceptions=True)
            return
        stopping.cancel()
        present(taking.result())  # a snapshot that failed raises here and ends the watch
        remaining = interval - (time.monotonic() - started)
        if remaining > 0:
            try:
                await asyncio.wait_for(stop.wait(), remaining)
            except TimeoutError:
                pass


def redraw(title: str, lines_of: Lines, out: TextIO = sys.stdout) -> Present:
    def present(report: dict) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(report["time"]))
        out.write(CLEAR_SCREEN + f"{title}   {stamp}   (Ctrl-C to quit)\n\n" + "\n".join(lines_of(report)) + "\n")
        out.flush()

    return present


def append_lines(lines_of: Lines, out: TextIO = sys.stdout) -> Present:
    def present(report: dict) -> None:
        out.write("\n".join(lines_of(report)) + "\n")
        out.flush()

    return present


def append_json(versioned: Callable[[dict], dict], out: TextIO = sys.stdout) -> Present:
    def present(report: dict) -> None:
        out.write(json.dumps(versioned(report)) + "\n")
        out.flush()

    return present


def presenter(json_output: bool, title: str, table: Lines, plain: Lines, versioned: Callable[[dict], dict]) -> Present:
    """JSON lines, a redrawn table on a terminal, or plain appended lines."""
    if json_output:
        return append_json(versioned)
    if sys.stdout.isatty():
        return redraw(title, table)
    return append_lines(plain)
