"""block_matmul.c against F.linear on the dequantized weights: both builds, both formats, irregular shapes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from shared.engine.block_matmul import BlockKernel, build_kernel, cpu_flags, default_kernel
from shared.engine.block_weights import BlockFormat, BlockWeight, stack_rows
from shared.engine.native_build import find_compiler

# A float32 dot product of K terms is off by at most ~K * 2^-24 * sum|x_j w_j| (any summation
# order); the kernel's order (8 lanes, per-block partial sums, the Q4_1 offset term
# m * sum(x) apart) differs from oneDNN/MKL's. 1e-5 * sum|x_j w_j| sits between what we
# observe (<= 2e-7) and that worst case for K = 1536 (9e-5), and catches any wrong weight.
RELATIVE_TOLERANCE = 1e-5

GGML_TYPES = {BlockFormat.Q4_1: GGMLQuantizationType.Q4_1, BlockFormat.Q8_0: GGMLQuantizationType.Q8_0}


def random_blocks(block_format: BlockFormat, rows: int, in_features: int, seed: int) -> BlockWeight:
    """Random weights in `block_format`; some scales are float16 subnormals and some negative, as real files have."""
    rng = np.random.default_rng(seed)
    num_blocks = rows * in_features // 32
    scales = rng.normal(0, 0.02, size=(num_blocks, 1)).astype(np.float16)
    scales[::7] = np.float16(3e-6)  # subnormal in float16 (below 6.1e-5)
    if block_format is BlockFormat.Q4_1:
        offsets = rng.normal(0, 0.1, size=(num_blocks, 1)).astype(np.float16)
        offsets[::5] = -np.float16(4e-7)
        quants = rng.integers(0, 256, size=(num_blocks, 16), dtype=np.uint8)
        raw = np.concatenate([scales.view(np.uint8), offsets.view(np.uint8), quants], axis=1)
    else:
        quants = rng.integers(-128, 128, size=(num_blocks, 32), dtype=np.int8)
        raw = np.concatenate([scales.view(np.uint8), quants.view(np.uint8)], axis=1)
    return BlockWeight(block_format, torch.from_numpy(raw.reshape(rows, -1).copy()), in_features)


def assert_matches_dense(kernel: BlockKernel, weight: BlockWeight, x: torch.Tensor) -> None:
    dense = weight.dequantize()
    ours = kernel.matmul(x, weight)
    reference = F.linear(x.double(), dense.double())  # the exact product, near enough
    bound = F.linear(x.abs().double(), dense.abs().double())  # sum_j |x_j w_j|
    assert ours.shape == (x.shape[0], weight.out_features) and ours.dtype == torch.float32
    worst = ((ours.double() - reference).abs() / bound.clamp_min(1e-30)).max().item()
    assert worst <= RELATIVE_TOLERANCE, worst
    # and as close to float32 F.linear as the rounding of the two allows
    torch.testing.assert_close(ours, F.linear(x, dense), rtol=0, atol=RELATIVE_TOLERANCE * bound.max().item())


@pytest.fixture(scope="module")
def vector_kernel() -> BlockKernel:
    if not {"avx2", "fma", "f16c"} <= cpu_flags() or find_compiler() is None:
        pytest.skip("no AVX2/FMA/F16C CPU or no compiler")
    return build_kernel(vectorized=True)


@pytest.fixture(scope="module")
def scalar_kernel() -> BlockKernel:
    if find_compiler() is None:
        pytest.skip("no C compiler")
    return build_kernel(vectorized=False)


def test_builds_are_the_ones_asked_for(vector_kernel, scalar_kernel):
    assert vector_kernel.vectorized and not scalar_kernel.vectorized
    assert vector_kernel.path != scalar_kernel.path


@pytest.mark.parametrize("block_format", list(BlockFormat))
@pytest.mark.parametrize(("rows", "out_features", "in_features"), [(1, 1, 32), (1, 97, 576), (3, 33, 96), (5, 64, 1536), (7, 13, 64), (13, 31, 160)])
def test_vector_kernel_matches_dense(vector_kernel, block_format, rows, out_features, in_features):
    weight = random_blocks(block_format, out_features, in_features, seed=rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    assert_matches_dense(vector_kernel, weight, x)


@pytest.mark.parametrize("block_format", list(BlockFormat))
@pytest.mark.parametrize(("rows", "out_features", "in_features"), [(1, 7, 64), (3, 33, 96), (6, 5, 576)])
def test_scalar_kernel_matches_dense(scalar_kernel, block_format, rows, out_features, in_features):
    weight = random_blocks(block_format, out_features, in_features, seed=rows + out_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    assert_matches_dense(scalar_kernel, weight, x)


def test_threads_split_rows_without_changing_results(vector_kernel):
    """Each output is one thread's sum in a fixed order: bit-identical for any thread count."""
    if not vector_kernel.threaded:
        pytest.skip("PyTorch's intra-op pool is not OpenMP here")
    weight = random_blocks(BlockFormat.Q4_1, 101, 576, seed=3)
    x = torch.randn(4, 576)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = vector_kernel.matmul(x, weight)
        torch.set_num_threads(2)
        shared = vector_kernel.matmul(x, weight)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(alone, shared)


