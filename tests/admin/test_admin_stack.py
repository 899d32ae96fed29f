"""`pdserve admin` against a real tiny stack: --json schemas, request tables, --watch, drain progress.

One `pdserve up` for the module: tiny-llama, one prefill and one decode worker, each with a
KV cache of 2048 tokens (128 pages) and one new token per engine step, so requests can be
held in place: a long decode fills the decoder (the next hand-offs wait for pages), and a
long prompt prefills for hundreds of steps while the next one queues behind it. The
drain test runs last: it leaves the stack without workers.
"""

import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
import time

import aiohttp
import jsonschema
import pytest

from services.admin.client import AdminSession
from services.admin.connection import connect_admin
from services.admin.requests import take_requests
from services.admin.schema import load_schema
from shared.subjects import Subjects
from tests.stack import start_stack, stop_stack_group

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"
WORKERS = ["prefill-0", "decode-0"]


@pytest.fixture(scope="module")
def stack():
    running = start_stack("--model", MODEL, "--kv-cache-tokens", "2048", "--max-num-batched-tokens", "1", "--threads", "1")
    yield running
    assert stop_stack_group(running.proc), "pdserve up left processes behind"


async def admin(stack, *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "admin", *argv, "--nats", stack.nats_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, stdout.decode(), stderr.decode()


@contextlib.asynccontextmanager
async def completion(stack, prompt_tokens: int, max_tokens: int):
    """A streamed completion in flight; leaving the block before its end cancels it."""
    body = {"model": MODEL, "prompt": [1000 + i % 500 for i in range(prompt_tokens)], "max_tokens": max_tokens, "ignore_eos": True}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{stack.base_url}/completions", json=body) as response:
            assert response.status == 200
            yield response


async def completion_tokens(response: aiohttp.ClientResponse) -> int:
    """Reads the stream to its end; the tokens its usage chunk counts."""
    chunks = [json.loads(line[6:]) for line in (await response.read()).splitlines() if line.startswith(b"data: {")]
    return chunks[-1]["usage"]["completion_tokens"]


@contextlib.asynccontextmanager
async def session_to(stack):
    nc = await connect_admin(stack.nats_url, timeout=5.0, options=stack.admin_nats_options())  # `pdserve up` NATS: admin's user
    try:
        yield AdminSession(nc, stack.nats_url, Subjects("pd"), 5.0)
    finally:
        await nc.close()


async def phases(session: AdminSession) -> list[tuple[str, str]]:
    """(worker, phase) of every request in the workers' tables, asked directly (no discovery wait)."""
    report = await take_requests(session, WORKERS)
    assert report["errors"] == []
    return [(r["worker_id"], r["phase"]) for r in report["requests"]]


async def until(session: AdminSession, wanted, what: str, timeout: float = 30.0) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    while not wanted(now := await phases(session)):
        assert time.monotonic() < deadline, f"never saw {what}; last: {now}"
        await asyncio.sleep(0.02)
    return now


async def decoding_on(stack) -> str:
    """The worker decoding the one request in flight."""
    async with session_to(stack) as session:
        now = await until(session, lambda p: ("decode-0", "decoding") in p, "a request decoding")
    return next(worker for worker, phase in now if phase == "decoding")


async def until_idle(stack) -> None:
    async with session_to(stack) as session:
        await until(session, lambda p: p == [], "empty request tables")


async def test_every_json_output_validates_against_its_schema(stack):
    commands = {
        "status": ["status"],
        "requests": ["requests"],
        "policy": ["policy"],
        "loglevel": ["loglevel", "info"],
        "cancel": ["cancel", "chatcmpl-not-running"],
    }
    results = await asyncio.gather(*(admin(stack, *argv, "--json") for argv in commands.values()))
    outputs = {}
    for name, (code, stdout, stderr) in zip(commands, results):
        assert code == 0, (name, stderr)
        outputs[name] = json.loads(stdout)
        jsonschema.validate(outputs[name], load_schema(name))
    status = outputs["status"]
    assert sorted(w["worker_id"] for w in status["workers"]) == WORKERS[::-1]
    assert all(w["in_flight"] == 0 and w["generated_tokens_total"] >= 0 for w in status["workers"])
    assert sorted(s["kind"] for s in status["services"]) == ["gateway", "scheduler", "worker", "worker"]
    assert (outputs["requests"]["requests"], outputs["requests"]["errors"]) == ([], [])  # every worker answered
    assert [s["policy"]["mode"] for s in outputs["policy"]["schedulers"]] == ["disagg"]
    assert len(outputs["loglevel"]["services"]) == 4 and outputs["cancel"]["held_by"] == []


HELD = {("decode-0", "decoding"), ("decode-0", "awaiting_kv"), ("prefill-0", "prefilling"), ("prefill-0", "queued")}


LISTING_ATTEMPTS = 3


@dataclasses.dataclass
class Listing:
    held: list[tuple[str, str]]  # what the test's own session saw at once
    json: tuple[int, str, str]  # `admin requests --json`: exit code, stdout, stderr
    text: tuple[int, str, str]  # `admin requests --worker decode-0`
    tokens: list[int]  # completion tokens of B, C and D
    emptied: list[tuple[str, str]]

    def caught_every_phase(self) -> bool:
        """Whether the CLI listed the state the session saw. A fresh `pdserve admin` process
        takes about a second to start and discover the workers; with A's 450 one-token steps
        (a 512-token cache) a quiet machine often ended A within that, and the listing showed
        the next state instead. The cache is 4x that now; the retry stays for a stall."""
        if self.json[0] != 0 or self.text[0] != 0:
            return True  # a failure to report, not a state that moved on
        listed = {(r["worker_id"], r["phase"]) for r in json.loads(self.json[1])["requests"]}
        return HELD <= listed and "awaiting_kv" in self.text[1] and "decoding" in self.text[1]


async def hold_each_phase_and_list(stack) -> Listing:
    async with session_to(stack) as session, contextlib.AsyncExitStack() as others:
        # A: would decode 1980 tokens, holding 127 of the decoder's 128 pages; cancelled once listed.
        async with completion(stack, 40, 1980):
            await until(session, lambda p: ("decode-0", "decoding") in p, "A decoding")
            # B: its KV reaches the decoder, which has no pages for it while A runs.
            handed_off = await others.enter_async_context(completion(stack, 40, 50))
            await until(session, lambda p: ("decode-0", "awaiting_kv") in p, "B awaiting its KV pages")
            # C: 1900 prompt tokens (120 pages), one per step; D (14 pages): no room on the
            # prefill worker until C is out.
            long_prompt = await others.enter_async_context(completion(stack, 1900, 16))
            await until(session, lambda p: ("prefill-0", "prefilling") in p, "C prefilling")
            queued = await others.enter_async_context(completion(stack, 200, 16))
            held = await until(session, lambda p: HELD <= set(p), "a request in each phase at once")
            listed, text = await asyncio.gather(admin(stack, "requests", "--json"), admin(stack, "requests", "--worker", "decode-0"))
        tokens = [await completion_tokens(r) for r in (handed_off, long_prompt, queued)]  # once A's pages are back
        emptied = await until(session, lambda p: p == [], "the tables empty", timeout=10)
    return Listing(held, listed, text, tokens, emptied)


async def test_requests_lists_each_phase_and_forgets_what_ended(stack):
    """Each phase a request can be held in (handing_off lasts milliseconds for tiny-llama's KV)."""
    for _ in range(LISTING_ATTEMPTS):
        listing = await hold_each_phase_and_list(stack)
        if listing.caught_every_phase():
            break
        print(f"the CLI listed a later state than the one held ({listing.held}):\n{listing.json[1]}\n{listing.text[1]}\nagain")
    assert sorted(listing.held) == sorted(HELD)
    code, stdout, stderr = listing.json
    assert code == 0, stderr
    listed = json.loads(stdout)
    jsonschema.validate(listed, load_schema("requests"))
    rows = {(r["worker_id"], r["phase"]): r for r in listed["requests"]}
    decoding, waiting = rows[("decode-0", "decoding")], rows[("decode-0", "awaiting_kv")]  # held while A runs
    assert (decoding["prompt_tokens"], decoding["path"], decoding["kv_blocks"]) == (40, "disagg", 127)
    assert decoding["generated_tokens"] > 1 and decoding["age_s"] > waiting["age_s"] > 0
    assert waiting["kv_blocks"] == 0  # its pages are not reserved yet: that is what it waits for
    text = listing.text
    assert text[0] == 0 and "decoding" in text[1] and "awaiting_kv" in text[1] and "prefill-0" not in text[1]
    assert listing.tokens == [50, 16, 16]  # each ran to its end
    assert listing.emptied == []  # finished and cancelled alike left the tables


async def watch(stack, *flags: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "admin", "status", "--watch", "--interval", "0.5", *flags, "--nats", stack.nats_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_watch_without_a_terminal_prints_snapshots_until_sigint(stack):
    # The watches start before the request: a tiny model can finish 300 tokens in the second
    # or two a fresh `pdserve admin` process takes to start, and then no snapshot sees it work.
    await until_idle(stack)
    plain, as_json = await watch(stack), await watch(stack, "--json")
    snapshots = [json.loads(await asyncio.wait_for(as_json.stdout.readline(), 20))]
    async with completion(stack, 40, 300):  # cancelled when the watch is done
        busy = await decoding_on(stack)
        for _ in range(20):  # snapshots every 0.5 s: the ones taken while it decodes show its rate
            snapshots.append(json.loads(await asyncio.wait_for(as_json.stdout.readline(), 20)))
            if len(snapshots) >= 3 and busy_rate(snapshots[-1], busy) > 0:
                break
        lines = [(await asyncio.wait_for(plain.stdout.readline(), 20)).decode() for _ in range(4)]
        for proc in (plain, as_json):
            proc.send_signal(signal.SIGINT)
        codes = [await asyncio.wait_for(proc.wait(), 10) for proc in (plain, as_json)]
    stderr = [(await proc.stderr.read()).decode() for proc in (plain, as_json)]
    assert codes == [0, 0], stderr  # Ctrl-C is the way out, not an error
    assert stderr == ["", ""]
    for report in snapshots:
        jsonschema.validate(report, load_schema("status"))
    assert all(a["time"] < b["time"] for a, b in zip(snapshots, snapshots[1:]))
    assert all("rates" not in w for w in snapshots[0]["workers"])  # rates need a previous snapshot
    assert all("rates" in w for s in snapshots[1:] for w in s["workers"])
    assert busy_rate(snapshots[-1], busy) > 0  # tokens were generated since the snapshot before
    assert "\x1b[" not in "".join(lines)  # no screen control codes into a pipe
    assert sum(f" {busy} role=decode" in line for line in lines) == 2  # one line per worker per snapshot
    assert "gen_tok/s=-" in lines[0] and "gen_tok/s=-" not in lines[2]


def busy_rate(snapshot: dict, worker: str) -> float:
    [entry] = [w for w in snapshot["workers"] if w["worker_id"] == worker]
    return entry["rates"]["generated_tokens_per_s"] if "rates" in entry else 0.0


async def test_drain_reports_progress_then_what_it_ended(stack):
    await until_idle(stack)  # the previous test's cancelled request has left
    async with completion(stack, 40, 300) as response:
        busy = await decoding_on(stack)
        idle = next(w for w in WORKERS if w != busy)
        (code, stdout, stderr), (idle_code, idle_stdout, _) = await asyncio.gather(
            admin(stack, "drain", busy, "--wait", "60"), admin(stack, "drain", idle, "--json")
        )
        streamed = await completion_tokens(response)
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert lines[0].startswith(f"{busy} draining: 1 request left after"), lines  # progress from the start
    assert lines[-1].startswith(f"{busy} drained: finished 1 request in "), lines
    assert streamed == 300  # drained, not cut short
    assert idle_code == 0
    report = json.loads(idle_stdout)
    jsonschema.validate(report, load_schema("drain"))
    [entry] = report["workers"]
    assert (entry["worker_id"], entry["outcome"], entry["requests_at_start"], entry["requests_left"]) == (idle, "drained", 0, 0)
