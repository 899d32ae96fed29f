"""Reusable host buffers for outgoing pair buffers.

A fresh buffer of tens of MB is a fresh `mmap`: every page faults (and is zeroed) on the
first write, which costs as much as the gather that fills it. A pool keeps buffers that
were already written, so a session of a shape seen before gathers into warm memory.

`take(nbytes)` hands out a uint8 tensor of exactly `nbytes` (a view of a buffer at least
that large, at most twice); `give_back` returns it once the bytes left (never while a send
may still read them). Idle buffers beyond `max_idle_bytes` are dropped, oldest first.
"""

from __future__ import annotations

import threading

import torch

from shared.transport.host_memory import host_buffer

_ALIGN = 1 << 20  # capacities round up to whole MiB, so near sizes share buffers


class StagingPool:
    def __init__(self, max_idle_bytes: int = 512 << 20):
        self.max_idle_bytes = max_idle_bytes
        self._idle: list[torch.Tensor] = []  # whole buffers, oldest first
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> the whole buffer behind a lent view
        self._lock = threading.Lock()  # gathers take buffers from worker threads

    @property
    def idle_bytes(self) -> int:
        return sum(buffer.numel() for buffer in self._idle)

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [b for b in self._idle if nbytes <= b.numel() <= 2 * max(nbytes, _ALIGN)]
            whole = min(fits, key=lambda b: b.numel()) if fits else None
            if whole is not None:  # by identity: list.remove would compare tensors elementwise
                self._idle = [b for b in self._idle if b is not whole]
        if whole is None:
            whole = host_buffer(-(-max(nbytes, 1) // _ALIGN) * _ALIGN)
        with self._lock:
            self._lent[whole.data_ptr()] = whole
        return whole[:nbytes]

    def forget(self, buffer: torch.Tensor) -> None:
        """Drops a lent buffer that must not be reused (a failed send may still read it)."""
        with self._lock:
            self._lent.pop(buffer.data_ptr(), None)

    def give_back(self, buffer: torch.Tensor) -> None:
        with self._lock:
            whole = self._lent.pop(buffer.data_ptr(), None)
            if whole is None:
                return  # not ours, or given back twice
            self._idle.append(whole)
            while self.idle_bytes > self.max_idle_bytes:
                self._idle.pop(0)
