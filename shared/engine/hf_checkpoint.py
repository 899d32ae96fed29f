"""Reading an HF model folder: config.json + *.safetensors (one file, or shards named by
model.safetensors.index.json), for the families in `SUPPORTED_MODEL_TYPES`.

Only headers are read to build the config (cheap enough for the gateway); `reader()` reads
the parts of tensors a rank needs, under our parameter names (model.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from shared.engine.config import ModelConfig

# HF model_type -> the architecture class name its config.json lists.
SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
SUPPORTED_TEXT = ", ".join(f"{t} ({cls})" for t, cls in SUPPORTED_MODEL_TYPES.items())
INDEX_FILE = "model.safetensors.index.json"

# What transformers assumes when config.json leaves a key out (the families' config defaults).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "qwen3": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "qwen3_moe": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "decoder_sparse_step": 1,
                  "norm_topk_prob": False, "mlp_only_layers": []},
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved
_EXPERT_STACKS = ("gate_proj", "up_proj", "down_proj")  # our stacked [E, out, in] expert weights
# our prefix in a layer -> HF's
_LAYER_RENAMES = (("input_norm.", "input_layernorm."), ("post_attn_norm.", "post_attention_layernorm."),
                  ("attn.", "self_attn."), ("mlp.router.", "mlp.gate."))


class HfCheckpoint:
    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise ValueError(
                f"{self.folder}: no config.json; a model folder needs config.json and *.safetensors "
                f"of a supported family: {SUPPORTED_TEXT}"
            )
        self.raw: dict[str, Any] = json.loads(config_path.read_text())
        self.architecture = _architecture(self.raw, self.folder)
        self.weight_files = _weight_files(self.folder)

    @cached_property
    def tensor_files(self) -> dict[str, Path]:
        """Checkpoint tensor name -> the file holding it (from the shard index, else the headers)."""
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.folder / file for name, file in weight_map.items()}
        names = {}
        for path in self.weight_files:
            try:
                with safe_open(path, framework="pt") as f:
                    names.update(dict.fromkeys(f.keys(), path))
            except Exception as error:  # safetensors raises its own error type
                raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
        return names

    def model_config(self) -> ModelConfig:
        return _model_config(self.raw, self.architecture, self.folder, set(self.tensor_files), self.weights_id())

    def weights_id(self) -> str:
        """Names these weights by content: config.json, and per file its size, header and samples of its data.

        Not the folder's path, so two copies of one checkpoint may hand KV to each other.
        Hashing every byte would cost seconds per GB at each start; headers plus samples tell
        apart any two checkpoints that differ in shapes, names or (random or trained) values.
        """
        digest = hashlib.sha256((self.folder / "config.json").read_bytes())
        for path in self.weight_files:
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(header_len, 1 << 24)))
                for offset in (0, size // 2, max(size - (1 << 16), 0)):
                    f.seek(max(offset, 8 + header_len))
                    digest.update(f.read(1 << 16))
        return f"hf:{digest.hexdigest()[:16]}"

    def reader(self, config: ModelConfig) -> HfReader:
        """A `TensorSource` over the checkpoint's files (a context manager: it keeps them open)."""
        return HfReader(self, config)


