"""Turning a model name (preset, HF folder or GGUF path) into a ready model: config, weights and tokenizer.

    load_model(name_or_path, dtype=None, shard=WHOLE) -> LoadedModel   (one rank's part, or all of it)
    load_model_config(name_or_path) -> ModelConfig       (metadata only: for the gateway)
    load_generation_defaults(name_or_path)                (metadata only: recommended sampling)
    load_tokenizer(name_or_path)                          (in tokenizer.py, also metadata only)

Where the weights come from (`presets.resolve_source`):
- GGUF file: dequantized once, tensor by tensor, into the converted cache (weight_cache.py),
  then read from it; for float32, the linears' Q4_1/Q8_0 blocks are kept too
  (`LoadedModel.block_weights`), checked to dequantize to exactly the dense weights, for the
  engine's decode matmuls (prepack.py);
- HF folder: safetensors read and renamed (hf_checkpoint.py);
- random preset: each parameter drawn from its own seed.
Every source is read through `shard_weights.read_shard`: a rank reads only its own slices.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
from safetensors import safe_open
from torch import nn

from shared.engine import load_progress
from shared.engine.block_weights import BlockWeight
from shared.engine.config import ModelConfig
from shared.engine.dtypes import parse_dtype
from shared.engine.gguf_file import GgufFile
from shared.engine.hf_checkpoint import HfCheckpoint
from shared.engine.model import CausalLM
from shared.engine.collectives import LOCAL, Collectives
from shared.engine.moe import SparseMoeBlock
from shared.engine.generation_defaults import (
    GGUF_KEYS,
    NO_DEFAULTS,
    GenerationDefaults,
    from_gguf_fields,
    from_hf_generation_config,
)
from shared.engine.shard import WHOLE, ModelShard
from shared.engine.shard_weights import read_shard, shard_index
from shared.engine.presets import PRESETS, GgufSource, HfFolderSource, RandomSource, list_models, resolve_source
from shared.engine.tokenizer import ChatTokenizer, tokenizer_for
from shared.engine.weight_cache import WeightCache

__all__ = ["LoadedModel", "list_models", "load_generation_defaults", "load_model", "load_model_config", "random_weights"]

log = structlog.get_logger()


@dataclass(frozen=True)
class LoadedModel:
    name: str
    config: ModelConfig
    model: CausalLM  # this rank's part of the model (all of it on a one-rank world)
    tokenizer: ChatTokenizer
    # The linears' weights also in GGUF blocks, by parameter name, each exactly its dense float32 tensor.
    block_weights: Mapping[str, BlockWeight] = field(default_factory=dict)

    @property
    def shard(self) -> ModelShard:
        return self.model.shard


def load_model(
    name: str | Path,
    dtype: torch.dtype | str | None = None,
    *,
    shard: ModelShard = WHOLE,
    comm: Collectives = LOCAL,
    weight_cache: WeightCache | None = None,
) -> LoadedModel:
    """Loads a preset, HF folder or .gguf file with weights in `dtype` (None: `default_dtype("cpu")`, float32).

    `shard`: the part of the model this rank holds (shard.py; default: all of it); only that
    part is read. `comm`: the rank's collectives (collectives.py). `weight_cache`: where
    converted GGUF weights live (default: `WeightCache()`, under the user's cache folder).
    Raises ValueError for anything that is not a supported model, with a message naming what is.
    """
    dtype = parse_dtype(dtype)
    source = resolve_source(name)
    block_weights: dict[str, BlockWeight] = {}
    match source:
        case GgufSource(path=path):
            gguf = GgufFile(path)
            config = gguf.model_config()
            tokenizer = ChatTokenizer.from_gguf(gguf)
            local, whole = _shapes(config, shard)
            cache = weight_cache if weight_cache is not None else WeightCache()
            load_progress.report("reading weights")
            converted = cache.ensure(path, dtype, whole, lambda: gguf.converted_tensors(config, list(whole)))
            with SafetensorsFile(converted) if converted is not None else contextlib.nullcontext(gguf.reader(config)) as reader:
                weights = read_shard(reader, config, shard, local, whole, dtype)
            if dtype == torch.float32:
                load_progress.report("checking GGUF blocks")
                parts = {n: shard_index(n, whole[n], config, shard) for n in linear_weight_names(config, shard)}
                cuts = {n: p.index for n, p in parts.items() if not p.pad_rows}  # padded vocabulary shards run dense
                block_weights = exact_block_weights(gguf.block_weights(config, cuts), weights)
        case HfFolderSource(path=path):
            checkpoint = HfCheckpoint(path)
            config = checkpoint.model_config()
            tokenizer = tokenizer_for(source, config)
            local, whole = _shapes(config, shard)
            load_progress.report("reading weights")
            with checkpoint.reader(config) as reader:
                weights = read_shard(reader, config, shard, local, whole, dtype)
                if shard.is_whole:
                    reader.check_all_used()
        case RandomSource(config=config, seed=seed, std=std):
            tokenizer = tokenizer_for(source)
            local, whole = _shapes(config, shard)
            weights = read_shard(RandomTensors(whole, seed, std), config, shard, local, whole, dtype)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{name}: tokenizer has {tokenizer.vocab_size} tokens, model only {config.vocab_size}")
    load_progress.report("building model")
    return LoadedModel(str(name), config, CausalLM.from_state_dict(config, weights, shard, comm), tokenizer, block_weights)


def _shapes(config: ModelConfig, shard: ModelShard) -> tuple[dict[str, torch.Size], dict[str, torch.Size]]:
    """Parameter shapes of the rank's model and of the whole model."""
    shard.check(config)
    return parameter_shapes(config, shard), parameter_shapes(config)


class SafetensorsFile:
    """A `TensorSource` over a safetensors file holding our parameter names (a converted GGUF)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> SafetensorsFile:
        self._file = safe_open(self.path, framework="pt").__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._file.__exit__(*exc)

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self._file.get_slice(name)[index]

    def describe(self, name: str) -> str:
        return f"{self.path}: {name}"


class RandomTensors:
    """A `TensorSource` of deterministic N(0, std) weights, norm weights 1: each parameter drawn from
    its own seed (seed, name), so a rank draws only the parameters it holds."""

    def __init__(self, shapes: dict[str, torch.Size], seed: int, std: float):
        self.shapes, self.seed, self.std = shapes, seed, std

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape)[index]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=generator) * self.std)[index]

    def describe(self, name: str) -> str:
        return f"random {name}"


def load_model_config(name: str | Path) -> ModelConfig:
    """The config alone (metadata only, no weights): cheap enough for the gateway."""
    match resolve_source(name):
        case GgufSource(path=path):
            return GgufFile(path).model_config()
        case HfFolderSource(path=path):
            return HfCheckpoint(path).model_config()
        case RandomSource(config=config):
            return config


def load_generation_defaults(name: str | Path) -> GenerationDefaults:
    """The model's recommended sampling settings (metadata only): generation_defaults.py says from where."""
    if isinstance(name, str) and name in PRESETS:
        return PRESETS[name].generation
    match resolve_source(name):
        case HfFolderSource(path=path) if (path / "generation_config.json").is_file():
            raw = json.loads((path / "generation_config.json").read_text())
            return from_hf_generation_config(raw, str(path / "generation_config.json"))
        case GgufSource(path=path):
            gguf = GgufFile(path)
            return from_gguf_fields({key: gguf.field(key, None) for key in GGUF_KEYS.values()}, str(path))
    return NO_DEFAULTS


def linear_weight_names(config: ModelConfig, shard: ModelShard = WHOLE) -> list[str]:
    """The weights the engine's linears multiply by: every dense nn.Linear's, and the embedding when it is the LM head."""
    with torch.device("meta"):
        model = CausalLM(config, shard)
    names = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, SparseMoeBlock):
            continue  # its router stays a plain linear (the engine shares MoE blocks unchanged)
        names += [f"{parent_name}.{name}.weight".lstrip(".") for name, child in parent.named_children() if type(child) is nn.Linear]
    return names + (["embed_tokens.weight"] if config.tie_word_embeddings and shard.is_last_stage else [])


