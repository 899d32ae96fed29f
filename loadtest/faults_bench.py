"""Fault recovery, measured: what a killed worker costs a request, and how fast the stack heals.

`python -m loadtest.faults_bench --rounds 3` starts `pdserve up --prefill 2 --decode 2`
(tiny-llama, one torch thread per worker) and, each round, side by side:
- a greedy stream undisturbed, and the same stream with its decode worker SIGKILLed after
  40 tokens (migrated): end-to-end seconds of both, the longest pause, identical text;
- a long-prompt request undisturbed, and the same with its prefill worker SIGKILLed during
  the prefill (retried elsewhere);
- seconds from each kill to the scheduler's worker-down event, and until the worker is
  back (restarted by `pdserve up`).
Then once: nats-server SIGKILLed, seconds until a request is served again. Prints each
round and the medians, with the migrated / undisturbed ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time
from dataclasses import dataclass, field

import nats

from loadtest.fault_stack import FaultStack, greedy_body, start_stack, stream
from shared import protocol
from shared.protocol import WorkerDown

PREFILLS, DECODES = ["prefill-0", "prefill-1"], ["decode-0", "decode-1"]
PROMPT = [1000 + (i * 7) % 300 for i in range(24)]
LONG_PROMPT = [1000 + (i * 13) % 500 for i in range(3000)]
STREAM_TOKENS = 200
MAX_ROUNDS = 4


@dataclass
class Samples:
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])


class WorkerDownClock:
    """Time of the first worker-down event per worker id, from a NATS subscription."""

    def __init__(self):
        self.seen: dict[str, float] = {}

    async def start(self, nats_url: str, options: dict) -> None:
        self.nc = await nats.connect(nats_url, max_reconnect_attempts=-1, **options)

        async def on_down(msg) -> None:
            down = protocol.decoder(WorkerDown).decode(msg.data)
            self.seen.setdefault(down.worker_id, time.monotonic())

        await self.nc.subscribe("pd.events.worker_down", cb=on_down)

    async def wait(self, worker_id: str, timeout: float = 15.0) -> float:
        deadline = time.monotonic() + timeout
        while worker_id not in self.seen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no worker-down event for {worker_id}")
            await asyncio.sleep(0.02)
        return self.seen.pop(worker_id)


async def decode_round(stack: FaultStack, clock: WorkerDownClock, samples: Samples) -> None:
    body = greedy_body(PROMPT, STREAM_TOKENS)
    reference = await stream(stack.base_url, body)
    samples.add("stream undisturbed e2e s", reference.seconds)
    kill: dict = {}
    arrivals: list[float] = []

    async def kill_decoder(result) -> None:
        arrivals.append(time.monotonic())
        if len(result.token_ids) >= 40 and not kill:
            worker = await stack.holder(DECODES)
            kill.update(worker=worker, pid=stack.signal(worker, signal.SIGKILL), at=time.monotonic())

    migrated = await stream(stack.base_url, body, on_tokens=kill_decoder)
    if migrated.token_ids != reference.token_ids or migrated.errors:
        raise AssertionError(f"migrated stream differs: errors={migrated.errors}")
    samples.add("stream migrated e2e s", migrated.seconds)
    samples.add("stream longest pause s", max(b - a for a, b in zip(arrivals, arrivals[1:])))
    samples.add("decode kill -> worker-down s", await clock.wait(kill["worker"]) - kill["at"])
    await stack.wait_back(kill["worker"], kill["pid"], timeout=120)
    samples.add("decode worker back s", time.monotonic() - kill["at"])


async def prefill_round(stack: FaultStack, clock: WorkerDownClock, samples: Samples) -> None:
    body = greedy_body(LONG_PROMPT, 12)
    reference = await stream(stack.base_url, body)
    samples.add("long prompt undisturbed e2e s", reference.seconds)
    client = asyncio.create_task(stream(stack.base_url, body))
    worker = await stack.holder(PREFILLS, key="waiting")
    pid, killed_at = stack.signal(worker, signal.SIGKILL), time.monotonic()
    retried = await client
    if retried.token_ids != reference.token_ids or retried.errors:
        raise AssertionError(f"retried request differs: errors={retried.errors}")
    samples.add("long prompt retried e2e s", retried.seconds)
    samples.add("prefill kill -> worker-down s", await clock.wait(worker) - killed_at)
    await stack.wait_back(worker, pid, timeout=120)
    samples.add("prefill worker back s", time.monotonic() - killed_at)


async def nats_round(stack: FaultStack, samples: Samples) -> None:
    os.kill(stack.nats_server_pid(), signal.SIGKILL)
    killed_at = time.monotonic()
    while (await stream(stack.base_url, greedy_body(PROMPT, 8, stream=False))).status != 200:
        await asyncio.sleep(0.2)
    samples.add("nats-server kill -> serving again s", time.monotonic() - killed_at)


async def run(rounds: int) -> Samples:
    running = start_stack("--model", "tiny-llama", "--threads", "1", "--prefill", "2", "--decode", "2", "--max-num-batched-tokens", "32")
    stack = FaultStack(running, PREFILLS + DECODES)
    clock = WorkerDownClock()
    samples = Samples()
    try:
        await clock.start(running.nats_url, stack.nats_options)
        await stream(stack.base_url, greedy_body(PROMPT, 8))  # warm-up
        for index in range(rounds):
            await decode_round(stack, clock, samples)
            await prefill_round(stack, clock, samples)
            print(f"round {index + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in samples.values.items()), flush=True)
        await nats_round(stack, samples)
    finally:
        await clock.nc.close()
        await stack.close()
        running.proc.send_signal(signal.SIGTERM)
        running.proc.wait(timeout=120)
    return samples


def report(samples: Samples) -> None:
    print(f"\nmedians over {len(samples.values['stream migrated e2e s'])} rounds (tiny-llama, {STREAM_TOKENS}-token greedy stream):")
    for name in samples.values:
        print(f"  {name:38s} {samples.median(name):7.2f}")
    stream_ratio = samples.median("stream migrated e2e s") / samples.median("stream undisturbed e2e s")
    long_ratio = samples.median("long prompt retried e2e s") / samples.median("long prompt undisturbed e2e s")
    extra = samples.median("stream migrated e2e s") - samples.median("stream undisturbed e2e s")
    print(f"  migrated stream / undisturbed: {stream_ratio:.2f}x (+{extra:.2f}s)")
    print(f"  retried long prompt / undisturbed: {long_ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.faults_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help=f"kill rounds, 1 to {MAX_ROUNDS} (each waits for the killed workers to come back)")
    args = parser.parse_args()
    if not 1 <= args.rounds <= MAX_ROUNDS:
        # The same worker is often the one killed: a 5th crash within 300 s and `pdserve up` gives up on it.
        parser.error(f"--rounds: 1 to {MAX_ROUNDS} (more kills of one worker within 300 s trip the launcher's give-up policy)")
    report(asyncio.run(run(args.rounds)))


if __name__ == "__main__":
    main()
