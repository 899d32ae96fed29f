"""The gateway's migration state machine (services/gateway/migration.py), without I/O."""

import pytest

from services.gateway.migration import Action, Flight, Phase, http_status
from shared.protocol import ErrorCode, FinishReason, Path, Placement, Sampling, TokenEvent, WorkerDown

PROMPT = [5, 6, 7]


def flight(limit: int = 3, max_tokens: int = 10) -> Flight:
    return Flight("req", "m", list(PROMPT), Sampling(max_tokens=max_tokens, temperature=0.7, seed=42), limit)


def place(f: Flight, prefill: str = "p0", decode: str = "d0", path: Path = Path.DISAGG) -> Placement:
    placement = Placement(f.next_request_id, path, prefill, decode, prefill_incarnation=f"{prefill}-1", decode_incarnation=f"{decode}-1")
    f.placed(placement)
    return placement


def tokens(f: Flight, worker: str, ids: list[int], finish: FinishReason | None = None) -> TokenEvent:
    return TokenEvent(f.attempt.request_id, worker, ids, finish)


def test_a_decoder_dying_mid_stream_continues_from_the_tokens_forwarded():
    f = flight()
    place(f)
    assert f.on_event(0, tokens(f, "p0", [100])).action is Action.FORWARD
    assert f.on_event(0, tokens(f, "d0", [101])).action is Action.FORWARD
    assert f.on_event(0, tokens(f, "d0", [102])).action is Action.FORWARD
    assert f.attempt.phase is Phase.DECODING

    verdict = f.on_worker_down(WorkerDown("d0", "d0-1", "no heartbeat for 3.1s"))

    assert verdict.action is Action.MIGRATE
    assert "d0" in verdict.reason
    request = f.place_request()
    assert request.request_id == "req-m1"
    assert request.num_prompt_tokens == 6 and request.max_tokens == 7
    assert request.exclude == ["d0"]
    placement = place(f, "p0", "d1")
    job = f.job(placement, "pd.stream.req-m1")
    assert job.request_id == "req-m1"
    assert job.prompt_ids == PROMPT + [100, 101, 102]
    assert job.sampling.max_tokens == 7 and job.sampling.step_offset == 3 and job.sampling.seed == 42
    assert f.retries == 1


def test_the_continuation_ends_at_the_original_max_tokens():
    f = flight(max_tokens=4)
    place(f)
    f.on_event(0, tokens(f, "p0", [1]))
    f.on_event(0, tokens(f, "d0", [2]))
    f.on_worker_down(WorkerDown("d0", "", "gone"))
    place(f, "p0", "d1")
    f.on_event(1, tokens(f, "p0", [3]))
    verdict = f.on_event(1, tokens(f, "d1", [4, 5], FinishReason.LENGTH))  # one token too many: dropped by count
    assert verdict.event.token_ids == [4]
    assert f.generated == [1, 2, 3, 4]


def test_events_of_an_earlier_attempt_or_from_other_workers_are_dropped():
    f = flight()
    place(f)
    f.on_event(0, tokens(f, "p0", [1]))
    old = tokens(f, "d0", [2])
    f.on_worker_down(WorkerDown("d0", "d0-1", "gone"))
    place(f, "p0", "d1")
    assert f.on_event(0, old).action is Action.DROP  # queued before the switch
    intruder = TokenEvent(f.attempt.request_id, "mallory", [666])
    verdict = f.on_event(1, intruder)
    assert verdict.action is Action.DROP and "mallory" in verdict.reason
    assert f.generated == [1]


def test_a_prefill_worker_that_dies_before_the_first_token_is_retried_with_the_whole_prompt():
    f = flight()
    place(f)
    assert f.on_worker_down(WorkerDown("p0", "p0-1", "gone")).action is Action.MIGRATE
    assert f.place_request().exclude == ["p0"]
    job = f.job(place(f, "p1", "d0"), "s")
    assert job.prompt_ids == PROMPT and job.sampling.step_offset == 0 and job.sampling.max_tokens == 10