def test_bad_input_is_refused_before_the_kernel(vector_kernel):
    weight = random_blocks(BlockFormat.Q8_0, 8, 64, seed=0)
    with pytest.raises(ValueError, match="float32 CPU"):
        vector_kernel.matmul(torch.randn(2, 64, dtype=torch.float64), weight)
    with pytest.raises(ValueError, match=r"\[M, 64\]"):
        vector_kernel.matmul(torch.randn(2, 96), weight)
    assert vector_kernel.matmul(torch.randn(0, 64), weight).shape == (0, 8)


def test_non_contiguous_input_is_copied(vector_kernel):
    weight = random_blocks(BlockFormat.Q4_1, 9, 64, seed=1)
    wide = torch.randn(3, 128)
    x = wide[:, ::2]  # [3, 64], stride 2
    torch.testing.assert_close(vector_kernel.matmul(x, weight), vector_kernel.matmul(x.contiguous(), weight), rtol=0, atol=0)


def test_default_kernel_is_the_vector_build_where_the_cpu_has_avx2():
    kernel = default_kernel()
    if {"avx2", "fma", "f16c"} <= cpu_flags() and find_compiler() is not None:
        assert kernel is not None and kernel.vectorized
    else:
        assert kernel is None


@pytest.mark.parametrize("block_format", list(BlockFormat))
def test_dequantize_is_gguf_py_bit_for_bit(block_format):
    weight = random_blocks(block_format, 6, 96, seed=11)
    reference = dequantize(weight.blocks.numpy(), GGML_TYPES[block_format])
    assert torch.equal(weight.dequantize(), torch.from_numpy(np.ascontiguousarray(reference)))


def test_row_selection_and_stacking_keep_blocks_whole():
    a, b = random_blocks(BlockFormat.Q4_1, 5, 64, seed=1), random_blocks(BlockFormat.Q4_1, 3, 64, seed=2)
    stacked = stack_rows([a, b])
    assert stacked.shape == (8, 64)
    assert torch.equal(stacked.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    rows = torch.tensor([4, 0, 2])
    assert torch.equal(a.select_rows(rows).dequantize(), a.dequantize()[rows])
    assert a.matches(a.dequantize()) and a.matches(a.dequantize(), row_step=2)
    changed = a.dequantize()
    changed[4, 63] += 1.0  # the last row: checked whatever the step
    assert not a.matches(changed, row_step=3)
    assert not a.matches(a.dequantize().double())
    with pytest.raises(ValueError, match="one format"):
        stack_rows([a, random_blocks(BlockFormat.Q8_0, 2, 64, seed=3)])


def test_block_weight_refuses_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 32"):
        BlockWeight(BlockFormat.Q8_0, torch.zeros(2, 34, dtype=torch.uint8), 48)
    with pytest.raises(ValueError, match=r"uint8 \[out, 40\]"):
        BlockWeight(BlockFormat.Q4_1, torch.zeros(2, 34, dtype=torch.uint8), 64)
