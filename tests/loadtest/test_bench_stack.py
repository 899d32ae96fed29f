"""`pdserve bench` against real `pdserve up --model tiny-llama` stacks."""

import json

import pytest

from loadtest import cli
from tests.stack import start_stack, stop_stack_group

pytestmark = pytest.mark.slow

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def stack():
    running = start_stack("--model", MODEL, "--threads", "1")
    yield running
    assert stop_stack_group(running.proc), "pdserve up left processes behind"


def test_serve_against_tiny_llama_gives_a_consistent_result(stack, tmp_path, capsys):
    result_file = tmp_path / "result.json"
    argv = [
        "serve", "--url", stack.base_url, "--model", MODEL, "--workload", "random", "--input-len", "96",
        "--output-len", "12", "--range-ratio", "0.5", "--num-requests", "10", "--request-rate", "4",
        "--seed", "3", "--result-file", str(result_file), "--plot-dir", str(tmp_path), "--no-progress",
    ]
    assert cli.main(argv) == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    result = json.loads(result_file.read_text())
    assert (result["completed"], result["failed"], result["num_prompts"]) == (10, 0, 10)
    assert result["errors"] == [""] * 10
    # ignore_eos honoured, and the server saw exactly the prompt lengths we built.
    assert result["output_lens"] == result["requested_output_lens"]
    assert all(48 <= n <= 144 for n in result["input_lens"]) and len(set(result["input_lens"])) > 1
    assert result["total_input_tokens"] == sum(result["input_lens"])
    assert result["total_output_tokens"] == sum(result["output_lens"])
    assert all(1 <= len(gaps) <= n - 1 for gaps, n in zip(result["itls"], result["output_lens"]))
    assert all(0 < t < e for t, e in zip(result["ttfts"], result["e2els"]))
    assert result["request_throughput"] == pytest.approx(10 / result["duration"])
    assert result["p99_ttft_ms"] >= result["median_ttft_ms"] > 0
    assert (tmp_path / "ttft_cdf.png").stat().st_size > 5000


def test_same_seed_same_lengths_against_the_real_server(stack, tmp_path):
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    for path in files:
        argv = [
            "serve", "--url", stack.root_url, "--model", MODEL, "--workload", "chat-mix", "--num-requests", "4",
            "--concurrency", "2", "--seed", "9", "--result-file", str(path), "--no-progress", "--no-warmup",
        ]
        assert cli.main(argv) == 0
    a, b = (json.loads(p.read_text()) for p in files)
    assert a["input_lens"] == b["input_lens"] and a["output_lens"] == b["output_lens"]
    assert a["completed"] == 4 and a["max_concurrency"] == 2


def test_compare_runs_both_modes_and_prints_the_table(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    argv = [
        "compare", "--modes", "colocated,disagg", "--model", MODEL, "--workers", "2", "--threads", "1",
        "--workload", "fixed", "--input-len", "256", "--output-len", "16", "--num-requests", "6",
        "--request-rate", "2", "--seed", "1", "--out-dir", str(out_dir), "--no-progress",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for text in ("P50 TTFT (ms)", "P99 TTFT (ms)", "P99 inter-token latency (ms)", "Output tok/s per worker", "disagg/colocated"):
        assert text in out, text
    document = json.loads((out_dir / "compare.json").read_text())
    colocated, disagg = document["results"]["colocated"], document["results"]["disagg"]
    assert document["layouts"] == {"colocated": "2 x both", "disagg": "1 prefill + 1 decode"}
    for result in (colocated, disagg):
        assert (result["completed"], result["failed"]) == (6, 0)
        assert result["workers"] == 2
        assert result["input_lens"] == [256] * 6 and result["output_lens"] == [16] * 6
    assert colocated["start_times"] != [] and len(colocated["start_times"]) == len(disagg["start_times"])
    ratio = document["ratios"]["disagg"]["p50_ttft_ms"]
    assert ratio == pytest.approx(disagg["p50_ttft_ms"] / colocated["p50_ttft_ms"])
    assert (out_dir / "compare.png").stat().st_size > 5000
    assert "colocated.stack.log" in {p.name for p in out_dir.iterdir()}