def test_once_decoding_the_prefill_worker_no_longer_matters():
    f = flight()
    place(f)
    f.on_event(0, tokens(f, "p0", [1]))
    assert f.attempt.phase is Phase.HANDING_OFF
    assert f.on_worker_down(WorkerDown("p0", "p0-1", "gone")).action is Action.MIGRATE  # the KV was still on its way
    place(f, "p1", "d0")
    f.on_event(1, tokens(f, "p1", [2]))
    f.on_event(1, tokens(f, "d0", [3]))
    assert f.on_worker_down(WorkerDown("p1", "p1-1", "gone")).action is Action.DROP


def test_duplicate_and_stale_incarnation_events_are_harmless():
    f = flight()
    place(f)
    f.on_event(0, tokens(f, "p0", [1]))
    f.on_event(0, tokens(f, "d0", [2]))
    assert f.on_worker_down(WorkerDown("d0", "an-older-run", "restarted")).action is Action.DROP
    assert f.on_worker_down(WorkerDown("d0", "d0-1", "gone")).action is Action.MIGRATE
    place(f, "p0", "d1")
    assert f.on_worker_down(WorkerDown("d0", "d0-1", "gone")).action is Action.DROP  # a second scheduler's copy


def test_the_migration_limit_ends_the_request_with_503():
    f = flight(limit=1)
    place(f)
    assert f.on_worker_down(WorkerDown("d0", "", "gone")).action is Action.MIGRATE
    place(f, "p0", "d1")
    verdict = f.on_worker_down(WorkerDown("d1", "", "gone"))
    assert verdict.action is Action.FAIL and verdict.status == 503
    assert "limit of 1" in verdict.reason


def test_migration_off():
    f = flight(limit=0)
    place(f)
    verdict = f.on_worker_down(WorkerDown("p0", "", "gone"))
    assert (verdict.action, verdict.status) == (Action.FAIL, 503)
    assert "off" in verdict.reason


@pytest.mark.parametrize(
    "code, action, status",
    [
        (ErrorCode.UNAVAILABLE, Action.MIGRATE, 0),
        (ErrorCode.TOO_MANY_REQUESTS, Action.FAIL, 429),
        (ErrorCode.BAD_REQUEST, Action.FAIL, 400),
        (ErrorCode.INTERNAL, Action.FAIL, 500),
        (None, Action.FAIL, 500),
    ],
)
def test_worker_errors_map_by_code(code, action, status):
    f = flight()
    place(f)
    event = TokenEvent(f.attempt.request_id, "p0", [], FinishReason.ERROR, "boom", error_code=code)
    verdict = f.on_event(0, event)
    assert (verdict.action, verdict.status) == (action, status)


def test_an_unavailable_hand_off_avoids_the_decoder_it_waited_on():
    f = flight()
    place(f)
    f.on_event(0, tokens(f, "p0", [1]))
    error = TokenEvent(f.attempt.request_id, "p0", [], FinishReason.ERROR, "decoder refused", error_code=ErrorCode.UNAVAILABLE)
    assert f.on_event(0, error).action is Action.MIGRATE
    assert f.place_request().exclude == ["d0"]


def test_a_redirected_hand_off_accepts_the_new_decoder():
    f = flight()
    place(f)
    f.on_event(0, TokenEvent(f.attempt.request_id, "p0", [1], decode_worker="d7"))
    assert f.on_event(0, tokens(f, "d7", [2])).action is Action.FORWARD
    assert f.attempt.phase is Phase.DECODING
    assert f.on_worker_down(WorkerDown("d0", "d0-1", "gone")).action is Action.DROP
    assert f.on_worker_down(WorkerDown("d7", "x", "gone")).action is Action.MIGRATE


def test_colocated_requests_wait_on_their_one_worker():
    f = flight()
    place(f, "b0", "b0", Path.COLOCATED)
    f.on_event(0, tokens(f, "b0", [1]))
    assert f.attempt.phase is Phase.DECODING
    assert f.on_worker_down(WorkerDown("b0", "b0-1", "gone")).action is Action.MIGRATE


def test_a_lost_nats_connection_migrates():
    f = flight()
    place(f)
    f.on_event(0, tokens(f, "p0", [1]))
    assert f.on_connection_lost().action is Action.MIGRATE


def test_http_status():
    assert [http_status(c) for c in (ErrorCode.UNAVAILABLE, ErrorCode.TOO_MANY_REQUESTS, ErrorCode.BAD_REQUEST, None)] == [503, 429, 400, 500]
