"""Our Llama / Qwen3 / Qwen3-MoE code against HF transformers, on random checkpoints transformers wrote itself."""

import dataclasses

import pytest
import torch

from shared.engine.loader import load_model
from shared.engine.moe import dispatch
from shared.engine.presets import TINY_LLAMA_CONFIG, TINY_MOE_CONFIG
from shared.engine.weight_cache import WeightCache
from tests.engine.hf_checkpoints import (
    engine_greedy,
    family_configs,
    hf_greedy,
    hf_last_logits,
    our_last_logits,
    prompt_ids,
    write_checkpoint,
    write_gguf,
)

# float32 on both sides, the same weights; what differs is summation order (matmuls, attention,
# the MoE combine): observed max |diff| <= 1e-5 on logits of magnitude 4-7. A real bug (a norm,
# head or RoPE mix-up, wrong routing) moves logits by > 0.03 (even Q8_0 rounding does).
LOGITS_ATOL = 1e-4
FAMILIES = list(family_configs())
PROMPT_LENGTHS = (37, 5, 23)  # 37 crosses pages of 4 and of 16, 5 barely does


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (folder, HF model); each written once by transformers' save_pretrained."""
    root = tmp_path_factory.mktemp("families")
    return {name: (root / name, write_checkpoint(root / name, config)) for name, config in family_configs().items()}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return {name: load_model(folder) for name, (folder, _) in checkpoints.items()}


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("family", FAMILIES)
def test_last_token_logits_match_hf(checkpoints, loaded, family, block_size):
    ids = prompt_ids(37, seed=1)
    ours = our_last_logits(loaded[family], ids, block_size)
    theirs = hf_last_logits(checkpoints[family][1], ids)
    assert ours.shape == (320,) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= LOGITS_ATOL
    assert theirs.std() > 1.0  # the wide init: logits far from uniform, so argmax is meaningful
    assert ours.argmax() == theirs.argmax()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_hf_generate(checkpoints, loaded, family):
    prompts = [prompt_ids(n, seed=n) for n in PROMPT_LENGTHS]
    ours = engine_greedy(loaded[family], prompts, max_tokens=16, block_size=4)  # three sequences per step
    theirs = [hf_greedy(checkpoints[family][1], ids, max_new_tokens=16) for ids in prompts]
    assert ours == theirs


def test_loaded_configs_carry_the_family(loaded):
    llama, qwen3, moe = loaded["llama"].config, loaded["qwen3"].config, loaded["qwen3_moe"].config
    assert (llama.architecture, llama.qk_norm, llama.num_heads, llama.num_kv_heads) == ("llama", False, 6, 3)
    assert (qwen3.architecture, qwen3.qk_norm, qwen3.head_dim, qwen3.hidden_size // qwen3.num_heads) == ("qwen3", True, 12, 8)
    assert loaded["llama-5x1-bias"].config.attention_bias and loaded["llama-5x1-bias"].model.lm_head is None
    assert (moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob, moe.mlp_only_layers) == (6, 2, False, (1,))
    assert [moe.is_moe_layer(i) for i in range(3)] == [True, False, True]
    step2 = loaded["qwen3_moe-step2-norm"].config
    assert [step2.is_moe_layer(i) for i in range(4)] == [False, True, False, True] and step2.norm_topk_prob


@pytest.mark.parametrize("family", ["llama", "llama-5x1-bias", "qwen3", "qwen3_moe-step2-norm"])
def test_gguf_copy_matches_hf(checkpoints, family, tmp_path):
    """The same weights as llama.cpp lays them out (llama's Q/K rows permuted, experts stacked)."""
    folder, hf = checkpoints[family]
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, hf, hf.config, folder)
    ours = load_model(path, weight_cache=WeightCache(tmp_path / "cache"))
    assert ours.config.architecture == hf.config.model_type
    ids = prompt_ids(37, seed=1)
    assert (our_last_logits(ours, ids, 16) - hf_last_logits(hf, ids)).abs().max().item() <= LOGITS_ATOL


