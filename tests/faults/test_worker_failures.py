"""Workers and NATS failing under a real `pdserve up --prefill 2 --decode 3` (tiny-llama, one thread each).

One stack serves the module, and the tests run in file order: each hurts it (SIGKILL,
SIGSTOP, a client that goes away, nats-server killed), checks what the client saw,
bounded in time, and that every worker is back to baseline afterwards (`admin status`:
no KV blocks used, nothing running or waiting). Killed workers restart while the next
tests run; a later test checks they were back within a minute. One test stops a decoder
for good (SIGTERM) and the last two drain the decoders and stop the whole stack.
"""

import asyncio
import os
import signal
import time

import pytest

from services.scheduler.registry import WORKER_TTL_S
from shared.processes import alive, children_of
from loadtest.fault_stack import FaultStack, greedy_body, stream
from tests.stack import start_stack, stop_stack_group

pytestmark = pytest.mark.slow

PREFILLS, DECODES = ["prefill-0", "prefill-1"], ["decode-0", "decode-1", "decode-2"]
PROMPT = [1000 + (i * 7) % 300 for i in range(24)]
# Prefills in many steps of --max-num-batched-tokens, long enough to be caught in the act.
LONG_PROMPT = [1000 + (i * 13) % 500 for i in range(3000)]
DETECTION_S = WORKER_TTL_S + 1.0  # a dead worker is known within this
RECOVERY_BOUND_S = DETECTION_S + 12.0  # plus re-placement and a re-prefill on a loaded 2-core box
DRAIN_TIMEOUT_S = 2.0
KILLED: dict[str, tuple[int, float]] = {}  # worker id -> (pid killed, when): checked by a later test
REFERENCE: dict[str, list[int]] = {}  # the undisturbed greedy tokens of PROMPT


@pytest.fixture(scope="module")
def running():
    stack = start_stack(
        "--model", "tiny-llama", "--threads", "1", "--prefill", "2", "--decode", "3",
        "--max-num-batched-tokens", "32", "--drain-timeout", str(DRAIN_TIMEOUT_S),
    )  # fmt: skip
    yield stack
    if stack.proc.poll() is None:  # the last test stops it itself
        assert stop_stack_group(stack.proc), "pdserve up left processes behind"


@pytest.fixture
async def stack(running):
    faults = FaultStack(running, PREFILLS + DECODES)
    yield faults
    await faults.close()


async def test_decode_worker_killed_mid_stream_continues_with_the_same_text(stack):
    body = greedy_body(PROMPT, 160) | {"stream_options": {"include_usage": True}}
    reference = await stream(stack.base_url, body)
    assert reference.status == 200 and len(reference.token_ids) == 160
    REFERENCE["tokens"] = reference.token_ids
    kill: dict = {}
    arrivals: list[float] = []

    async def kill_the_decoder(result):
        arrivals.append(time.monotonic())
        if len(result.token_ids) >= 40 and not kill:
            worker = await stack.holder(DECODES)
            kill.update(worker=worker, pid=stack.signal(worker, signal.SIGKILL), at=time.monotonic())

    migrated = await stream(stack.base_url, body, on_tokens=kill_the_decoder)

    assert migrated.status == 200 and migrated.done and not migrated.errors
    assert migrated.token_ids == reference.token_ids  # nothing lost, nothing repeated, same greedy text
    assert migrated.finish_reason == "length"
    assert migrated.usage["pdserve"]["migrations"] == 1
    assert migrated.usage["pdserve"]["decode_worker"] != kill["worker"]
    stall = max(later - earlier for earlier, later in zip(arrivals, arrivals[1:]))  # the migration's pause
    assert stall < RECOVERY_BOUND_S
    print(f"decode worker killed mid-stream: longest pause in the stream {stall:.2f}s")
    served = await stream(stack.base_url, greedy_body(PROMPT, 8, stream=False))  # serving while it is gone
    assert served.status == 200
    KILLED[kill["worker"]] = (kill["pid"], kill["at"])
    await stack.wait_baseline(live_only=True)


