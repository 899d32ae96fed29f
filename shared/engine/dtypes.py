"""The float types weights and the KV cache may use, and the default per device.

Weights and KV cache are chosen separately (`load_model(..., dtype=)`, `Engine(kv_dtype=)`).
Default: float32 on CPU (this machine's CPU has no bf16 units, so bf16 only saves memory
there, and greedy outputs stay comparable with a float32 oracle), bfloat16 on CUDA.
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16"}


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """float32 on CPU, bfloat16 on CUDA."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(value: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype from a CLI value: "float32"/"fp32", "bfloat16"/"bf16", or "auto"/None for `default_dtype(device)`."""
    if value is None or value == "auto":
        return default_dtype(device)
    if isinstance(value, torch.dtype):
        if value not in SUPPORTED_DTYPES.values():
            raise ValueError(f"dtype {value} is not supported; supported: {', '.join(SUPPORTED_DTYPES)}")
        return value
    name = _ALIASES.get(value.lower(), value.lower())
    try:
        return SUPPORTED_DTYPES[name]
    except KeyError:
        choices = ", ".join([*SUPPORTED_DTYPES, *_ALIASES, "auto"])
        raise ValueError(f"dtype {value!r} is not supported; choose one of: {choices}") from None
