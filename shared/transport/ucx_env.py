"""UCX settings for CPU-only hosts, applied before ucxx initialises.

ucxx ships with GPU-oriented defaults (CUDA transports, memtype cache). On a host
without a GPU we pin the transports that exist: TCP, shared memory and loopback.
Values already in the environment win, so operators can select InfiniBand (rc) or
cuda_ipc on real deployments.
"""

from __future__ import annotations

import os

CPU_DEFAULTS = {
    "UCX_TLS": "tcp,sm,self",
    "UCX_MEMTYPE_CACHE": "n",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    "UCXPY_LOG_LEVEL": "WARNING",
}


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def configure_ucx_environment() -> None:
    if has_cuda():
        return
    for key, value in CPU_DEFAULTS.items():
        os.environ.setdefault(key, value)
