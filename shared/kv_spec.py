"""What one side of a KV hand-off holds, and whether two sides may hand KV to each other.

A `KvSpec` is the model's KV identity (fingerprint, layers, heads, head size) plus how a
worker stores it (dtype, page size, memory layout inside a page). Identity must match
across a hand-off; storage may differ, because the decoder's re-shard kernel converts it:

- `page_size` and `memory_layout` ("NHD" = per layer `[blocks, page, heads, dim]`,
  "HND" = `[blocks, heads, page, dim]`) may differ freely.
- `dtype` may differ when both dtypes are plain floating types (float32, float16,
  bfloat16): the decoder casts while scattering. Quantised KV (fp8, int8) needs scales
  that are not part of the hand-off, so any dtype change involving it is refused, and
  `allow_dtype_cast=False` refuses every dtype change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MEMORY_LAYOUTS = ("NHD", "HND")
CASTABLE_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float8_e4m3fn: "float8_e4m3fn",
    torch.float8_e5m2: "float8_e5m2",
    torch.int8: "int8",
    torch.uint8: "uint8",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class IncompatibleKvError(ValueError):
    """Two ends of a hand-off cannot exchange KV; `field` names the first mismatch."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {dtype}; supported: {', '.join(_DTYPES_BY_NAME)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown KV dtype {name!r}; supported: {', '.join(_DTYPES_BY_NAME)}") from None


@dataclass(frozen=True)
class KvSpec:
    """KV identity and storage of one worker. `num_experts` is 0 for dense models."""

    model_fingerprint: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    page_size: int = 16
    memory_layout: str = "NHD"
    num_experts: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KvSpec.{name} must be a positive int, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"KvSpec.num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.memory_layout not in MEMORY_LAYOUTS:
            raise ValueError(f"KvSpec.memory_layout must be one of {MEMORY_LAYOUTS}, got {self.memory_layout!r}")
        if self.num_experts < 0:
            raise ValueError(f"KvSpec.num_experts must be >= 0, got {self.num_experts}")
        dtype_name(self.dtype)  # raises on an unsupported dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token, all layers and heads."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    def cache_shape(self, num_blocks: int, num_layers: int | None = None, num_kv_heads: int | None = None) -> tuple[int, ...]:
        """Shape of a K (or V) paged cache in this spec's memory layout."""
        layers = self.num_layers if num_layers is None else num_layers
        heads = self.num_kv_heads if num_kv_heads is None else num_kv_heads
        if self.memory_layout == "NHD":
            return (layers, num_blocks, self.page_size, heads, self.head_dim)
        return (layers, num_blocks, heads, self.page_size, self.head_dim)


# Identity fields, compared in this order; the first mismatch is reported.
_IDENTITY = (
    ("model_fingerprint", "model fingerprint"),
    ("num_layers", "layers"),
    ("head_dim", "head_dim"),
    ("num_kv_heads", "KV heads"),
    ("num_q_heads", "query heads"),
    ("num_experts", "experts"),
)


def spec_of_model(config, *, dtype: torch.dtype = torch.float32, page_size: int = 16) -> KvSpec:
    """The KV spec of a worker serving `config` (a ModelConfig) with this cache dtype and page size.

    HND: the engine's paged cache is `[L, H, blocks, page, D]`, which per layer is
    `[blocks, H, page, D]` up to a stride permutation (`PagedKVCache.hnd_views`).
    """
    return KvSpec(
        model_fingerprint=config.fingerprint(),
        num_layers=config.num_layers,
        num_q_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=dtype,
        page_size=page_size,
        memory_layout="HND",
        num_experts=config.num_experts,
    )


def first_mismatch(src: KvSpec, dst: KvSpec, *, allow_dtype_cast: bool = True) -> tuple[str, str] | None:
    """`(field, message)` for the first reason `src` cannot hand KV to `dst`, else None."""
    for field, label in _IDENTITY:
        mine, theirs = getattr(src, field), getattr(dst, field)
        if mine != theirs:
            return field, f"KV hand-off refused: {label} differ (source {mine!r}, destination {theirs!r})"
    if src.dtype != dst.dtype:
        pair = f"source {dtype_name(src.dtype)}, destination {dtype_name(dst.dtype)}"
        if not allow_dtype_cast:
            return "dtype", f"KV hand-off refused: dtype differs ({pair}) and casting is disabled"
        if src.dtype not in CASTABLE_DTYPES or dst.dtype not in CASTABLE_DTYPES:
            return "dtype", f"KV hand-off refused: dtype differs ({pair}); only float32/float16/bfloat16 are cast"
    return None


def compatibility_problem(src: KvSpec, dst: KvSpec, *, allow_dtype_cast: bool = True) -> str | None:
    """A message naming the first mismatching field, or None when `src` may hand KV to `dst`."""
    problem = first_mismatch(src, dst, allow_dtype_cast=allow_dtype_cast)
    return None if problem is None else problem[1]


def check_compatible(src: KvSpec, dst: KvSpec, *, allow_dtype_cast: bool = True) -> None:
    """Raises `IncompatibleKvError` naming the first mismatching field."""
    problem = first_mismatch(src, dst, allow_dtype_cast=allow_dtype_cast)
    if problem is not None:
        raise IncompatibleKvError(*problem)
