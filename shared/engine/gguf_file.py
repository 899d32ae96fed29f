"""Reading a llama.cpp GGUF file: metadata, the model config, float tensors and raw weight blocks.

Opening a file parses its metadata only (about 0.7 s for SmolLM2, dominated by the
tokenizer arrays); tensors stay memory-mapped until `tensor()` dequantizes one, or
`block_weights()` copies the blocks of those stored in a format the engine computes on.
Architectures: `llama`, `qwen3` and `qwen3moe` (GGUF_ARCHITECTURES).
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from shared.engine import load_progress
from shared.engine.block_weights import BLOCK_ELEMENTS, BlockFormat, BlockWeight
from shared.engine.config import ModelConfig

_MISSING = object()

# general.architecture -> our architecture name
GGUF_ARCHITECTURES = {"llama": "llama", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}

# Our parameter name inside a layer -> llama.cpp's tensor name inside `blk.{i}.`.
_LAYER_NAMES = {
    "input_norm.weight": "attn_norm.weight",
    "attn.q_proj": "attn_q",
    "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v",
    "attn.o_proj": "attn_output",
    "attn.q_norm.weight": "attn_q_norm.weight",
    "attn.k_norm.weight": "attn_k_norm.weight",
    "post_attn_norm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.router.weight": "ffn_gate_inp.weight",
    # expert stacks [E, out, in]: gguf's dims reversed are exactly that
    "mlp.gate_proj": "ffn_gate_exps.weight",
    "mlp.up_proj": "ffn_up_exps.weight",
    "mlp.down_proj": "ffn_down_exps.weight",
}
# llama.cpp's converter permutes the rows of llama's Q and K (weights and biases) for its RoPE.
_PERMUTED = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.q_proj.bias", "attn.k_proj.bias")
_BLOCK_FORMATS = {GGMLQuantizationType.Q4_1: BlockFormat.Q4_1, GGMLQuantizationType.Q8_0: BlockFormat.Q8_0}
_TOP_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


class _PlainViewReader(GGUFReader):
    """GGUFReader that slices a plain ndarray view of its memmap (3x faster to open).

    Every `numpy.memmap` slice runs memmap.__array_finalize__; parsing SmolLM2's ~100k
    token strings takes ~750k slices. Same bytes, same mapping, only the Python type differs.
    Mirrors `GGUFReader._get` of gguf 0.19.
    """

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        array = plain[offset : offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return array.view(array.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


class GgufFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._reader = _PlainViewReader(self.path, "r")
        self._tensors = {t.name: t for t in self._reader.tensors}

    def field(self, key: str, default: Any = _MISSING) -> Any:
        """A metadata value as a Python scalar, string or list."""
        entry = self._reader.fields.get(key)
        if entry is None:
            if default is _MISSING:
                raise KeyError(f"{self.path.name} has no metadata key {key!r}")
            return default
        return entry.contents()

    @property
    def architecture(self) -> str:
        return self.field("general.architecture")

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> np.ndarray:
        """Dequantized float32 array in PyTorch's [out, in] order (GGUF lists dims reversed)."""
        if name not in self._tensors:
            raise KeyError(f"{self.path.name} has no tensor {name!r}")
        info = self._tensors[name]
        # gguf's dequantize already returns the numpy (row-major) shape, i.e. reversed GGUF dims.
        return dequantize(info.data, info.tensor_type).astype(np.float32, copy=False)

    @cached_property
    def sha256(self) -> str:
        with open(self.path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    def model_config(self) -> ModelConfig:
        """The config the metadata describes (architectures: see GGUF_ARCHITECTURES)."""
        arch = self.architecture
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(
                f"{self.path.name}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )

        def meta(key: str, default: Any = _MISSING) -> Any:
            return self.field(f"{arch}.{key}", default)

        scaling = meta("rope.scaling.type", "none")
        if scaling not in ("none", "linear") or (scaling == "linear" and meta("rope.scaling.factor", 1.0) != 1.0):
            raise ValueError(f"{self.path.name}: RoPE scaling {scaling!r} is not implemented (only plain RoPE)")
        hidden = meta("embedding_length")
        num_heads = meta("attention.head_count")
        tokens = self._reader.fields["tokenizer.ggml.tokens"]
        eos = self.field("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            architecture=GGUF_ARCHITECTURES[arch],
            vocab_size=meta("vocab_size", len(tokens.data)),
            hidden_size=hidden,
            intermediate_size=meta("feed_forward_length", 0) or meta("expert_feed_forward_length", 0),
            num_layers=meta("block_count"),
            num_heads=num_heads,
            num_kv_heads=meta("attention.head_count_kv", num_heads),
            head_dim=meta("attention.key_length", hidden // num_heads),
            rope_theta=float(meta("rope.freq_base", 10000.0)),
            rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
            max_position_embeddings=meta("context_length"),
            # llama.cpp writes no output.weight when the head shares the embedding matrix.
            tie_word_embeddings=not self.has_tensor("output.weight"),
            bos_token_id=self.field("tokenizer.ggml.bos_token_id", None),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
            attention_bias=self.has_tensor("blk.0.attn_q.bias"),
            weights_id=f"gguf:{self.path.name}:{self.sha256[:16]}",
            **self._moe_fields(meta),
        )

    def _moe_fields(self, meta) -> dict[str, Any]:
        if self.architecture != "qwen3moe":
            return {}
        num_layers = meta("block_count")
        return dict(
            num_experts=meta("expert_count"),
            num_experts_per_tok=meta("expert_used_count"),
            moe_intermediate_size=meta("expert_feed_forward_length"),
            # llama.cpp's qwen3moe graph always renormalises the top-k weights (transformers assumes so too).
            norm_topk_prob=bool(meta("expert_weights_norm", True)),
            mlp_only_layers=tuple(i for i in range(num_layers) if not self.has_tensor(f"blk.{i}.ffn_gate_inp.weight")),
        )

    def tensor_as_ours(self, ours: str, config: ModelConfig) -> torch.Tensor:
        """One of our parameters, float32 (dequantized; llama's Q/K rows un-permuted)."""
        array = _in_hf_row_order(self.tensor(gguf_tensor_name(ours)), ours, config)
        # Quantized tensors dequantize into fresh arrays; F32 ones are read-only views of the file: copy only those.
        return torch.from_numpy(np.require(array, requirements=["C", "W"]))

    def converted_tensors(self, config: ModelConfig, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """`(name, float32 tensor)` for each of our parameter `names`, in sorted order, one at a time."""
        for index, ours in enumerate(sorted(names)):
            load_progress.report("converting GGUF weights", index + 1, len(names))
            yield ours, self.tensor_as_ours(ours, config)

    def block_weights(self, config: ModelConfig, parts: dict[str, tuple[slice, ...]]) -> dict[str, BlockWeight]:
        """The raw blocks of those weights stored as Q4_1 or Q8_0, cut to `parts` (name -> [rows, columns]).

        Rows are un-permuted like `tensor_as_ours`, so each equals its dense shard dequantized.
        A column cut that does not fall on whole blocks of 32 is left out (its linear runs dense).
        """
        blocks = {}
        for ours, (rows, columns) in parts.items():
            info = self._tensors[gguf_tensor_name(ours)]
            block_format = _BLOCK_FORMATS.get(info.tensor_type)
            if block_format is None or len(info.shape) != 2:
                continue
            in_features = int(info.shape[0])
            start, stop, _ = columns.indices(in_features)
            if start % BLOCK_ELEMENTS or (stop % BLOCK_ELEMENTS and stop != in_features):
                continue
            data = _in_hf_row_order(info.data, ours, config)[rows]  # uint8 [out, in / 32 * block_bytes]
            per_block = block_format.block_bytes
            data = data[:, start // BLOCK_ELEMENTS * per_block : -(-stop // BLOCK_ELEMENTS) * per_block]
            blocks[ours] = BlockWeight(block_format, torch.from_numpy(np.array(data, order="C")), stop - start)
        return blocks

    def reader(self, config: ModelConfig) -> GgufReaderSource:
        """A `TensorSource` that dequantizes each tensor as it is asked for (when no converted copy can be kept)."""
        return GgufReaderSource(self, config)


class GgufReaderSource:
    def __init__(self, gguf: GgufFile, config: ModelConfig):
        self.gguf, self.config = gguf, config

    def read(self, ours: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.gguf.tensor_as_ours(ours, self.config)[index]

    def describe(self, ours: str) -> str:
        return f"{self.gguf.path.name}: {gguf_tensor_name(ours)}"


def _in_hf_row_order(rows: np.ndarray, ours: str, config: ModelConfig) -> np.ndarray:
    """llama's Q/K rows as HF orders them (llama.cpp permutes them for its RoPE); other tensors as they are."""
    if config.architecture == "llama" and ours.endswith(_PERMUTED):
        return unpermute_rope_rows(rows, config.num_heads if ".q_proj" in ours else config.num_kv_heads)
    return rows


def gguf_tensor_name(ours: str) -> str:
    """llama.cpp's tensor name for one of our parameters."""
    if ours in _TOP_NAMES:
        return _TOP_NAMES[ours]
    _, index, rest = ours.split(".", 2)
    if rest in _LAYER_NAMES:
        return f"blk.{index}.{_LAYER_NAMES[rest]}"
    module, _, leaf = rest.rpartition(".")  # attention projections: weight or bias
    return f"blk.{index}.{_LAYER_NAMES[module]}.{leaf}"


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation so the weights suit rotate_half RoPE.

    llama.cpp's converter reorders each head's rows from [first half, second half] to
    interleaved pairs (its RoPE rotates adjacent elements); HF's rotate_half rotates
    element i with i + head_dim/2, so we put the halves back.
    """
    # weight: [num_heads * head_dim, hidden]
    half = weight.shape[0] // num_heads // 2
    pairs = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # [H, D/2, 2, hidden]
    return pairs.swapaxes(1, 2).reshape(weight.shape)  # [H, 2, D/2, hidden] -> rows
