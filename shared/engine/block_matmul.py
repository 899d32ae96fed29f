"""The Python side of block_matmul.c: building it for this machine and calling it on torch tensors.

    default_kernel() -> BlockKernel | None     the AVX2 build, or None (reason logged once)
    build_kernel(vectorized) -> BlockKernel    either build; the scalar one is the portable reference
    kernel.matmul(x, weight) -> y              y[M, out] = x[M, in] . W^T, W a BlockWeight

The source is compiled at first use (native_build.py) and loaded with ctypes, which
releases the GIL for the call. Threads: when PyTorch's intra-op pool is OpenMP, the
library is linked against the very OpenMP runtime PyTorch loaded (found in
/proc/self/maps), so the kernel's parallel region runs on PyTorch's own pool with
`torch.get_num_threads()` threads; a second OpenMP runtime would fight it for the cores.
Otherwise the kernel runs on the calling thread alone.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

import structlog
import torch

from shared.engine.block_weights import BlockWeight
from shared.engine.native_build import BuildError, build_library

SOURCE = Path(__file__).with_name("block_matmul.c")
_BASE_FLAGS = ["-O3", "-std=gnu11"]
_VECTOR_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
_VECTOR_CPU_FLAGS = {"avx2", "fma", "f16c"}
_OPENMP_RUNTIME = re.compile(r"lib(gomp|iomp5|omp)[-.]")
_ERRORS = {1: "unknown block format", 2: "input size not a multiple of 32", 3: "out of memory"}

log = structlog.get_logger()


class BlockKernel:
    """One loaded build of block_matmul.c."""

    def __init__(self, path: Path, threaded: bool):
        library = ctypes.CDLL(str(path))
        self._matmul = library.block_matmul
        self._matmul.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ]  # fmt: skip
        self._matmul.restype = ctypes.c_int
        self.vectorized = bool(library.block_matmul_vectorized())
        self.threaded = threaded
        self.path = path

    def matmul(self, x: torch.Tensor, weight: BlockWeight) -> torch.Tensor:
        """x: [M, in] float32 (CPU) -> [M, out] float32."""
        return self.bind(weight)(x)

    def bind(self, weight: BlockWeight) -> Callable[[torch.Tensor], torch.Tensor]:
        """`lambda x: matmul(x, weight)` with the weight's arguments prepared once: decode calls it once per linear per token."""
        call, threaded = self._matmul, self.threaded
        blocks, in_features, out_features, block_format = weight.blocks, weight.in_features, weight.out_features, int(weight.format)
        blocks_ptr = blocks.data_ptr()

        def matmul(x: torch.Tensor) -> torch.Tensor:
            if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != in_features:
                raise ValueError(f"x must be float32 CPU [M, {in_features}], got {x.dtype} {x.device} {tuple(x.shape)}")
            x = x.contiguous()
            rows = x.shape[0]
            y = torch.empty(rows, out_features)
            if rows == 0:
                return y
            threads = torch.get_num_threads() if threaded else 1
            status = call(x.data_ptr(), rows, in_features, blocks_ptr, out_features, block_format, y.data_ptr(), threads)
            if status:
                raise RuntimeError(f"block_matmul: {_ERRORS.get(status, f'error {status}')}")
            return y

        matmul.blocks = blocks  # type: ignore[attr-defined]  # the memory blocks_ptr points into lives as long as the closure
        return matmul


def build_kernel(vectorized: bool) -> BlockKernel:
    """Compiles (first time) and loads one build. Raises BuildError without a working compiler."""
    runtime = torch_openmp_runtime()
    flags = [*_BASE_FLAGS, *(_VECTOR_FLAGS if vectorized else [])]
    if runtime is not None:
        flags.append("-fopenmp")
    path = build_library(SOURCE, flags, [] if runtime is None else [str(runtime)])
    return BlockKernel(path, threaded=runtime is not None)


@cache
def default_kernel() -> BlockKernel | None:
    """The AVX2 kernel for this process, or None when the CPU or toolchain cannot run it (logged once)."""
    missing = _VECTOR_CPU_FLAGS - cpu_flags()
    if missing:
        reason = f"CPU lacks {', '.join(sorted(missing))}"
    else:
        try:
            kernel = build_kernel(vectorized=True)
        except (BuildError, OSError) as error:
            reason = str(error)
        else:
            if not kernel.threaded:
                log.info("block_matmul_single_threaded", reason="PyTorch's intra-op pool is not an OpenMP runtime we can share")
            return kernel
    log.warning("block_matmul_unavailable", reason=reason, fallback="dense float32 matmuls")
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def torch_openmp_runtime() -> Path | None:
    """The OpenMP runtime file PyTorch has loaded, when its intra-op pool is OpenMP (None otherwise)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    mapped = {line.split(maxsplit=5)[5] for line in maps.splitlines() if line.count(" ") >= 5 and "/" in line}
    runtimes = {Path(path) for path in mapped if _OPENMP_RUNTIME.match(Path(path).name)}
    return runtimes.pop() if len(runtimes) == 1 else None
