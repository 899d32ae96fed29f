"""Accelerators the planner knows: datasheet numbers per device, with their sources.

A *device* is one GPU (for `local`: one worker process on this machine's cores). Every
number is per device and per direction. What a serving stack achieves of these peaks is
in efficiency.py; `local` is not a preset but is fitted to measurements (fit.py).

Sources (read 2026; NVIDIA's product pages list sparse figures, halved here for dense):
- H100 SXM: nvidia.com/en-us/data-center/h100 — BF16 1,979 TFLOPS sparse (989 dense),
  80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (450 GB/s per direction); HGX H100: 8 GPUs on NVSwitch.
- H200 SXM: nvidia.com/en-us/data-center/h200 — same tensor cores as H100 (989 TFLOPS dense BF16),
  141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s; HGX H200: 8 GPUs.
- HGX B200: nvidia.com/en-us/data-center/hgx — 8 GPUs, FP16/BF16 36 PFLOPS sparse per board
  (2.25 PFLOPS dense per GPU), 1.44 TB HBM3e (180 GB per GPU) at 64 TB/s (8 TB/s per GPU),
  NVLink 5 1.8 TB/s per GPU (900 GB/s per direction).
- GB200 NVL72: nvidia.com/en-us/data-center/gb200-nvl72 — 72 GPUs in one NVLink domain,
  FP16/BF16 360 PFLOPS sparse per rack (2.5 PFLOPS dense per GPU), 13.4 TB HBM3e
  (186 GB per GPU) at 576 TB/s (8 TB/s per GPU), NVLink 130 TB/s (1.8 TB/s per GPU).
- NIC: one ConnectX-7 per GPU at 400 Gb/s = 50 GB/s (nvidia.com/en-us/networking/ethernet/connectx-7;
  DGX H100/H200/B200 user guides list 8 single-port ConnectX-7 for the compute fabric;
  the seed ships KV over ConnectX-7 400 Gb/s on NVL72 too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.efficiency import GPU_EFFICIENCY, Efficiency

TB = 1e12
GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float  # dense bf16 FLOP/s per device (local: fitted effective rate)
    hbm_bandwidth: float  # bytes/s per device (local: fitted effective rate)
    hbm_bytes: float  # memory per device
    nvlink_domain: int  # devices one NVLink domain joins (1: none)
    nvlink_bandwidth: float  # bytes/s per device and direction inside the domain
    nic_bandwidth: float  # bytes/s per device and direction across domains (KV hand-off, cross-domain collectives)
    efficiency: Efficiency = GPU_EFFICIENCY
    weight_bytes: int = 2  # bytes per parameter (bf16; local: float32)
    kv_bytes: int = 2  # bytes per cached K or V value
    default_devices: int = 8
    kv_cache_tokens: int | None = None  # fixed KV budget per worker instance (local: pdserve up's); None: from memory
    max_world: int = 0  # devices one instance may span (local: 1, the profile measured one-process workers); 0: any
    description: str = ""
    sources: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("flops", "hbm_bandwidth", "hbm_bytes", "nvlink_bandwidth", "nic_bandwidth"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Hardware.{name} must be > 0, got {getattr(self, name)}")
        if self.max_world < 0:
            raise ValueError(f"Hardware.max_world must be >= 0, got {self.max_world}")
        for name in ("nvlink_domain", "weight_bytes", "kv_bytes", "default_devices"):
            if getattr(self, name) < 1:
                raise ValueError(f"Hardware.{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise ValueError(f"Hardware.kv_cache_tokens must be >= 1, got {self.kv_cache_tokens}")

    def link_bandwidth(self, group_size: int) -> float:
        """Achieved per-device bandwidth of a collective over `group_size` devices."""
        if group_size <= self.nvlink_domain:
            return self.nvlink_bandwidth * self.efficiency.nvlink
        return self.nic_bandwidth * self.efficiency.nic

    def handoff_bandwidth(self, devices: int) -> float:
        """Achieved bandwidth of one KV hand-off link (one source rank to one destination rank) in a
        deployment of `devices`: over NVLink when the whole deployment sits in one NVLink domain
        (prefill and decode instances side by side), else over the NIC (they may be on different
        nodes, and in general are)."""
        return self.link_bandwidth(devices)

    def link_latency(self, group_size: int) -> float:
        eff = self.efficiency
        return eff.nvlink_latency_s if group_size <= self.nvlink_domain else eff.nic_latency_s

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "flops": self.flops,
            "hbm_bandwidth": self.hbm_bandwidth,
            "hbm_bytes": self.hbm_bytes,
            "nvlink_domain": self.nvlink_domain,
            "nvlink_bandwidth": self.nvlink_bandwidth,
            "nic_bandwidth": self.nic_bandwidth,
            "weight_bytes": self.weight_bytes,
            "kv_bytes": self.kv_bytes,
            "kv_cache_tokens": self.kv_cache_tokens,
            "efficiency": self.efficiency.as_dict(),
            "sources": list(self.sources),
        }


_CX7 = 400e9 / 8  # ConnectX-7, 400 Gb/s
_CX7_SOURCE = "NIC: ConnectX-7 400 Gb/s per GPU (nvidia.com/en-us/networking/ethernet/connectx-7)"

H100_HGX8 = Hardware(
    name="h100-hgx8", flops=989e12, hbm_bandwidth=3.35 * TB, hbm_bytes=80 * GB, nvlink_domain=8,
    nvlink_bandwidth=450 * GB, nic_bandwidth=_CX7, default_devices=8,
    description="HGX H100 SXM: 8 GPUs per NVLink domain, nodes joined by ConnectX-7 400 Gb/s",
    sources=("H100 SXM: nvidia.com/en-us/data-center/h100 (BF16 1,979 TFLOPS sparse, 80 GB, 3.35 TB/s, NVLink 900 GB/s)", _CX7_SOURCE),
)
H200_HGX8 = Hardware(
    name="h200-hgx8", flops=989e12, hbm_bandwidth=4.8 * TB, hbm_bytes=141 * GB, nvlink_domain=8,
    nvlink_bandwidth=450 * GB, nic_bandwidth=_CX7, default_devices=8,
    description="HGX H200: 8 GPUs per NVLink domain, nodes joined by ConnectX-7 400 Gb/s",
    sources=("H200 SXM: nvidia.com/en-us/data-center/h200 (BF16 1,979 TFLOPS sparse, 141 GB, 4.8 TB/s, NVLink 900 GB/s)", _CX7_SOURCE),
)
B200_HGX8 = Hardware(
    name="b200-hgx8", flops=2.25e15, hbm_bandwidth=8 * TB, hbm_bytes=180 * GB, nvlink_domain=8,
    nvlink_bandwidth=900 * GB, nic_bandwidth=_CX7, default_devices=8,
    description="HGX B200: 8 GPUs per NVLink domain, nodes joined by ConnectX-7 400 Gb/s",
    sources=("HGX B200: nvidia.com/en-us/data-center/hgx (BF16 36 PFLOPS sparse per 8 GPUs, 1.44 TB, 64 TB/s, NVLink 1.8 TB/s per GPU)", _CX7_SOURCE),
)
GB200_NVL72 = Hardware(
    name="gb200-nvl72", flops=2.5e15, hbm_bandwidth=8 * TB, hbm_bytes=186 * GB, nvlink_domain=72,
    nvlink_bandwidth=900 * GB, nic_bandwidth=_CX7, default_devices=72,
    description="GB200 NVL72: 72 GPUs in one NVLink domain; KV hand-off over ConnectX-7 400 Gb/s as in the seed",
    sources=("GB200 NVL72: nvidia.com/en-us/data-center/gb200-nvl72 (BF16 360 PFLOPS sparse per rack, 13.4 TB, 576 TB/s, NVLink 130 TB/s)", _CX7_SOURCE),
)

PRESETS: dict[str, Hardware] = {h.name: h for h in (GB200_NVL72, B200_HGX8, H200_HGX8, H100_HGX8)}
LOCAL = "local"


def hardware_names() -> list[str]:
    return [*PRESETS, LOCAL]


def get_preset(name: str) -> Hardware:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; choose one of: {', '.join(hardware_names())}") from None
