import dataclasses

import numpy as np
import pytest
import torch

from shared.engine.gguf_file import GgufFile, unpermute_rope_rows
from shared.engine.loader import load_model, load_model_config, random_weights
from shared.engine.presets import TINY_LLAMA_CONFIG, list_models
from tests.oracle import gguf_path


def test_presets_and_unknown_names():
    assert list_models() == ["smollm2-135m", "tiny-llama", "tiny-moe", "tiny-qwen3", "wide-llama", "wide-moe"]
    for loader in (load_model, load_model_config):
        with pytest.raises(ValueError) as info:
            loader("no-such-model")
        assert "smollm2-135m" in str(info.value) and "tiny-llama" in str(info.value)


def test_smollm2_config_from_metadata(smollm2):
    config = load_model_config("smollm2-135m")
    assert config == smollm2.config
    expected = dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,),
    )
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert smollm2.model.lm_head is None  # tied: the head is the embedding matrix


def test_fingerprint_names_architecture_and_weights(smollm2, tiny):
    fp = smollm2.config.fingerprint()
    assert len(fp) == 16 and fp == load_model_config("smollm2-135m").fingerprint()
    assert fp != tiny.config.fingerprint()
    assert fp != smollm2.config.replace(weights_id="gguf:other").fingerprint()
    assert fp != smollm2.config.replace(num_kv_heads=1).fingerprint()
    # Token ids and context length do not change the KV a prompt produces.
    assert fp == smollm2.config.replace(eos_token_ids=(0, 2), max_position_embeddings=2048).fingerprint()


@pytest.mark.parametrize(
    "change", [{"num_heads": 8, "num_kv_heads": 3}, {"head_dim": 63}, {"num_layers": 0}, {"eos_token_ids": ()},
               {"bos_token_id": 49152}, {"rms_norm_eps": 0.0}],
)
def test_config_validation(change):
    with pytest.raises(ValueError):
        dataclasses.replace(TINY_LLAMA_CONFIG, **change)


def test_random_weights_are_deterministic_and_wide():
    first = random_weights(TINY_LLAMA_CONFIG, seed=0, std=0.3)
    second = random_weights(TINY_LLAMA_CONFIG, seed=0, std=0.3)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first["layers.0.attn.q_proj.weight"].std().item() == pytest.approx(0.3, rel=0.1)
    assert torch.equal(first["norm.weight"], torch.ones(64))


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp applies it to Q and K."""
    halves = weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def test_unpermute_inverts_llama_cpp():
    weight = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)
    assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(weight, 3), 3), weight)


def test_gguf_tensor_shapes_are_pytorch_order():
    gguf = GgufFile(gguf_path())
    assert gguf.tensor("blk.0.attn_k.weight").shape == (192, 576)  # [out, in]
    assert gguf.tensor("blk.0.ffn_down.weight").shape == (576, 1536)
    assert gguf.tensor("token_embd.weight").shape == (49152, 576)
    assert not gguf.has_tensor("output.weight")
