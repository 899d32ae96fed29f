"""Prompts of an exact token length, cut from real English text.

`corpus.txt` holds public-domain excerpts (Dickens, A Tale of Two Cities; Melville,
Moby-Dick; Austen, Pride and Prejudice; Lincoln, the Gettysburg Address; the US
Declaration of Independence and the preamble of the Constitution; Carroll, Alice's
Adventures in Wonderland), about 1,750 SmolLM2 tokens. It is tokenized once; a prompt of
n tokens is the window of n ids starting at a random offset, wrapping around the end, so
prompts are real text but rarely share a prefix.

Two ways to send it:
- token ids (`/v1/completions` with `prompt: [ids]`): the server sees exactly n tokens.
- text (`/v1/chat/completions`): the window is decoded, and its length adjusted until the
  text re-encodes to exactly n tokens. The server's chat template adds its own tokens on
  top; the server-reported `prompt_tokens` is what the results record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

CORPUS_PATH = Path(__file__).with_name("corpus.txt")
_MAX_TEXT_ADJUSTMENTS = 16


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class PromptSource:
    def __init__(self, tokenizer: Tokenizer, text: str | None = None):
        self._tokenizer = tokenizer
        self._ids = np.asarray(tokenizer.encode(text if text is not None else CORPUS_PATH.read_text()), dtype=np.int64)
        if len(self._ids) < 2:
            raise ValueError("the prompt corpus must encode to at least 2 tokens")

    def token_ids(self, length: int, rng: np.random.Generator) -> list[int]:
        """`length` consecutive corpus ids from a random offset (cyclic)."""
        start = int(rng.integers(len(self._ids)))
        positions = (start + np.arange(length)) % len(self._ids)
        return self._ids[positions].tolist()

    def text(self, length: int, rng: np.random.Generator) -> str:
        """Corpus text that encodes to exactly `length` tokens (best effort after a few tries)."""
        window = length
        ids = self.token_ids(length + _MAX_TEXT_ADJUSTMENTS, rng)
        for _ in range(_MAX_TEXT_ADJUSTMENTS):
            text = self._tokenizer.decode(ids[:window])
            error = len(self._tokenizer.encode(text)) - length
            if error == 0:
                break
            window = max(1, window - error)
        return text


def load_tokenizer(name: str) -> Tokenizer:
    """A pdserve preset's tokenizer (`tiny-llama`, `smollm2-135m`), or a HF `tokenizer.json` path."""
    if name.endswith(".json") and Path(name).is_file():
        return _HfTokenizerFile(Path(name))
    from shared.engine.tokenizer import load_tokenizer as load_preset_tokenizer

    return load_preset_tokenizer(name)


class _HfTokenizerFile:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HfTokenizer

        self._tokenizer = HfTokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)
