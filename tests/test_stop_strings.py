"""Stop strings at the gateway: cut exactly at the first stop, never showing a held-back prefix."""

import pytest

from services.gateway.completion import Completion
from services.gateway.stop_strings import StopStrings
from shared.engine.tokenizer import load_tokenizer
from shared.protocol import FinishReason, Path, Placement, TokenEvent


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


def completion(tokenizer, stops: tuple[str, ...]) -> Completion:
    placement = Placement("r", Path.COLOCATED, "w", "w")
    return Completion("r", "m", False, placement, 3, tokenizer, frozenset(tokenizer.eos_token_ids), stop_strings=StopStrings(stops))


def stream(c: Completion, tokenizer, text: str, finish_last: bool = True) -> list[str]:
    ids = tokenizer.encode(text)
    deltas = []
    for i, token in enumerate(ids):
        last = finish_last and i == len(ids) - 1
        deltas.append(c.absorb(TokenEvent("r", "w", [token], FinishReason.LENGTH if last else None)))
        if c.stopped_by_string:
            break
    return deltas


def test_cut_at_the_first_stop_across_tokens(tokenizer):
    c = completion(tokenizer, ("END", "the cat"))
    deltas = stream(c, tokenizer, "I saw the cat sleep. END of story")
    assert c.text == "I saw "
    assert "".join(deltas) == c.text
    assert c.finish_reason is FinishReason.STOP and c.stopped_by_string


def test_held_back_prefix_is_released_when_no_stop_follows(tokenizer):
    c = completion(tokenizer, ("ENDING",))
    deltas = stream(c, tokenizer, "a story without an END")
    assert c.text == "a story without an END"
    assert "".join(deltas) == c.text
    assert c.finish_reason is FinishReason.LENGTH and not c.stopped_by_string
    assert all("END" not in d for d in deltas[:-1])  # "END" could have begun "ENDING": held back


def test_no_stops_passes_text_through(tokenizer):
    c = completion(tokenizer, ())
    deltas = stream(c, tokenizer, "plain text here")
    assert "".join(deltas) == "plain text here" and c.finish_reason is FinishReason.LENGTH


def test_scan_rules():
    stops = StopStrings(("xyz",))
    assert stops.scan("abcxy", emitted=0, final=False) == (3, False)
    assert stops.scan("abcxyz!", emitted=3, final=False) == (3, True)
    assert stops.scan("abcxy", emitted=0, final=True) == (5, False)
    with pytest.raises(ValueError):
        StopStrings(("",))
