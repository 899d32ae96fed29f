"""A one-line progress bar on stderr: rewritten in place on a terminal, a line every 10% otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 24


class Progress:
    def __init__(self, total: int | None, duration_s: float | None, stream: TextIO | None = None, enabled: bool = True):
        self._total = total
        self._duration_s = duration_s
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._tty = self._stream.isatty()
        self._start = time.monotonic()
        self._last_decile = -1
        self._printed: tuple[int, int, int] | None = None  # counts on the last line printed
        self.done = self.failed = self.in_flight = 0

    def started(self) -> None:
        self.in_flight += 1
        self._draw()

    def finished(self, success: bool) -> None:
        self.in_flight -= 1
        self.done += 1
        self.failed += not success
        self._draw()

    def _fraction(self, elapsed: float) -> float:
        parts = []
        if self._total:
            parts.append(self.done / self._total)
        if self._duration_s:
            parts.append(min(1.0, elapsed / self._duration_s))
        return max(parts, default=0.0)

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        fraction = self._fraction(elapsed)
        bar = "#" * round(fraction * _WIDTH)
        of = f"/{self._total}" if self._total else ""
        return (
            f"[{bar:<{_WIDTH}}] {self.done}{of} done, {self.failed} failed, "
            f"{self.in_flight} in flight, {elapsed:.1f}s"
        )

    def _draw(self) -> None:
        if not self._enabled:
            return
        if self._tty:
            self._stream.write("\r" + self.line())
            self._stream.flush()
            return
        decile = int(self._fraction(time.monotonic() - self._start) * 10)
        if decile > self._last_decile:
            self._last_decile = decile
            self._print(self.line())

    def _counts(self) -> tuple[int, int, int]:
        return self.done, self.failed, self.in_flight

    def _print(self, line: str) -> None:
        self._printed = self._counts()
        self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if not self._enabled:
            return
        if self._tty:
            self._stream.write("\r" + self.line() + "\n")
            self._stream.flush()
        elif self._printed != self._counts():
            self._print(self.line())
