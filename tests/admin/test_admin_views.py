"""The pure parts of `pdserve admin`: causes, rates between snapshots, drain lines, JSON schemas."""

import errno
import socket

import jsonschema
import pytest
from nats.errors import Error as NatsError

from services.admin.connection import AUTHORIZATION, FAILED, HOST_NOT_FOUND, NO_ROUTE, REFUSED, TIMED_OUT, cause_of, check_url
from services.admin.drain import DrainOutcome, DrainReport, final_line, progress_line, requests_held
from services.admin.requests import requests_lines
from services.admin.schema import COMMANDS, VERSION, load_schema, versioned
from services.admin.status import status_lines, status_plain_lines, with_rates


@pytest.mark.parametrize(
    "exc, cause",
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), REFUSED),
        (TimeoutError(), TIMED_OUT),
        (socket.gaierror(-2, "Name or service not known"), HOST_NOT_FOUND),
        (OSError(errno.EHOSTUNREACH, "No route to host"), NO_ROUTE),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), NO_ROUTE),
        (NatsError("nats: 'Authorization Violation'"), AUTHORIZATION),
        (NatsError("nats: 'Maximum Connections Exceeded'"), FAILED),
    ],
)
def test_each_failure_has_its_cause(exc, cause):
    assert cause_of(exc)[0] == cause


def test_only_nats_urls_are_tried():
    assert check_url("nats://10.0.0.1:4222") is None and check_url("127.0.0.1:4222") is None
    assert check_url("nats://a:4222,tls://b:4222") is None  # a cluster
    assert "'http://a:4222' is not a NATS URL" in check_url("nats://b:4222,http://a:4222")


def worker(worker_id: str, generated: int, prompt: int, **extra) -> dict:
    return {
        "worker_id": worker_id, "role": "both", "running": 1, "waiting": 0, "kv_blocks_used": 3, "kv_blocks_total": 64,
        "draining": False, "generated_tokens_total": generated, "prompt_tokens_total": prompt, **extra,
    }  # fmt: skip


def snapshot(at: float, *workers: dict) -> dict:
    return {"time": at, "services": [], "workers": list(workers), "policy": {"mode": "colocated"}}


def test_rates_come_from_two_snapshots_of_the_same_worker():
    first = snapshot(100.0, worker("a", 1000, 50), worker("gone", 5, 5))
    second = with_rates(snapshot(102.0, worker("a", 1300, 250), worker("new", 10, 10)), first)
    a, new = second["workers"]
    assert a["rates"] == {"generated_tokens_per_s": 150.0, "prompt_tokens_per_s": 100.0}
    assert "rates" not in new  # nothing to compare with yet
    assert "rates" not in with_rates(snapshot(1.0, worker("a", 1, 1)), None)["workers"][0]
    restarted = with_rates(snapshot(104.0, worker("a", 7, 0)), second)  # counters reset: no negative rate
    assert "rates" not in restarted["workers"][0]
    jsonschema.validate(versioned(second), load_schema("status"))
    assert "150.0" in status_lines(second)[-2] and "gen_tok/s=150.0" in status_plain_lines(second)[0]


def test_drain_lines_say_what_ended():
    assert progress_line(DrainReport("decode-1", requests_left=2, seconds=1.04)) == "decode-1 draining: 2 requests left after 1.0 s"
    drained = DrainReport("decode-1", DrainOutcome.DRAINED, requests_at_start=3, requests_left=0, seconds=4.2)
    assert final_line(drained) == "decode-1 drained: finished 3 requests in 4.2 s"
    late = DrainReport("decode-1", DrainOutcome.TIMED_OUT, requests_at_start=3, requests_left=1, seconds=10.0)
    assert final_line(late).startswith("decode-1: timed out after 10.0 s with 1 request still running")
    assert "not waiting" in final_line(DrainReport("decode-1", DrainOutcome.DRAINING, requests_at_start=0))
    assert requests_held({"requests": 2, "running": 1, "waiting": 1}) == 2


def test_schemas_load_and_reject_what_scripts_could_not_read():
    assert {load_schema(name)["$id"] for name in COMMANDS} == {f"{VERSION}/{name}" for name in COMMANDS}
    good = versioned({"time": 1.0, "requests": [], "errors": []})
    jsonschema.validate(good, load_schema("requests"))
    row = {"worker_id": "d", "ranks": 1, "request_id": "r", "phase": "decoding", "prompt_tokens": 5, "generated_tokens": 1, "age_s": 0.5, "kv_blocks": 1}
    jsonschema.validate({**good, "requests": [row]}, load_schema("requests"))
    for broken in ({**good, "version": "pdserve.admin/v0"}, {**good, "requests": [{**row, "phase": "sleeping"}]}, {"time": 1.0, "requests": []}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, load_schema("requests"))
    assert "decoding" in requests_lines({**good, "requests": [row]})[1]


def test_status_lists_every_rank_of_every_worker():
    ranks = [
        {"rank": 0, "pid": 101, "host": "h1", "device": "cpu", "dp_group": 0, "kv_blocks_used": 4, "ucx_bytes_sent": 3 << 20, "ucx_bytes_received": 0},
        {"rank": 1, "pid": 102, "host": "h1", "device": "cpu", "dp_group": 1, "kv_blocks_used": 0, "error": "no answer to the probe"},
    ]
    report = snapshot(1.0, worker("decode-0", 0, 0, ranks=ranks), worker("prefill-0", 0, 0))
    jsonschema.validate(versioned(report), load_schema("status"))
    lines = status_lines(report)
    [first, second] = [line for line in lines if line.startswith("decode-0/")]
    assert first.split()[:6] == ["decode-0/0", "101", "h1", "cpu", "0", "4"] and "3.0 MiB" in first
    assert second.split()[:6] == ["decode-0/1", "102", "h1", "cpu", "1", "0"] and "no answer to the probe" in second
    assert not any(line.startswith("prefill-0/") for line in lines)  # a worker that reported no ranks
    assert not any("rank" in line for line in status_lines(snapshot(1.0, worker("a", 0, 0)))[-2:])
    broken = [dict(ranks[0], pid="x")]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(versioned(snapshot(1.0, worker("d", 0, 0, ranks=broken))), load_schema("status"))
