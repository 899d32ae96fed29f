"""Compiling the block kernel at first use: cached by content, atomic under concurrent builds, dense fallback without a compiler."""

import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from shared.engine import block_matmul
from shared.engine.native_build import BuildError, build_library, find_compiler
from shared.engine.prepack import prepacked, uses_block_weights

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C compiler")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "kernels"
    monkeypatch.setenv("PDSERVE_KERNEL_CACHE_DIR", str(directory))
    return directory


def test_built_once_then_reused(cache_dir):
    first = build_library(block_matmul.SOURCE, ["-O2"], [])
    modified = first.stat().st_mtime_ns
    again = build_library(block_matmul.SOURCE, ["-O2"], [])
    assert again == first and again.stat().st_mtime_ns == modified
    assert first.parent == cache_dir and first.name.startswith("block_matmul-") and first.suffix == ".so"
    other_flags = build_library(block_matmul.SOURCE, ["-O1"], [])
    assert other_flags != first  # flags are part of the key
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([first.name, other_flags.name])  # no temporaries left


def test_edited_source_gets_its_own_library(cache_dir, tmp_path):
    source = tmp_path / "kernel.c"
    source.write_text("int answer(void) { return 41; }\n")
    before = build_library(source, ["-O2"], [])
    source.write_text("int answer(void) { return 42; }\n")
    assert build_library(source, ["-O2"], []) != before


def test_concurrent_builds_each_load_a_whole_library(cache_dir):
    script = (
        "import ctypes; from shared.engine import block_matmul; from shared.engine.native_build import build_library;"
        "path = build_library(block_matmul.SOURCE, ['-O3', '-DCONCURRENT_TEST'], []);"
        "print(ctypes.CDLL(str(path)).block_matmul_vectorized())"
    )
    workers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [worker.communicate(timeout=120)[0].strip() for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 4
    assert outputs == ["0"] * 4  # no -mavx2 in the flags: the scalar build
    assert len(list(cache_dir.iterdir())) == 1


def test_compiler_errors_are_reported(cache_dir, tmp_path):
    source = tmp_path / "broken.c"
    source.write_text("int broken(void) { return }\n")
    with pytest.raises(BuildError, match="failed"):
        build_library(source, ["-O2"], [])


def test_without_a_compiler_the_engine_stays_dense(cache_dir, monkeypatch, smollm2):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with structlog.testing.capture_logs() as logs:
        kernel = block_matmul.default_kernel.__wrapped__()
    assert kernel is None
    assert [entry["event"] for entry in logs] == ["block_matmul_unavailable"]
    assert "/nonexistent/cc" in logs[0]["reason"]
    monkeypatch.setattr("shared.engine.prepack.default_kernel", lambda: None)
    fresh = type(smollm2.model).from_state_dict(smollm2.config, dict(smollm2.model.state_dict()))  # not yet twinned
    assert smollm2.block_weights and not uses_block_weights(prepacked(fresh, smollm2.block_weights))
