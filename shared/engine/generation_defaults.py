"""A model's recommended sampling settings, used when a request leaves them unset.

Where they come from (`loader.load_generation_defaults`):
- an HF folder: its `generation_config.json`, read as transformers' `generate()` reads it:
  with `"do_sample": true`, its `temperature`, `top_p` and `top_k`; without it (or false),
  greedy decoding;
- a .gguf file: llama.cpp's `general.sampling.temp|top_p|top_k` keys, when present;
- a preset: what the preset states (presets.py).
A setting the model does not recommend falls back to the OpenAI API's default
(`OPENAI_DEFAULTS`), and so does everything with `pdserve gateway --generation-config none`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    source: str = ""  # where these came from, for the gateway's start-up log

    def to_json(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "source": self.source}


NO_DEFAULTS = GenerationDefaults()
OPENAI_DEFAULTS = GenerationDefaults(temperature=1.0, top_p=1.0, top_k=0, source="OpenAI API defaults")

GGUF_KEYS = {"temperature": "general.sampling.temp", "top_p": "general.sampling.top_p", "top_k": "general.sampling.top_k"}


def from_hf_generation_config(raw: dict[str, Any], source: str) -> GenerationDefaults:
    if raw.get("do_sample") is not True:  # transformers' default: do_sample=False, greedy
        return GenerationDefaults(temperature=0.0, source=f"{source} (no do_sample: greedy)")
    return GenerationDefaults(
        temperature=_number(raw.get("temperature"), float),
        top_p=_number(raw.get("top_p"), float),
        top_k=_number(raw.get("top_k"), int),
        source=source,
    )


def from_gguf_fields(fields: dict[str, Any], source: str) -> GenerationDefaults:
    values = {name: fields.get(key) for name, key in GGUF_KEYS.items()}
    if all(v is None for v in values.values()):
        return NO_DEFAULTS
    return GenerationDefaults(
        temperature=_number(values["temperature"], float),
        top_p=_number(values["top_p"], float),
        top_k=_number(values["top_k"], int),
        source=source,
    )


def _number(value: Any, kind: type) -> Any:
    return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class SamplingChoice:
    temperature: float
    top_p: float
    top_k: int


def choose_sampling(
    temperature: float | None, top_p: float | None, top_k: int | None, model: GenerationDefaults
) -> SamplingChoice:
    """The request's value where it set one, else the model's, else the OpenAI default."""

    def pick(requested, recommended, fallback):
        if requested is not None:
            return requested
        return recommended if recommended is not None else fallback

    return SamplingChoice(
        temperature=pick(temperature, model.temperature, OPENAI_DEFAULTS.temperature),
        top_p=pick(top_p, model.top_p, OPENAI_DEFAULTS.top_p),
        top_k=pick(top_k, model.top_k, OPENAI_DEFAULTS.top_k),
    )
