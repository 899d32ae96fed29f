"""The client, runner and result JSON against a fake streaming server: counts, failures, bounds."""

import json
import math
import time

import pytest

from loadtest import cli, workloads
from loadtest.arrivals import ClosedLoop, OpenLoop
from loadtest.bench import Plan, Reporting, run_bench
from loadtest.client import Endpoint, Target, normalize_base_url
from loadtest.prompts import PromptSource
from loadtest.runner import Limits, WarmupFailed

PER_REQUEST_FIELDS = ("input_lens", "output_lens", "requested_output_lens", "start_times", "ttfts", "itls", "e2els", "errors")
SUMMARY_FIELDS = (
    "completed", "failed", "duration", "num_prompts", "total_input_tokens", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput",
    "request_throughput_per_worker", "output_throughput_per_worker",
    *(f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "std", "p50", "p90", "p99")),
)


def plan(n=6, load=None, mix=None, duration=None, seed=0) -> Plan:
    mix = mix or workloads.uniform_around(40, 8, 0.5)
    return Plan(mix, load or OpenLoop(50.0), Limits(n, duration), seed)


async def bench(url, char_tokenizer, the_plan, endpoint=Endpoint.COMPLETIONS, timeout=30.0, warmup=False, workers=1):
    target = Target(url, "fake", endpoint, timeout_s=timeout)
    reporting = Reporting(workers=workers, progress=False)
    return await run_bench(target, the_plan, PromptSource(char_tokenizer), reporting, warmup=warmup)


async def test_result_fields_present_and_consistent(fake_server, char_tokenizer):
    fake, url = fake_server()
    result = await bench(url, char_tokenizer, plan(n=8), workers=2)
    for field in (*PER_REQUEST_FIELDS, *SUMMARY_FIELDS):
        assert field in result, field
    assert all(len(result[f]) == 8 for f in PER_REQUEST_FIELDS)
    assert (result["completed"], result["failed"], result["num_prompts"]) == (8, 0, 8)
    assert result["errors"] == [""] * 8
    assert result["output_lens"] == result["requested_output_lens"]
    assert result["total_output_tokens"] == sum(result["output_lens"])
    assert result["total_input_tokens"] == sum(result["input_lens"])
    # One chunk per token: one gap fewer than tokens, and TTFT before end-to-end.
    assert [len(g) for g in result["itls"]] == [n - 1 for n in result["output_lens"]]
    assert all(0 < t < e for t, e in zip(result["ttfts"], result["e2els"]))
    assert result["mean_ttft_ms"] >= 10.0  # the fake waits 10 ms before the first token
    assert result["request_throughput"] == pytest.approx(8 / result["duration"])
    assert result["output_throughput_per_worker"] == pytest.approx(result["output_throughput"] / 2)
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    # What the server received: exact token-id prompts, the lengths, streaming with usage.
    assert sorted(len(b["prompt"]) for b in fake.bodies) == sorted(result["input_lens"])
    assert sorted(b["max_tokens"] for b in fake.bodies) == sorted(result["requested_output_lens"])
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} and b["ignore_eos"] for b in fake.bodies)


async def test_chat_endpoint_ignores_the_role_only_chunk(fake_server, char_tokenizer):
    fake, url = fake_server(first_token_delay=0.2)
    result = await bench(url, char_tokenizer, plan(n=3), endpoint=Endpoint.CHAT)
    assert result["completed"] == 3
    assert min(result["ttfts"]) >= 0.2  # the role chunk came at once; the first token 200 ms later
    assert all("messages" in b for b in fake.bodies)
    assert result["endpoint"] == "/chat/completions"


async def test_closed_loop_keeps_exactly_the_concurrency_in_flight(fake_server, char_tokenizer):
    fake, url = fake_server(token_delay=0.005)
    result = await bench(url, char_tokenizer, plan(n=12, load=ClosedLoop(3)))
    assert result["completed"] == 12
    assert fake.max_in_flight == 3
    assert result["max_concurrency"] == 3 and result["request_rate"] is None


@pytest.mark.parametrize("failure", ["status", "drop", "eof", "error-event"])
async def test_errors_and_dropped_streams_count_as_failed(fake_server, char_tokenizer, failure):
    _, url = fake_server(failure=failure, fail_every=3)
    result = await bench(url, char_tokenizer, plan(n=9, load=ClosedLoop(1)))
    assert (result["completed"], result["failed"]) == (6, 3)
    failed = [i for i, e in enumerate(result["errors"]) if e]
    assert failed == [2, 5, 8]  # closed loop, one at a time: the server's 3rd, 6th, 9th request
    assert all(result["output_lens"][i] == 0 for i in failed)
    assert result["total_output_tokens"] == sum(result["output_lens"])


async def test_error_messages_say_what_went_wrong(fake_server, char_tokenizer):
    expected = {"status": "HTTP 500", "eof": "before data: [DONE]", "error-event": "generation failed"}
    for failure, text in expected.items():
        _, url = fake_server(failure=failure, fail_every=1)
        result = await bench(url, char_tokenizer, plan(n=1))
        assert text in result["errors"][0], (failure, result["errors"][0])