# -- mixture of experts (sharded across real ranks: tests/engine/test_sharded_model.py) --------


def test_dispatch_covers_every_assignment_once():
    experts = torch.tensor([[3, 0], [0, 5], [5, 3], [1, 0]])  # [T=4, k=2]
    groups = dispatch(experts.reshape(-1), num_experts=6)
    assert [g.tolist() for g in groups] == [[1, 2, 7], [6], [], [0, 5], [], [3, 4]]
    assert sorted(torch.cat(groups).tolist()) == list(range(8))


def test_router_renormalises_only_when_asked(loaded):
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    normed = loaded["qwen3_moe-step2-norm"].model.moe_blocks()[0]
    weights, experts = normed.route(x)
    assert experts.shape == (7, 3) and torch.allclose(weights.sum(-1), torch.ones(7))
    plain = loaded["qwen3_moe"].model.moe_blocks()[0]
    weights, _ = plain.route(torch.randn(7, 48, generator=torch.Generator().manual_seed(0)))
    assert (weights.sum(-1) < 1 - 1e-3).all()  # top-2 of 6 softmax probabilities, left as they are


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architecture": "gpt2"}, "supported: llama, qwen3, qwen3_moe"),
        ({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}, "has no experts"),
    ],
)
def test_dense_config_validation(change, message):
    with pytest.raises(ValueError) as info:
        dataclasses.replace(TINY_LLAMA_CONFIG, **change)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_experts": 0}, "num_experts must be positive"),
        ({"num_experts_per_tok": 9}, "exceeds num_experts"),
        ({"mlp_only_layers": (0, 2)}, "mlp_only_layers [2]"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step must be positive"),
    ],
)
def test_moe_config_validation(change, message):
    with pytest.raises(ValueError) as info:
        dataclasses.replace(TINY_MOE_CONFIG, **change)
    assert message in str(info.value)


def test_fingerprint_covers_family_fields():
    base = TINY_MOE_CONFIG.fingerprint()
    for change in ({"norm_topk_prob": False}, {"num_experts_per_tok": 3}, {"mlp_only_layers": (1,)},
                   {"moe_intermediate_size": 16}, {"architecture": "qwen3", "num_experts": 0, "num_experts_per_tok": 0,
                                                    "moe_intermediate_size": 0, "norm_topk_prob": False}):
        assert TINY_MOE_CONFIG.replace(**change).fingerprint() != base, change
    qwen3 = TINY_LLAMA_CONFIG.replace(architecture="qwen3")
    assert qwen3.fingerprint() != TINY_LLAMA_CONFIG.fingerprint() and qwen3.qk_norm
    assert TINY_LLAMA_CONFIG.replace(attention_bias=True).fingerprint() != TINY_LLAMA_CONFIG.fingerprint()
    # lists from JSON are normalised, so equal configs hash equally
    assert TINY_MOE_CONFIG.replace(mlp_only_layers=[1, 0, 1]).mlp_only_layers == (0, 1)
    assert TINY_MOE_CONFIG.replace(mlp_only_layers=[1, 0]).fingerprint() == TINY_MOE_CONFIG.replace(mlp_only_layers=(0, 1)).fingerprint()


# -- presets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, architecture", [("tiny-qwen3", "qwen3"), ("tiny-moe", "qwen3_moe")])
def test_tiny_presets_generate_deterministically(name, architecture):
    first, second = load_model(name), load_model(name)
    assert first.config.architecture == architecture and first.tokenizer.vocab_size == first.config.vocab_size
    ids = first.tokenizer.encode("The quick brown fox jumps over the lazy dog, again and again and again.")
    prompts = [ids, ids[:7]]
    together = engine_greedy(first, prompts, max_tokens=12, block_size=4)
    assert together == engine_greedy(second, prompts, max_tokens=12, block_size=4)  # fixed seed, same weights
    assert together[1] == engine_greedy(first, prompts[1:], max_tokens=12, block_size=16)[0]  # batch mates change nothing
    assert len(set(together[0])) > 1
