"""`pdserve bench engine` on tiny models and tiny sizes: the shape of its output, never its timings."""

import argparse
import importlib.util
import json
import re

import pytest

from loadtest import engine_bench
from shared.engine.block_matmul import default_kernel
from tests.engine.hf_checkpoints import family_configs, write_checkpoint

HEADER = ["case", "(tok/s)", "pdserve", "dense", "pdserve", "blocks", "transformers", "dense/HF", "blocks/HF", "goal"]
TINY_SIZES = ["--prompt-len", "24", "--batch-sizes", "1,3", "--decode-prompt-len", "8", "--decode-steps", "3", "--repeats", "2"]


def bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    engine_bench.register(parser)
    return engine_bench.run(parser.parse_args(argv))


def test_random_weights_give_engine_rows_only(tmp_path, capsys):
    result_file = tmp_path / "bench.json"
    assert bench(["--model", "tiny-llama", *TINY_SIZES, "--threads", "1", "--result-file", str(result_file)]) == 0
    out = capsys.readouterr().out
    assert "model tiny-llama, float32, 1 torch threads, medians of 2 runs" in out
    assert "transformers: tiny-llama has random weights" in out
    rows = [line for line in out.splitlines() if line.startswith(("prefill", "decode"))]
    assert [row.split(",")[0] for row in rows] == ["prefill", "decode", "decode"]
    assert "1 x 24 tokens" in rows[0] and "batch 3" in rows[2]
    expected_llama_cpp = "not installed" if importlib.util.find_spec("llama_cpp") is None else "prefill"
    assert f"llama.cpp (llama-cpp-python): {expected_llama_cpp}" in out
    result = json.loads(result_file.read_text())
    assert [row["name"] for row in result["rows"]] == ["prefill", "decode_b1", "decode_b3"]
    assert [row["tokens"] for row in result["rows"]] == [24, 3, 9]
    for row in result["rows"]:
        assert len(row["engine_s"]) == 2 and row["engine_tok_s"] > 0 and row["hf_tok_s"] is None


def test_hf_folder_model_gets_transformers_rows_and_ratios(tmp_path, capsys):
    folder = tmp_path / "llama"
    write_checkpoint(folder, family_configs()["llama"])
    result_file = tmp_path / "bench.json"
    assert bench(["--model", str(folder), *TINY_SIZES, "--batch-sizes", "1,32", "--threads", "1", "--result-file", str(result_file)]) == 0
    out = capsys.readouterr().out
    assert "pdserve blocks: not run (the model has no Q4_1/Q8_0 GGUF weights in float32)" in out
    table = out[out.index("case (tok/s)") :].splitlines()
    assert table[0].split() == HEADER
    prefill, b1, b32, b32_vs_b1 = table[1:5]
    assert prefill.rstrip().endswith(">= 1x") and b1.rstrip().endswith(">= 2x")
    assert b32_vs_b1.startswith("decode, batch 32 vs transformers b1") and b32_vs_b1.rstrip().endswith(">= 10x")
    for line in (prefill, b1, b32, b32_vs_b1):
        _dense, blocks, _hf, dense_ratio, blocks_ratio = line[36:].split()[:5]
        assert re.fullmatch(r"\d+\.\d\dx", dense_ratio) and blocks == blocks_ratio == "-", line
    result = json.loads(result_file.read_text())
    assert all(row["hf_tok_s"] > 0 and len(row["hf_s"]) == 2 and row["blocks_s"] == [] for row in result["rows"])


@pytest.mark.skipif(default_kernel() is None, reason="block kernel unavailable (no AVX2 or no compiler)")
def test_gguf_model_gets_a_blocks_column(tmp_path, capsys):
    result_file = tmp_path / "bench.json"
    assert bench(["--model", "smollm2-135m", *TINY_SIZES, "--no-transformers", "--threads", "1", "--result-file", str(result_file)]) == 0
    out = capsys.readouterr().out
    assert "pdserve blocks: the engine on the GGUF's Q4_1/Q8_0 weight blocks" in out
    table = out[out.index("case (tok/s)") :].splitlines()
    assert table[0].split() == HEADER
    for line in table[1:4]:
        dense, blocks = line[36:].split()[:2]
        assert float(dense) > 0 and float(blocks) > 0, line
    result = json.loads(result_file.read_text())
    assert all(len(row["blocks_s"]) == 2 and row["blocks_tok_s"] > 0 for row in result["rows"])
