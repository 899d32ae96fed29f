"""Percentiles on known samples, per-request metrics and the summary."""

import pytest

from loadtest.client import RequestOutcome
from loadtest.metrics import SLO, describe_ms, percentile, summarize


def test_percentiles_of_known_samples():
    one_to_ten = list(range(1, 11))
    assert percentile(one_to_ten, 50) == pytest.approx(5.5)
    assert percentile(one_to_ten, 90) == pytest.approx(9.1)
    assert percentile(one_to_ten, 99) == pytest.approx(9.91)
    assert percentile(one_to_ten, 0) == 1 and percentile(one_to_ten, 100) == 10
    assert percentile([15, 20, 35, 40, 50], 40) == pytest.approx(29.0)  # 20 + 0.6 * (35 - 20)
    assert percentile([7.0], 99) == 7.0
    assert percentile([3, 1, 2], 50) == 2  # order does not matter


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        percentile([], 50)


def test_describe_converts_seconds_to_milliseconds():
    stats = describe_ms([0.001 * v for v in range(1, 101)])  # 1..100 ms
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["median"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["std"] == pytest.approx(28.866, rel=1e-4)


def test_describe_of_no_samples_is_null_not_zero():
    assert set(describe_ms([]).values()) == {None}


def ok(index, ttft, itls, output_len, input_len=100, start=0.0) -> RequestOutcome:
    e2el = ttft + sum(itls)
    return RequestOutcome(index, start, input_len, output_len, output_len, ttft, list(itls), e2el)


def failed(index) -> RequestOutcome:
    return RequestOutcome(index, 0.0, 100, 8, error="HTTP 500: boom", e2el_s=0.01)


def test_tpot_excludes_the_first_token():
    outcome = ok(0, ttft=0.5, itls=[0.1, 0.1, 0.1], output_len=4)
    assert outcome.tpot_s == pytest.approx(0.1)
    assert ok(1, 0.5, [], output_len=1).tpot_s is None
    assert failed(2).tpot_s is None


def test_summary_counts_totals_throughput_and_latency():
    outcomes = [
        ok(0, ttft=0.10, itls=[0.02, 0.02, 0.02], output_len=4, input_len=50),
        ok(1, ttft=0.30, itls=[0.04, 0.04, 0.04], output_len=4, input_len=150),
        failed(2),
    ]
    s = summarize(outcomes, duration_s=2.0, workers=2)
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["total_input_tokens"] == 200  # failed requests are not counted
    assert s["total_output_tokens"] == 8
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(4.0)
    assert s["total_token_throughput"] == pytest.approx(104.0)
    assert s["request_throughput_per_worker"] == pytest.approx(0.5)
    assert s["output_throughput_per_worker"] == pytest.approx(2.0)
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["p99_ttft_ms"] == pytest.approx(298.0)
    assert s["mean_tpot_ms"] == pytest.approx(30.0)
    assert s["mean_itl_ms"] == pytest.approx(30.0)  # six gaps pooled
    assert s["p90_itl_ms"] == pytest.approx(40.0)
    assert s["mean_e2el_ms"] == pytest.approx(290.0)
    assert s["request_goodput"] is None


def test_goodput_counts_requests_meeting_every_slo():
    outcomes = [
        ok(0, ttft=0.10, itls=[0.02] * 3, output_len=4),  # good
        ok(1, ttft=0.30, itls=[0.02] * 3, output_len=4),  # TTFT too slow
        ok(2, ttft=0.10, itls=[0.09] * 3, output_len=4),  # TPOT too slow
        failed(3),
    ]
    s = summarize(outcomes, duration_s=4.0, slo=SLO.parse(["ttft:200", "tpot:50"]))
    assert s["request_goodput"] == pytest.approx(0.25)


def test_slo_parsing():
    assert SLO.parse(["ttft:500", "e2el:2000"]) == SLO(ttft_ms=500.0, e2el_ms=2000.0)
    assert SLO.parse([]).given is False
    for bad in (["ttft=5"], ["itl:5"], ["tpot:-1"], ["ttft:fast"]):
        with pytest.raises(ValueError):
            SLO.parse(bad)


def test_all_failed_gives_null_latencies():
    s = summarize([failed(0), failed(1)], duration_s=1.0)
    assert (s["completed"], s["failed"]) == (0, 2)
    assert s["mean_ttft_ms"] is None and s["p99_itl_ms"] is None
    assert s["request_throughput"] == 0.0


def test_progress_prints_about_ten_lines_when_not_a_terminal():
    import io

    from loadtest.progress import Progress

    stream = io.StringIO()
    progress = Progress(total=100, duration_s=None, stream=stream)
    for i in range(100):
        progress.started()
        progress.finished(success=i % 10 != 0)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert 10 <= len(lines) <= 12
    assert lines[-1].startswith("[" + "#" * 24 + "] 100/100 done, 10 failed, 0 in flight")