# Rows checked per weight at load: 1 in 16 costs ~0.1 s for smollm2 (every row: 2 s); a
# wrong file, format or row order shows on nearly every row. Tests check every row.
_CHECKED_ROW_STEP = 16


def exact_block_weights(blocks: dict[str, BlockWeight], dense: Mapping[str, torch.Tensor]) -> dict[str, BlockWeight]:
    """Those of `blocks` that dequantize to exactly their dense tensor (all of them, unless the dense copy is not the GGUF's)."""
    exact = {name: weight for name, weight in blocks.items() if weight.matches(dense[name], _CHECKED_ROW_STEP)}
    if len(exact) < len(blocks):
        log.warning("block_weights_inexact", dropped=sorted(blocks.keys() - exact.keys())[:5], count=len(blocks) - len(exact))
    return exact


def parameter_shapes(config: ModelConfig, shard: ModelShard = WHOLE) -> dict[str, torch.Size]:
    """Every parameter of `CausalLM(config, shard)` and its shape (no memory allocated)."""
    with torch.device("meta"):
        return {key: t.shape for key, t in CausalLM(config, shard).state_dict().items()}


def random_weights(config: ModelConfig, seed: int, std: float) -> dict[str, torch.Tensor]:
    """Deterministic float32 N(0, std) weights of the whole model; norm weights (q/k norms included) are 1."""
    shapes = parameter_shapes(config)
    source = RandomTensors(shapes, seed, std)
    return {name: source.read(name, ()) for name in sorted(shapes)}
