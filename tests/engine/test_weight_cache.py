"""Fast restart: a GGUF's converted weights cached as safetensors, validated, rewritten when bad."""

import os

import pytest
import torch
from structlog.testing import capture_logs

from shared.engine.gguf_file import GgufFile
from shared.engine.loader import load_model
from shared.engine.weight_cache import CacheKey, WeightCache, default_cache_dir
from tests.engine.hf_checkpoints import hf_last_logits, our_last_logits, prompt_ids, write_checkpoint, write_gguf


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    """A Q8_0-quantized Qwen3 GGUF (dequantizing is what the cache saves)."""
    from transformers import Qwen3Config

    root = tmp_path_factory.mktemp("gguf")
    config = Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.3,
                         bos_token_id=0, eos_token_id=2, max_position_embeddings=256, tie_word_embeddings=False)
    hf = write_checkpoint(root / "hf", config)
    path = root / "qwen3-q8.gguf"
    write_gguf(path, hf, config, root / "hf", quantize_q8=True)
    return path


@pytest.fixture
def conversions(monkeypatch):
    """Counts conversions (GgufFile.converted_tensors calls): a cache hit must not convert."""
    calls = []
    original = GgufFile.converted_tensors

    def spy(self, config, names):
        calls.append(self.path)
        return original(self, config, names)

    monkeypatch.setattr(GgufFile, "converted_tensors", spy)
    return calls


def assert_same_weights(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def test_second_load_reads_the_cache(gguf_path, tmp_path, conversions):
    first_cache, second_cache = WeightCache(tmp_path), WeightCache(tmp_path)  # a restart: a fresh object
    first = load_model(gguf_path, weight_cache=first_cache)
    assert (first_cache.hits, first_cache.misses, len(conversions)) == (0, 1, 1)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [first_cache.path_for(CacheKey.of(gguf_path, torch.float32)).name]
    second = load_model(gguf_path, weight_cache=second_cache)
    assert (second_cache.hits, second_cache.misses, len(conversions)) == (1, 0, 1)  # no dequantization
    assert_same_weights(first, second)
    ids = prompt_ids(37, 1)
    assert torch.equal(our_last_logits(first, ids, 16), our_last_logits(second, ids, 16))


def test_cached_q8_model_still_tracks_hf(gguf_path, tmp_path):
    """Sanity of what is cached: Q8_0 rounding keeps logits near the float32 HF model's."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent / "hf", dtype=torch.float32).eval()
    load_model(gguf_path, weight_cache=WeightCache(tmp_path))
    cached = load_model(gguf_path, weight_cache=WeightCache(tmp_path))
    ids = prompt_ids(37, 1)
    reference = hf_last_logits(hf, ids)
    assert (our_last_logits(cached, ids, 4) - reference).abs().max() < 0.05 * reference.abs().max()


def test_dtype_is_part_of_the_key(gguf_path, tmp_path, conversions):
    cache = WeightCache(tmp_path)
    f32 = load_model(gguf_path, weight_cache=cache)
    bf16 = load_model(gguf_path, dtype=torch.bfloat16, weight_cache=cache)
    again = load_model(gguf_path, dtype=torch.bfloat16, weight_cache=cache)
    assert (cache.hits, cache.misses, len(list(tmp_path.glob("*.safetensors")))) == (1, 2, 2)
    assert bf16.model.dtype == again.model.dtype == torch.bfloat16
    assert torch.equal(bf16.model.embed_tokens.weight, f32.model.embed_tokens.weight.to(torch.bfloat16))


@pytest.mark.parametrize(
    "damage, problem", [("truncate", "unreadable"), ("flip_a_data_byte", "checksum mismatch"), ("garbage", "unreadable")]
)
def test_corrupt_cache_file_is_ignored_and_rewritten(gguf_path, tmp_path, conversions, damage, problem):
    reference = load_model(gguf_path, weight_cache=WeightCache(tmp_path))
    path = WeightCache(tmp_path).path_for(CacheKey.of(gguf_path, torch.float32))
    data = bytearray(path.read_bytes())
    match damage:
        case "truncate":
            data = data[: len(data) // 2]
        case "flip_a_data_byte":
            data[-100] ^= 0xFF
        case "garbage":
            data = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(data))
    cache = WeightCache(tmp_path)
    with capture_logs() as logs:
        reloaded = load_model(gguf_path, weight_cache=cache)
    assert (cache.hits, cache.misses, len(conversions)) == (0, 1, 2)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["weight_cache_invalid"] and problem in warnings[0]["problem"]
    assert_same_weights(reference, reloaded)
    third = WeightCache(tmp_path)
    load_model(gguf_path, weight_cache=third)
    assert (third.hits, third.misses) == (1, 0)  # the rewritten file is good


def test_edited_source_is_not_served_stale(gguf_path, tmp_path, conversions):
    cache = WeightCache(tmp_path)
    load_model(gguf_path, weight_cache=cache)
    stat = gguf_path.stat()
    os.utime(gguf_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # as if rewritten
    try:
        load_model(gguf_path, weight_cache=cache)
    finally:
        os.utime(gguf_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (cache.hits, cache.misses) == (0, 2)


def test_unwritable_cache_only_costs_the_speed_up(gguf_path, tmp_path, conversions):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    cache = WeightCache(blocker / "weights")
    with capture_logs() as logs:
        loaded = load_model(gguf_path, weight_cache=cache)
    assert loaded.config.architecture == "qwen3" and cache.misses == 1
    assert "weight_cache_not_written" in [e["event"] for e in logs]
    assert not list(tmp_path.glob("**/.tmp-*"))


def test_cache_folder_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PDSERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pdserve" / "weights"
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" and WeightCache().directory == tmp_path / "mine"
