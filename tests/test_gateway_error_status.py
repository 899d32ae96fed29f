"""A worker's error says whether to try again: UNAVAILABLE reaches the client as 503, anything else as 500."""

import pytest

from services.gateway.completion import Completion
from shared.engine.tokenizer import load_tokenizer
from shared.protocol import ErrorCode, FinishReason, Path, Placement, TokenEvent


@pytest.mark.parametrize("code, status", [(ErrorCode.UNAVAILABLE, 503), (None, 500), (ErrorCode.INTERNAL, 500)])
def test_error_status_follows_the_workers_code(code, status):
    tokenizer = load_tokenizer("tiny-llama")
    placement = Placement("r", Path.DISAGG, "p", "d")
    completion = Completion("r", "m", False, placement, 3, tokenizer, frozenset(tokenizer.eos_token_ids))
    completion.absorb(TokenEvent("r", "p", [42]))
    completion.absorb(TokenEvent("r", "p", [], FinishReason.ERROR, "KV hand-off failed: no decoder", error_code=code))
    assert completion.finish_reason is FinishReason.ERROR
    assert completion.error_status == status
