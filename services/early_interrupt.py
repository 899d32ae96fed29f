"""Ctrl-C before a command has installed its own handling.

While `pdserve` is still importing, Python turns SIGINT into a KeyboardInterrupt wherever
the main thread happens to be. `pdserve up`, interrupted 0.8 s after launch, once went on
to start the whole stack as if never interrupted: no KeyboardInterrupt, no "stopping" line
(where it was lost was not pinned down; an import with a broad `except` would do it). Until the command takes over, an interrupt is only recorded here; the
CLI checks it once its imports are done, and `pdserve up` counts it as the first Ctrl-C.
"""

from __future__ import annotations

import signal
import threading

_received = 0


def _record(*_) -> None:
    global _received
    _received += 1


def received() -> int:
    return _received


class Recording:
    """Records SIGINT for the duration of a `with`, then restores the previous handler (in the
    main thread only: elsewhere signals are not ours to handle)."""

    def __enter__(self) -> "Recording":
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, _record)
        return self

    def stop(self) -> None:
        """The command handles SIGINT itself from here (KeyboardInterrupt, or its own handler)."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def __exit__(self, *_) -> None:
        self.stop()