class HfReader:
    """Reads parts of our parameters from the checkpoint's tensors, memory-mapped.

    An expert stack `[E, out, in]` is assembled from the experts a rank holds only: from
    per-expert tensors (HF's original layout) or from transformers 5's fused
    `experts.gate_up_proj` `[E, 2 * inner, hidden]` (gate rows first) and `experts.down_proj`.
    """

    def __init__(self, checkpoint: HfCheckpoint, config: ModelConfig):
        self.checkpoint = checkpoint
        self.config = config
        self.used: set[str] = set()
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> HfReader:
        for path in set(self.checkpoint.tensor_files.values()):
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _slice(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        files = self.checkpoint.tensor_files
        if name not in files:
            raise ValueError(f"{self.checkpoint.folder}: checkpoint has no tensor {name!r} ({self.config.architecture} needs it)")
        self.used.add(name)
        return self._handles[files[name]].get_slice(name)[index]

    def read(self, ours: str, index: tuple[slice, ...]) -> torch.Tensor:
        if not _is_expert_stack(ours):
            return self._slice(hf_tensor_name(ours), index)
        prefix, _, leaf = ours.rpartition(".")
        experts = f"model.{prefix}.experts"
        expert_rows, *inner = index  # which experts, then their rows and columns
        fused = f"{experts}.gate_up_proj" if leaf != "down_proj" else f"{experts}.down_proj"
        if fused in self.checkpoint.tensor_files:
            if leaf == "down_proj":
                return self._slice(fused, index)
            size = self.config.moe_intermediate_size
            rows = inner[0].indices(size)
            shift = 0 if leaf == "gate_proj" else size  # up rows follow the gate rows
            return self._slice(fused, (expert_rows, slice(rows[0] + shift, rows[1] + shift), inner[1]))
        ids = range(self.config.num_experts)[expert_rows]
        return torch.stack([self._slice(f"{experts}.{e}.{leaf}.weight", tuple(inner)) for e in ids])

    def describe(self, ours: str) -> str:
        return f"{self.checkpoint.folder}: {_describe(ours)}"

    def check_all_used(self) -> None:
        """A whole-model load must use every tensor of the checkpoint (else a feature is missing)."""
        _check_all_used(self.checkpoint.folder, set(self.checkpoint.tensor_files), self.used, self.config)


def _architecture(raw: dict[str, Any], folder: Path) -> str:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        listed = raw.get("architectures")
        raise ValueError(
            f"{folder}: model_type {model_type!r} (architectures {listed}) is not supported; "
            f"supported families: {SUPPORTED_TEXT}"
        )
    return model_type


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise ValueError(f"{folder}: {INDEX_FILE} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = f" (found {', '.join(others)}: only safetensors are read)" if others else ""
        raise ValueError(f"{folder}: no *.safetensors weights{hint}")
    return files


def _model_config(raw: dict[str, Any], arch: str, folder: Path, tensor_names: set[str], weights_id: str) -> ModelConfig:
    values = {**_DEFAULTS[arch], **{k: v for k, v in raw.items() if v is not None}}

    def need(key: str, *aliases: str) -> Any:
        for name in (key, *aliases):
            if name in values:
                return values[name]
        raise ValueError(f"{folder}/config.json has no {key!r} (needed for {arch})")

    _refuse_unsupported(values, arch, folder)
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    bos, eos = _special_token_ids(folder, raw)
    moe = {}
    if arch == "qwen3_moe":
        moe = dict(
            num_experts=need("num_experts", "num_local_experts"),
            num_experts_per_tok=need("num_experts_per_tok"),
            moe_intermediate_size=need("moe_intermediate_size"),
            norm_topk_prob=bool(values["norm_topk_prob"]),
            decoder_sparse_step=values["decoder_sparse_step"],
            mlp_only_layers=tuple(values["mlp_only_layers"]),
        )
    return ModelConfig(
        architecture=arch,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=values.get("num_key_value_heads", heads),
        head_dim=values.get("head_dim", hidden // heads),
        rope_theta=float(_rope_theta(values)),
        rms_norm_eps=float(values["rms_norm_eps"]),
        max_position_embeddings=values["max_position_embeddings"],
        # Absent from config.json: tied exactly when the checkpoint has no separate head.
        tie_word_embeddings=bool(values.get("tie_word_embeddings", "lm_head.weight" not in tensor_names)),
        bos_token_id=bos,
        eos_token_ids=eos,
        attention_bias=bool(values.get("attention_bias", False)),
        weights_id=weights_id,
        **moe,
    )


def _refuse_unsupported(values: dict[str, Any], arch: str, folder: Path) -> None:
    problems = []
    if values.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {values['hidden_act']!r} (only 'silu')")
    scaling = values.get("rope_scaling") or values.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only 'default' RoPE)")
    if values.get("use_sliding_window"):
        problems.append("sliding-window attention")
    if values.get("mlp_bias"):
        problems.append("MLP biases")
    if problems:
        raise ValueError(f"{folder}: this {arch} checkpoint uses {'; '.join(problems)}, which pdserve does not implement")


def _rope_theta(values: dict[str, Any]) -> float:
    if "rope_theta" in values:
        return values["rope_theta"]
    return (values.get("rope_parameters") or {}).get("rope_theta", 10000.0)


def _special_token_ids(folder: Path, raw: dict[str, Any]) -> tuple[int | None, tuple[int, ...]]:
    """BOS and EOS ids: config.json, else generation_config.json, else the tokenizer files' eos_token."""
    bos, eos = raw.get("bos_token_id"), raw.get("eos_token_id")
    generation = folder / "generation_config.json"
    if eos is None and generation.is_file():
        extra = json.loads(generation.read_text())
        bos, eos = bos if bos is not None else extra.get("bos_token_id"), extra.get("eos_token_id")
    if eos is None:
        eos = _eos_from_tokenizer_files(folder)
    if eos is None:
        raise ValueError(f"{folder}: no eos_token_id in config.json, generation_config.json or the tokenizer files")
    eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    return bos, eos_ids


def _eos_from_tokenizer_files(folder: Path) -> int | None:
    config_path, tokenizer_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not (config_path.is_file() and tokenizer_path.is_file()):
        return None
    token = json.loads(config_path.read_text()).get("eos_token")
    token = token.get("content") if isinstance(token, dict) else token
    if not token:
        return None
    tokenizer = json.loads(tokenizer_path.read_text())
    for added in tokenizer.get("added_tokens", []):
        if added.get("content") == token:
            return added["id"]
    return tokenizer.get("model", {}).get("vocab", {}).get(token)


def hf_tensor_name(ours: str) -> str:
    """HF's name for one of our (non-expert-stack) parameters."""
    if ours == "lm_head.weight":
        return ours
    if not ours.startswith("layers."):
        return f"model.{ours}"
    _, index, rest = ours.split(".", 2)
    for our_prefix, hf_prefix in _LAYER_RENAMES:
        if rest.startswith(our_prefix):
            rest = hf_prefix + rest[len(our_prefix):]
            break
    return f"model.layers.{index}.{rest}"


def _is_expert_stack(ours: str) -> bool:
    prefix, _, leaf = ours.rpartition(".")
    return prefix.endswith(".mlp") and leaf in _EXPERT_STACKS


def _describe(ours: str) -> str:
    """The checkpoint tensor(s) behind one of our parameters, for messages."""
    if _is_expert_stack(ours):
        prefix, _, leaf = ours.rpartition(".")
        return f"model.{prefix}.experts.*.{leaf} (stacked)"
    return hf_tensor_name(ours)


def _check_all_used(folder: Path, names: set[str], used: set[str], config: ModelConfig) -> None:
    unused = {n for n in names - used if not n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        unused.discard("lm_head.weight")  # some tied checkpoints save the head anyway
    if unused:
        listed = ", ".join(sorted(unused)[:5])
        raise ValueError(
            f"{folder}: {len(unused)} checkpoint tensors have no place in our {config.architecture} model "
            f"(e.g. {listed}); a feature pdserve does not implement?"
        )
