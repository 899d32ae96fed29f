"""Test checkpoints written by HF transformers itself (the oracle), a small tokenizer, and GGUF copies.

Random weights with a wide init (initializer_range 0.3): the default 0.02 gives
near-uniform logits whose argmax flips on float rounding. Shapes are deliberately odd
(6 q / 3 kv heads, 5 / 1, head_dim not hidden / heads). Test-only: transformers is never
imported from shared/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shared.engine.batch import ForwardBatch, SequenceChunk
from shared.engine.engine import Engine
from shared.engine.kv_cache import PagedKVCache
from shared.engine.sampling import SamplingParams

VOCAB = 320  # the model's; the tokenizer fills 300 of it
BOS, EOS = 0, 2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world, this is a tiny tokenizer for tests: 12345, héllo, 日本語.",
    "user assistant system",
] * 5

_COMMON = dict(vocab_size=VOCAB, initializer_range=0.3, bos_token_id=BOS, eos_token_id=EOS, max_position_embeddings=256)


def family_configs() -> dict:
    """name -> a transformers config of each family, with odd shapes."""
    from transformers import LlamaConfig, Qwen3Config, Qwen3MoeConfig

    return {
        # 6 q heads over 3 kv heads, untied head
        "llama": LlamaConfig(**_COMMON, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                             num_attention_heads=6, num_key_value_heads=3, head_dim=8, rms_norm_eps=1e-5,
                             tie_word_embeddings=False),
        # 5 q heads over 1 kv head, tied head, attention biases
        "llama-5x1-bias": LlamaConfig(**_COMMON, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=5, num_key_value_heads=1, head_dim=8, attention_bias=True,
                                      tie_word_embeddings=True),
        # head_dim 12 while hidden / heads = 8: Qwen3 sets it independently
        "qwen3": Qwen3Config(**_COMMON, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
                             num_attention_heads=5, num_key_value_heads=1, head_dim=12, rope_theta=1e6,
                             tie_word_embeddings=True),
        # layer 1 dense (mlp_only_layers), top-2 of 6 experts without renormalisation
        "qwen3_moe": Qwen3MoeConfig(**_COMMON, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                    num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                                    num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
                                    tie_word_embeddings=False),
        # every other layer sparse (decoder_sparse_step 2), top-3 of 4 renormalised
        "qwen3_moe-step2-norm": Qwen3MoeConfig(**_COMMON, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8, num_experts=4, num_experts_per_tok=3, norm_topk_prob=True,
                                               decoder_sparse_step=2, tie_word_embeddings=False),
    }


def write_tokenizer(folder: Path) -> None:
    """A 300-token byte-level BPE (ids 0-2 special) + ChatML template, saved by transformers."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=SPECIAL_TOKENS[BOS], eos_token=SPECIAL_TOKENS[EOS])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def write_checkpoint(folder: Path, config, *, seed: int = 0, max_shard_size: str | None = None, tokenizer: bool = True):
    """Random weights saved with transformers' own save_pretrained; returns the HF model (float32, eval)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF starts norms at 1 and biases at 0: make them tell apart too
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                param.copy_(1.0 * name.endswith("norm.weight") + 0.3 * torch.randn_like(param))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    if tokenizer:
        write_tokenizer(folder)
    return model


def prompt_ids(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (length,), generator=generator).tolist()  # no special tokens


@torch.inference_mode()
def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].float()


@torch.inference_mode()
def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' generate(do_sample=False), EOS not treated specially (the engine runs with ignore_eos)."""
    model.generation_config.eos_token_id = None
    output = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return output[0, len(ids):].tolist()


@torch.inference_mode()
def our_last_logits(loaded, ids: list[int], block_size: int, kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One prompt through our model over a fresh paged cache whose pages are in scrambled order."""
    num_blocks = -(-len(ids) // block_size)
    cache = PagedKVCache(loaded.config, num_blocks + 2, block_size, kv_dtype or loaded.model.dtype)
    table = list(reversed(range(num_blocks + 2)))[:num_blocks]
    batch = ForwardBatch.build([SequenceChunk(table, 0, len(ids))], block_size)
    return loaded.model(torch.tensor(ids), batch, cache)[0]


def engine_greedy(loaded, prompts: list[list[int]], max_tokens: int, block_size: int, kv_dtype=None) -> list[list[int]]:
    """All prompts prefilled, then decoded together by the engine's step loop."""
    engine = Engine(loaded, kv_cache_tokens=1024, block_size=block_size, kv_dtype=kv_dtype)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tokens = {f"r{i}": [engine.prefill(f"r{i}", ids, params).token_id] for i, ids in enumerate(prompts)}
    while engine.num_running:
        for out in engine.step():
            tokens[out.request_id].append(out.token_id)
    return [tokens[f"r{i}"] for i in range(len(prompts))]


# -- GGUF copies ------------------------------------------------------------------------------

_GGUF_ARCH = {"llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp applies it to Q and K."""
    halves = weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def _gguf_tensors(model, config) -> dict[str, np.ndarray]:
    """llama.cpp names for an HF model's weights (what convert_hf_to_gguf.py writes)."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    arch = config.model_type
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
             **{f"self_attn.{p}_proj.bias": f"attn_{g}.bias" for p, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))}}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf, ours in names.items():
            if prefix + hf in sd:
                out[f"blk.{i}.{ours}"] = sd[prefix + hf]
        if prefix + "mlp.experts.gate_up_proj" in sd:  # transformers 5 keeps experts fused in memory
            gate, up = np.split(sd[prefix + "mlp.experts.gate_up_proj"], 2, axis=1)
            out[f"blk.{i}.ffn_gate_exps.weight"], out[f"blk.{i}.ffn_up_exps.weight"] = gate, up
            out[f"blk.{i}.ffn_down_exps.weight"] = sd[prefix + "mlp.experts.down_proj"]
        if arch == "llama":  # the converter permutes Q and K rows, biases included
            for leaf in ("weight", "bias"):
                q, k = f"blk.{i}.attn_q.{leaf}", f"blk.{i}.attn_k.{leaf}"
                if q in out:
                    out[q] = llama_cpp_permute(out[q], config.num_attention_heads)
                    out[k] = llama_cpp_permute(out[k], config.num_key_value_heads)
    return out


def write_gguf(path: Path, model, config, tokenizer_folder: Path, quantize_q8: bool = False) -> None:
    """A GGUF of `model` as llama.cpp's converter lays it out, with the folder's tokenizer in its metadata."""
    arch = _GGUF_ARCH[config.model_type]
    writer = GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch == "qwen3moe":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_expert_weights_norm(config.norm_topk_prob)
    _add_tokenizer(writer, tokenizer_folder, config.vocab_size)
    for name, array in _gguf_tensors(model, config).items():
        if quantize_q8 and array.ndim == 2 and array.shape[-1] % 32 == 0 and "norm" not in name:
            writer.add_tensor(name, quantize(array, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer: GGUFWriter, folder: Path, vocab_size: int) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text())
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # llama.cpp pads unused ids the same way
    types = [5] * vocab_size  # unused
    for token, index in spec["model"]["vocab"].items():
        tokens[index], types[index] = token, 1
    for added in spec["added_tokens"]:
        tokens[added["id"]], types[added["id"]] = added["content"], 3
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_chat_template(CHAT_TEMPLATE)