async def test_a_hanging_stream_times_out_and_the_run_finishes(fake_server, char_tokenizer):
    _, url = fake_server(failure="hang", fail_every=2)
    started = time.monotonic()
    result = await bench(url, char_tokenizer, plan(n=4, load=OpenLoop(math.inf)), timeout=1.0)
    assert time.monotonic() - started < 10
    assert (result["completed"], result["failed"]) == (2, 2)
    assert all("timed out" in e for e in result["errors"] if e)


async def test_unreachable_server_fails_every_request_quickly(char_tokenizer):
    from shared.processes import free_port

    result = await bench(f"http://127.0.0.1:{free_port()}/v1", char_tokenizer, plan(n=3))
    assert (result["completed"], result["failed"]) == (0, 3)
    assert result["mean_ttft_ms"] is None


async def test_duration_bounds_an_open_ended_run(fake_server, char_tokenizer):
    fake, url = fake_server()
    started = time.monotonic()
    result = await bench(url, char_tokenizer, Plan(workloads.fixed(10, 4), OpenLoop(20.0), Limits(None, 1.0), 0))
    assert time.monotonic() - started < 5
    assert 8 <= result["num_prompts"] <= 40  # ~20 arrivals in one second
    assert max(result["start_times"]) <= 1.1


async def test_open_loop_follows_the_schedule_not_the_server(fake_server, char_tokenizer):
    fake, url = fake_server(first_token_delay=0.3)
    result = await bench(url, char_tokenizer, plan(n=10, load=OpenLoop(20.0)))
    # Requests take 300+ ms but keep arriving every ~50 ms: several are in flight at once.
    assert fake.max_in_flight >= 4
    assert max(result["start_times"]) < 1.5


async def test_warm_up_failure_aborts(fake_server, char_tokenizer):
    _, url = fake_server(failure="status", fail_every=1)
    with pytest.raises(WarmupFailed, match="HTTP 500"):
        await bench(url, char_tokenizer, plan(n=2), warmup=True)


def test_base_url_forms():
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"):
        assert normalize_base_url(url) == "http://h:1/v1"


def test_cli_serve_writes_json_and_plots(fake_server, char_tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("loadtest.prompts.load_tokenizer", lambda name: char_tokenizer)
    _, url = fake_server()
    argv = [
        "serve", "--url", url, "--model", "fake", "--workload", "random", "--input-len", "30", "--output-len", "6",
        "--num-requests", "10", "--request-rate", "40", "--burstiness", "0.5", "--workers", "2",
        "--goodput", "ttft:1000", "tpot:1000", "--result-file", str(tmp_path / "r.json"), "--plot-dir", str(tmp_path / "plots"),
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert "Serving Benchmark Result" in out.out and "P99 TTFT (ms)" in out.out
    assert "10/10 done" in out.err  # the progress line
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["completed"], result["num_prompts"], result["workers"]) == (10, 10, 2)
    assert result["request_rate"] == 40.0 and result["burstiness"] == 0.5
    assert result["goodput_slos"] == {"ttft": 1000.0, "tpot": 1000.0}
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    for name in ("ttft_cdf.png", "itl_over_time.png"):
        png = (tmp_path / "plots" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_cli_serve_reports_bad_arguments_and_unreachable_endpoints(char_tokenizer, monkeypatch, capsys):
    monkeypatch.setattr("loadtest.prompts.load_tokenizer", lambda name: char_tokenizer)
    assert cli.main(["serve", "--url", "http://127.0.0.1:9/v1", "--model", "m", "--workload", "trace"]) == 2
    assert "--trace PATH" in capsys.readouterr().err
    assert cli.main(["serve", "--url", "http://127.0.0.1:9/v1", "--model", "m", "--num-requests", "2"]) == 1
    assert "warm-up request" in capsys.readouterr().err


def test_cli_serve_replays_a_trace(fake_server, char_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("loadtest.prompts.load_tokenizer", lambda name: char_tokenizer)
    fake, url = fake_server()
    trace = tmp_path / "trace.jsonl"
    rows = [{"timestamp": t, "input_length": i, "output_length": o} for t, i, o in [(1000, 40, 4), (1400, 12, 9), (1800, 70, 3)]]
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    argv = ["serve", "--url", url, "--model", "fake", "--trace", str(trace), "--trace-speedup", "2",
            "--result-file", str(tmp_path / "r.json"), "--no-progress", "--no-warmup"]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["workload"] == "trace.jsonl" and result["completed"] == 3
    assert result["load"] == "trace send times, speedup 2x" and result["request_rate"] is None
    assert result["input_lens"] == [40, 12, 70] and result["output_lens"] == [4, 9, 3]
    assert [round(t, 1) for t in result["start_times"]] == [0.0, 0.2, 0.4]  # 400 ms apart, replayed 2x faster