async def test_prefill_worker_killed_during_prefill_is_retried_on_another(stack):
    body = greedy_body(LONG_PROMPT, 12)
    reference = await stream(stack.base_url, body)
    assert reference.status == 200
    first_token: list[float] = []

    async def note_first_token(result):
        first_token.append(time.monotonic())

    client = asyncio.create_task(stream(stack.base_url, body, on_tokens=note_first_token))
    worker = await stack.holder(PREFILLS, key="waiting")  # accepted, first token not out yet
    pid, killed_at = stack.signal(worker, signal.SIGKILL), time.monotonic()
    result = await client
    recovered = time.monotonic() - killed_at

    assert first_token[0] > killed_at  # it was killed during the prefill
    assert result.status == 200 and result.done and not result.errors
    assert result.token_ids == reference.token_ids
    assert recovered < RECOVERY_BOUND_S
    print(f"prefill worker killed during prefill: request done {recovered:.2f}s after the kill")
    KILLED[worker] = (pid, killed_at)
    await stack.wait_baseline(live_only=True)


@pytest.mark.parametrize("phase", ["prefill", "first-token", "decode"])
async def test_a_client_that_goes_away_frees_everything(stack, phase):
    prompt, max_tokens = (LONG_PROMPT, 12) if phase == "prefill" else (PROMPT, 400)
    seen = asyncio.Event()

    async def watch(result):
        if (phase == "first-token" and result.token_ids) or (phase == "decode" and len(result.token_ids) >= 30):
            seen.set()

    client = asyncio.create_task(stream(stack.base_url, greedy_body(prompt, max_tokens), on_tokens=watch))
    if phase == "prefill":
        await stack.holder(PREFILLS, key="waiting")
    else:
        await asyncio.wait_for(seen.wait(), 30)
    client.cancel()
    gone_at = time.monotonic()
    await asyncio.gather(client, return_exceptions=True)
    await stack.wait_baseline(timeout=15, live_only=True)
    print(f"client gone during {phase}: every worker at baseline after {time.monotonic() - gone_at:.2f}s")


async def test_killed_workers_are_back_within_a_minute(stack):
    assert len(KILLED) == 2, "run with the kill tests before it"
    for worker, (pid, killed_at) in KILLED.items():
        await stack.wait_back(worker, pid, timeout=max(1.0, killed_at + 60 - time.monotonic()))
        print(f"{worker} back (restarted by pdserve up) at most {time.monotonic() - killed_at:.1f}s after it was killed")
    await stack.wait_baseline()


async def test_nats_server_killed_and_restarted(stack):
    # Seeded sampling: a stream moved on reconnect must keep drawing the same tokens.
    body = greedy_body(PROMPT, 200) | {"temperature": 0.8, "seed": 7}
    reference = await stream(stack.base_url, body)
    outage: dict = {}

    async def kill_nats(result):
        if len(result.token_ids) >= 30 and not outage:
            outage.update(pid=stack.nats_server_pid(), at=time.monotonic())
            os.kill(outage["pid"], signal.SIGKILL)

    during = await stream(stack.base_url, body, on_tokens=kill_nats)
    # A stream caught in the outage goes on elsewhere from what it had (or ends with an error event), never hangs:
    # at worst a hand-off caught in it is bounded by the decoder's KV wait (60 s until leases land).
    assert during.status == 200 and during.done
    assert time.monotonic() - outage["at"] < 75
    if during.errors:
        assert during.token_ids == reference.token_ids[: len(during.token_ids)]
    else:
        assert during.token_ids == reference.token_ids
    print(f"nats-server killed mid-stream: stream ended after {time.monotonic() - outage['at']:.2f}s, errors={during.errors}")
    deadline = time.monotonic() + 30
    while True:  # the launcher restarts nats-server on the same port; services reconnect
        after = await stream(stack.base_url, greedy_body(PROMPT, 8, stream=False))
        if after.status == 200:
            break
        assert after.status == 503 and after.retry_after, after.errors
        assert time.monotonic() < deadline, "not serving 30s after nats-server was killed"
        await asyncio.sleep(0.5)
    print(f"serving again {time.monotonic() - outage['at']:.2f}s after nats-server was killed")
    await stack.wait_baseline(timeout=30)


