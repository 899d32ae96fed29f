"""A worker's error says whether to try again: UNAVAILABLE reaches the client as 503, anything else as 500.

The gateway's dispatcher decides (services/gateway/migration.py): an UNAVAILABLE error is
first moved to another worker while the migration limit allows; once it does not, the
client gets the 503.
"""

import pytest

from services.gateway.migration import Action, Flight
from shared.protocol import ErrorCode, FinishReason, Path, Placement, Sampling, TokenEvent


@pytest.mark.parametrize("code, status", [(ErrorCode.UNAVAILABLE, 503), (None, 500), (ErrorCode.INTERNAL, 500)])
def test_error_status_follows_the_workers_code(code, status):
    flight = Flight("r", "m", [1, 2, 3], Sampling(max_tokens=8), migration_limit=0)
    flight.placed(Placement("r", Path.DISAGG, "p", "d"))
    assert flight.on_event(0, TokenEvent("r", "p", [42])).action is Action.FORWARD
    verdict = flight.on_event(0, TokenEvent("r", "p", [], FinishReason.ERROR, "KV hand-off failed: no decoder", error_code=code))
    assert verdict.action is Action.FAIL
    assert verdict.status == status
