"""float32 and bfloat16, for weights and for the KV cache, chosen separately."""

import pytest
import torch

from shared.engine.dtypes import default_dtype, parse_dtype
from shared.engine.engine import Engine
from shared.engine.loader import load_model
from shared.engine.sampling import SamplingParams
from tests.engine.hf_checkpoints import engine_greedy, family_configs, our_last_logits, prompt_ids, write_checkpoint

# bf16 keeps 8 significant bits: observed max |diff| up to 5% of the largest |logit| with
# bf16 weights on these 3-layer models (under 2% with only the KV cache in bf16).
BF16_RELATIVE_ATOL = 0.1
COMBOS = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtypes")
    for name in ("llama", "qwen3", "qwen3_moe"):
        write_checkpoint(root / name, family_configs()[name])
    return root


def test_default_dtype_per_device():
    assert default_dtype("cpu") == torch.float32 and default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype("cuda") == torch.bfloat16 and default_dtype("cuda:1") == torch.bfloat16
    assert parse_dtype(None) == parse_dtype("auto") == torch.float32
    assert parse_dtype("auto", "cuda") == torch.bfloat16
    assert parse_dtype("bf16") == parse_dtype("bfloat16") == parse_dtype(torch.bfloat16) == torch.bfloat16
    assert parse_dtype("fp32") == parse_dtype("float32") == torch.float32
    for bad in ("float16", torch.float16, "int8"):
        with pytest.raises(ValueError) as info:
            parse_dtype(bad)
        assert "bfloat16" in str(info.value) and "float32" in str(info.value)


def test_bf16_weights_are_bf16_throughout(folders):
    loaded = load_model(folders / "qwen3_moe", dtype="bf16")
    assert loaded.model.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.rotary.cos.dtype == torch.float32  # tables stay exact, cast per use
    engine = Engine(loaded, kv_cache_tokens=256, block_size=16)
    assert engine.kv_dtype == torch.bfloat16  # the KV cache follows the weights unless told otherwise
    assert Engine(loaded, kv_cache_tokens=256, kv_dtype=torch.float32).kv_cache.key.dtype == torch.float32


@pytest.mark.parametrize("weights, kv", COMBOS, ids=["f32-w_bf16-kv", "bf16-w_f32-kv", "bf16-w_bf16-kv"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_bf16_stays_close_to_float32(folders, family, weights, kv):
    reference_model, model = load_model(folders / family), load_model(folders / family, dtype=weights)
    for seed in (1, 2):
        ids = prompt_ids(37, seed)
        reference = our_last_logits(reference_model, ids, block_size=4)
        logits = our_last_logits(model, ids, block_size=4, kv_dtype=kv)
        assert logits.dtype == torch.float32
        assert (logits - reference).abs().max() <= BF16_RELATIVE_ATOL * reference.abs().max()
        assert logits.argmax() in reference.topk(3).indices  # greedy may differ, but only between close candidates


def test_bf16_engine_runs_and_repeats_itself(folders):
    loaded = load_model(folders / "qwen3", dtype=torch.bfloat16)
    prompts = [prompt_ids(n, n) for n in (37, 5, 23)]
    first = engine_greedy(loaded, prompts, max_tokens=16, block_size=4, kv_dtype=torch.bfloat16)
    assert first == engine_greedy(loaded, prompts, max_tokens=16, block_size=4, kv_dtype=torch.bfloat16)
    assert all(len(tokens) == 16 and all(0 <= t < 320 for t in tokens) for tokens in first)
    float32 = engine_greedy(load_model(folders / "qwen3"), prompts, max_tokens=16, block_size=4)
    assert [tokens[0] for tokens in first] == [tokens[0] for tokens in float32]


def test_kv_dtype_sets_the_hand_off_size(folders):
    loaded = load_model(folders / "llama")  # float32 weights
    f32_kv = Engine(loaded, kv_cache_tokens=256, block_size=16)
    bf16_kv = Engine(loaded, kv_cache_tokens=256, block_size=16, kv_dtype=torch.bfloat16)
    assert f32_kv.kv_bytes_per_token == 2 * bf16_kv.kv_bytes_per_token == 3 * 2 * 3 * 8 * 4
    bf16_kv.prefill("a", prompt_ids(21, 0), SamplingParams(temperature=0.0, max_tokens=2))
    assert bf16_kv.export_kv("a").dtype == torch.bfloat16