async def test_a_worker_told_to_stop_hands_over_what_it_cannot_finish(stack):
    # A decode worker gets SIGTERM mid-stream: it stops taking work, and at the drain timeout
    # ends the stream as unavailable, which the gateway migrates. It exits 0 and stays down.
    signalled: dict = {}

    async def exited(worker: str, pid: int) -> float:
        while stack.pid(worker) == pid:
            await asyncio.sleep(0.1)
        return time.monotonic() - signalled["at"]

    async def stop_the_decoder(result):
        if len(result.token_ids) >= 40 and not signalled:
            worker = await stack.holder(DECODES)
            signalled.update(worker=worker, pid=stack.signal(worker, signal.SIGTERM), at=time.monotonic())
            signalled["exit"] = asyncio.create_task(exited(worker, signalled["pid"]))

    # Far beyond the drain timeout, even at the ~300 tokens/s a calm 2-core box decodes tiny-llama.
    body = greedy_body(PROMPT, 1500) | {"stream_options": {"include_usage": True}}
    result = await stream(stack.base_url, body, on_tokens=stop_the_decoder)

    assert result.status == 200 and result.done and not result.errors
    assert len(result.token_ids) == 1500 and result.finish_reason == "length"
    assert result.token_ids[:160] == REFERENCE["tokens"]
    assert result.usage["pdserve"]["migrations"] == 1
    assert result.usage["pdserve"]["decode_worker"] != signalled["worker"]
    # Its drain, then its own stop steps, each bounded (services/worker/main.py: 15 s, NATS close 2 s).
    stopped = await asyncio.wait_for(signalled["exit"], DRAIN_TIMEOUT_S + 20)
    print(f"{signalled['worker']} exited {stopped:.1f}s after SIGTERM (drain timeout {DRAIN_TIMEOUT_S:g}s); its stream moved on")
    await asyncio.sleep(2)
    assert stack.pid(signalled["worker"]) is None  # exited 0 after a drain: the launcher does not restart it


async def test_an_unreachable_decoder_during_the_hand_off_is_never_a_500(stack):
    reference = await stream(stack.base_url, greedy_body(PROMPT, 24))
    await asyncio.sleep(1.5)  # a heartbeat clears the scheduler's count of that placement
    # Decoders idle: placement's tie-break picks the first id; frozen, it neither answers nor beats.
    frozen = min(d for d in DECODES if stack.pid(d) is not None)
    pid = stack.signal(frozen, signal.SIGSTOP)
    try:
        result = await stream(stack.base_url, greedy_body(PROMPT, 24) | {"stream_options": {"include_usage": True}})
    finally:
        stack.signal(frozen, signal.SIGCONT)
    assert result.status == 200 and result.done and not result.errors, result.errors
    assert result.token_ids == reference.token_ids
    assert result.usage["pdserve"]["migrations"] == 1  # it was placed on the frozen decoder first
    assert result.usage["pdserve"]["decode_worker"] != frozen
    assert result.seconds < RECOVERY_BOUND_S
    print(f"decoder unreachable during the hand-off: migrated, done in {result.seconds:.2f}s")
    assert stack.pid(frozen) == pid  # only frozen, not restarted


async def test_the_decoder_that_was_unreachable_releases_the_hand_off_it_missed(stack):
    await stack.wait_baseline(timeout=10, live_only=True)  # one decoder was stopped for good before


async def test_a_refusing_decoder_during_the_hand_off_is_never_a_500(stack):
    # Decoders busy with long streams, so once drained they stay up for a while and refuse new work.
    decoders = [d for d in DECODES if stack.pid(d) is not None]
    busy = [asyncio.create_task(stream(stack.base_url, greedy_body(PROMPT, 600))) for _ in decoders]
    await asyncio.sleep(1.0)
    client = asyncio.create_task(stream(stack.base_url, greedy_body(LONG_PROMPT, 12)))
    await stack.holder(PREFILLS, key="waiting")  # prefilling: its decoder is chosen, the hand-off not begun
    for decoder in decoders:
        await stack.drain(decoder)
    result = await client
    for task in busy:
        task.cancel()
    await asyncio.gather(*busy, return_exceptions=True)
    assert result.status == 200 and result.done
    assert [error["code"] for error in result.errors] == [503], result.errors  # no decoder takes it: 503, not 500


async def test_the_stack_stops_within_its_grace_while_nats_is_gone(stack):
    # The case: services that spin reconnecting to a NATS that is gone must still exit.
    children = children_of(stack.running.proc.pid)
    os.kill(stack.nats_server_pid(), signal.SIGKILL)
    stack.running.proc.send_signal(signal.SIGTERM)  # before the launcher would restart nats-server
    asked = time.monotonic()
    assert stack.running.proc.wait(timeout=60) == 0
    while any(alive(pid) for pid in children) and time.monotonic() - asked < 60:
        await asyncio.sleep(0.1)
    stopped = time.monotonic() - asked
    assert not [pid for pid in children if alive(pid)]
    # Each stage's own bounded steps, far below the launcher's kill deadlines (drain timeout + 10 s per stage).
    assert stopped < 20, f"stopping took {stopped:.1f}s"
    print(f"stack stopped {stopped:.2f}s after SIGTERM with nats-server gone")
