"""Token log-probabilities in the two OpenAI shapes: chat (`content` entries) and legacy completions.

A token's text is its bytes decoded leniently: a token holding part of a multi-byte
character shows U+FFFD, and its `bytes` (chat) carry the exact piece, as OpenAI does.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.engine.tokenizer import ChatTokenizer
from shared.protocol import TokenLogprob


@dataclass(frozen=True)
class ScoredToken:
    token_id: int
    scores: TokenLogprob


class LogprobFormatter:
    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def _chat_alternative(self, token_id: int, logprob: float) -> dict:
        raw = self.tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def chat(self, tokens: list[ScoredToken]) -> dict:
        """`choice.logprobs` of a chat completion (or chunk)."""
        content = []
        for token in tokens:
            entry = self._chat_alternative(token.token_id, token.scores.logprob)
            top = zip(token.scores.top_ids, token.scores.top_logprobs)
            content.append(entry | {"top_logprobs": [self._chat_alternative(i, lp) for i, lp in top]})
        return {"content": content, "refusal": None}

    def completion(self, tokens: list[ScoredToken], text_offset: int) -> dict:
        """`choice.logprobs` of a legacy completion (or chunk) whose first token starts at `text_offset`."""
        texts = [self.token_text(token.token_id) for token in tokens]
        offsets = []
        for text in texts:
            offsets.append(text_offset)
            text_offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [token.scores.logprob for token in tokens],
            "top_logprobs": [
                {self.token_text(i): lp for i, lp in zip(token.scores.top_ids, token.scores.top_logprobs)} for token in tokens
            ],
            "text_offset": offsets,
        }
