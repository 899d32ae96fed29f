"""Several NATS URLs, backoff with jitter, and which server a client tries next (pure policy)."""

import pytest

from services.cli import build_parser
from shared.nats_failover import NATS_ENV, Backoff, FailoverPlan, parse_nats_urls


def test_urls_are_split_normalised_and_deduplicated():
    text = "nats://a:4222, b ,nats://c:5000,tls://user:pw@d,nats://a:4222"
    assert parse_nats_urls(text) == ["nats://a:4222", "nats://b:4222", "nats://c:5000", "tls://user:pw@d:4222"]


@pytest.mark.parametrize("bad", ["", " , ", "http://a:4222", "nats://a:notaport", "nats://:4222"])
def test_bad_urls_are_refused_with_the_culprit(bad):
    with pytest.raises(ValueError) as error:
        parse_nats_urls(bad)
    assert "NATS URL" in str(error.value) or "port" in str(error.value)


def test_cli_takes_several_urls_and_falls_back_to_the_environment(monkeypatch, capsys):
    args = build_parser().parse_args(["gateway", "--nats", "nats://a:4222,nats://b:4222"])
    assert args.nats == "nats://a:4222,nats://b:4222"
    monkeypatch.setenv(NATS_ENV, "nats://x:4222,nats://y:4222")
    assert build_parser().parse_args(["scheduler"]).nats == "nats://x:4222,nats://y:4222"
    monkeypatch.delenv(NATS_ENV)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scheduler"])  # neither flag nor environment
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scheduler", "--nats", "http://a"])
    assert "--nats" in capsys.readouterr().err


def test_backoff_grows_to_its_cap_with_jitter_inside_each_step():
    backoff = Backoff(base_s=0.1, cap_s=5.0)
    assert backoff.delay(0) == 0.0  # the first retry goes straight to another server
    for attempt in range(1, 12):
        step = min(5.0, 0.1 * 2 ** (attempt - 1))
        low, high = backoff.delay(attempt, rng=lambda: 0.0), backoff.delay(attempt, rng=lambda: 0.999999)
        assert low == pytest.approx(step / 2) and high == pytest.approx(step, rel=1e-5)
    assert backoff.delay(10_000, rng=lambda: 1.0) == 5.0
    samples = {round(backoff.delay(3), 6) for _ in range(50)}
    assert len(samples) > 10  # two clients losing the same server do not retry in lockstep


def test_failover_skips_the_lost_server_then_rotates_by_failures():
    plan = FailoverPlan(backoff=Backoff(base_s=1.0, cap_s=8.0))
    plan.connected("a:4222")
    plan.disconnected()
    assert plan.lost == "a:4222"
    pool = [("a:4222", 0), ("b:4222", 0), ("c:4222", 0)]
    index, wait = plan.next(pool)
    assert (pool[index][0], wait) == ("b:4222", 0.0)
    pool = [("a:4222", 0), ("b:4222", 1), ("c:4222", 0)]  # b refused
    index, wait = plan.next(pool)
    assert pool[index][0] == "c:4222" and 0.5 <= wait <= 1.0
    pool = [("a:4222", 0), ("b:4222", 1), ("c:4222", 1)]
    index, wait = plan.next(pool)
    assert pool[index][0] == "a:4222" and 1.0 <= wait <= 2.0  # the lost one is tried again last
    plan.connected("a:4222")
    assert plan.attempt == 0 and plan.last_error == ""
