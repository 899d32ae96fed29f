"""The leader-to-ranks channel: each piece of work broadcast over the process group, in order.

A header (payload length) then the msgpack payload: two gloo broadcasts per message.
Chosen over a shared-memory queue because it works the same when a group spans hosts
(torchrun), and because it is cheap next to the step's own collectives: measured with
`pdserve bench ranks` (plan broadcast share of the step, docs/benchmarks.md). Only the leader's engine thread
broadcasts, so messages are totally ordered with the steps they refer to.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from shared.engine.collectives import Collectives
from shared.engine.step_work import Work, decode, encode


class LeaderChannel:
    def __init__(self, comm: Collectives):
        self.comm = comm  # where the broadcast time is counted

    def broadcast(self, work: Work) -> None:
        started = time.perf_counter()
        payload = encode(work)
        dist.broadcast(torch.tensor([len(payload)], dtype=torch.int64), src=0)
        dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0)
        self.comm.timed("plan_broadcast", started)


class FollowerChannel:
    def receive(self) -> Work:
        """The leader's next message (blocks; the leader sends a keepalive at least every few seconds)."""
        header = torch.empty(1, dtype=torch.int64)
        dist.broadcast(header, src=0)
        payload = torch.empty(int(header[0]), dtype=torch.uint8)
        dist.broadcast(payload, src=0)
        return decode(payload.numpy().tobytes())
