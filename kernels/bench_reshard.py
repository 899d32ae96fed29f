"""Re-shard benchmarks: `python -m kernels.bench_reshard [--tokens 4096] [--repeats 7]`.

(b) CPU: the torch re-shard path (prefill gather, decoder scatter) against a plain
    `copy_` of the same number of bytes; prints medians and the throughput ratio.
(c) CUDA: the Triton scatter kernel's GB/s against a device-to-device copy of the same
    bytes (skipped cleanly without CUDA).

The model shape is smollm2-135m's KV (30 layers, 9 query heads, 3 KV heads, head_dim 64).
GB/s counts the bytes moved once (the payload), for the kernel and for the copy alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from shared.reshard.gather import gather_pair_buffers
from shared.reshard.scatter import scatter_pair_buffers
from shared.kv_spec import KvSpec, dtype_from_name
from shared.layouts import DecoderLayout, Layout, PrefillLayout
from shared.transfer_plan import plan_transfer

SMOLLM2 = KvSpec("smollm2-135m", num_layers=30, num_q_heads=9, num_kv_heads=3, head_dim=64, page_size=16)


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    src: Layout
    dst: Layout
    src_page: int = 16
    dst_page: int = 16
    dst_memory_layout: str = "NHD"


SCENARIOS = (
    Scenario("tp=3 -> tp=1 (merge heads)", PrefillLayout(tp=3), DecoderLayout()),
    Scenario("tp=1 -> dp=2,tp=3 (split heads)", PrefillLayout(), DecoderLayout(dp=2, tp=3)),
    Scenario("pp=2 -> tp=3, page 16 -> 32, HND", PrefillLayout(pp=2), DecoderLayout(tp=3), 16, 32, "HND"),
    Scenario("tp=3 -> tp=9 (replicate x3), page 16 -> 8", PrefillLayout(tp=3), DecoderLayout(tp=9), 16, 8),
)


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median wall time of each function, measured round-robin so they share the machine's noise."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm up
        fn()
    sync()
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def build(scenario: Scenario, dtype: torch.dtype, num_tokens: int, device: str, shuffled: bool = True):
    """Source cache with the request's pages shuffled, a destination cache, the plan and the pair buffers."""
    src_spec = dataclasses.replace(SMOLLM2, dtype=dtype, page_size=scenario.src_page)
    dst_spec = dataclasses.replace(SMOLLM2, dtype=dtype, page_size=scenario.dst_page, memory_layout=scenario.dst_memory_layout)
    plan = plan_transfer(scenario.src, scenario.dst, src_spec, dst_spec)
    generator = torch.Generator().manual_seed(0)
    src_pages = -(-num_tokens // src_spec.page_size)
    src_table = torch.randperm(src_pages, generator=generator) if shuffled else torch.arange(src_pages)
    src_key = torch.randn(src_spec.cache_shape(src_pages), generator=generator).to(dtype).to(device)
    src_value = torch.randn(src_spec.cache_shape(src_pages), generator=generator).to(dtype).to(device)
    dst_pages = -(-num_tokens // dst_spec.page_size)
    dst_table = (torch.randperm(dst_pages, generator=generator) if shuffled else torch.arange(dst_pages)).to(device)
    dst_key = torch.zeros(dst_spec.cache_shape(dst_pages), dtype=dtype, device=device)
    dst_value = torch.zeros_like(dst_key)
    buffers = gather_pair_buffers(src_key, src_value, src_table.to(device), num_tokens, plan)
    return plan, (src_key, src_value, src_table.to(device)), (dst_key, dst_value, dst_table), buffers


def bench_cpu(num_tokens: int, dtype: torch.dtype, repeats: int, shuffled: bool) -> None:
    order = "shuffled" if shuffled else "contiguous"
    print(f"(b) CPU, torch re-shard vs plain copy of the same bytes: {num_tokens} tokens, {dtype}, "
          f"{order} block tables, {torch.get_num_threads()} threads, median of {repeats}")
    print(f"{'scenario':44} {'pairs':>5} {'MB':>7} {'copy ms':>8} {'gather ms':>9} {'scatter ms':>10} "
          f"{'gather/copy':>11} {'scatter/copy':>12}")
    for scenario in SCENARIOS:
        plan, (sk, sv, st), (dk, dv, dt), buffers = build(scenario, dtype, num_tokens, "cpu", shuffled)
        nbytes = plan.nbytes(num_tokens)
        source, target = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
        staging = [torch.zeros_like(b) for b in buffers]  # gather into reused buffers, as a staging pool would
        timed = median_seconds(
            {
                "copy": lambda: target.copy_(source),
                "gather": lambda: gather_pair_buffers(sk, sv, st, num_tokens, plan, out=staging),
                "scatter": lambda: scatter_pair_buffers(buffers, plan, dk, dv, dt, num_tokens),
            },
            repeats,
        )
        copy_s, gather_s, scatter_s = timed["copy"], timed["gather"], timed["scatter"]
        print(f"{scenario.name:44} {len(plan.pairs):5d} {nbytes / 1e6:7.1f} {copy_s * 1e3:8.1f} {gather_s * 1e3:9.1f} "
              f"{scatter_s * 1e3:10.1f} {copy_s / gather_s:11.0%} {copy_s / scatter_s:12.0%}")


def bench_triton(num_tokens: int, dtype: torch.dtype, repeats: int, device: str = "cuda") -> None:
    """(c); `device="cpu"` with TRITON_INTERPRET=1 only smoke-tests this code (timings meaningless)."""
    if device == "cuda" and not torch.cuda.is_available():
        print("(c) CUDA not available: skipping the Triton kernel benchmark")
        return
    from kernels.reshard_triton import scatter_pair_buffers_triton

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"(c) {name}: Triton scatter vs device-to-device copy of the same bytes, {num_tokens} tokens, {dtype}, "
          f"shuffled block tables, median of {repeats}")
    print(f"{'scenario':44} {'MB':>7} {'copy GB/s':>9} {'triton GB/s':>11} {'torch GB/s':>10} {'triton/copy':>11} {'same':>5}")
    for scenario in SCENARIOS:
        plan, _, (dk, dv, dt), buffers = build(scenario, dtype, num_tokens, device)
        nbytes = plan.nbytes(num_tokens)
        scatter_pair_buffers_triton(buffers, plan, dk, dv, dt, num_tokens)
        by_triton = (dk.clone(), dv.clone())
        dk.zero_(), dv.zero_()
        scatter_pair_buffers(buffers, plan, dk, dv, dt, num_tokens)
        same = torch.equal(by_triton[0], dk) and torch.equal(by_triton[1], dv)
        source = torch.ones(nbytes, dtype=torch.uint8, device=device)
        target = torch.empty_like(source)
        timed = median_seconds(
            {
                "copy": lambda: target.copy_(source),
                "triton": lambda: scatter_pair_buffers_triton(buffers, plan, dk, dv, dt, num_tokens),
                "torch": lambda: scatter_pair_buffers(buffers, plan, dk, dv, dt, num_tokens),
            },
            repeats,
            sync,
        )
        copy_s, triton_s, torch_s = timed["copy"], timed["triton"], timed["torch"]
        print(f"{scenario.name:44} {nbytes / 1e6:7.1f} {nbytes / copy_s / 1e9:9.1f} {nbytes / triton_s / 1e9:11.1f} "
              f"{nbytes / torch_s / 1e9:10.1f} {copy_s / triton_s:11.0%} {'yes' if same else 'NO':>5}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    # 1 by default: what each worker runs with when `pdserve up` shares this 2-core machine,
    # and multi-threaded index kernels stall badly when other processes hold the cores.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--contiguous", action="store_true", help="sequential block tables (default: shuffled pages)")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = dtype_from_name(args.dtype)
    if not args.skip_cpu:
        bench_cpu(args.tokens, dtype, args.repeats, shuffled=not args.contiguous)
    bench_triton(args.tokens, dtype, args.repeats)


if __name__ == "__main__":
    main()
