"""Joining a worker instance's rank group: torch.distributed over env:// rendezvous.

The same environment `torchrun` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so a group started by `torchrun` on several hosts joins the same way as one
`pdserve worker` spawns on its own host (shared/ranks/launch.py). Backend: gloo on CPU,
NCCL on CUDA (one device per rank, LOCAL_RANK). Set-up never hangs: every wait is bounded
by the group timeout, and a failure says what went wrong in words (port taken, ranks
missing, leader unreachable).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class RankGroupError(RuntimeError):
    """The rank group could not be formed or broke: the message names the cause."""


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environment(cls) -> RankEnv | None:
        """The rendezvous variables, or None when this process was not started as a rank (a one-rank worker)."""
        if "WORLD_SIZE" not in os.environ:
            return None
        try:
            return cls(
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
                master_addr=os.environ["MASTER_ADDR"],
                master_port=int(os.environ["MASTER_PORT"]),
            )
        except (KeyError, ValueError) as exc:
            raise RankGroupError(f"incomplete rank environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): {exc}") from None

    def export(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
        }


def device_for(env: RankEnv) -> torch.device:
    """The rank's device: its own GPU (LOCAL_RANK) when CUDA is there, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if env.local_rank >= torch.cuda.device_count():
        raise RankGroupError(
            f"rank {env.rank} wants GPU {env.local_rank}, but this host has {torch.cuda.device_count()}: "
            f"a layout may use at most {torch.cuda.device_count()} ranks per host on CUDA"
        )
    return torch.device("cuda", env.local_rank)


def join(env: RankEnv, timeout_s: float) -> dist.Store:
    """Joins the process group (all ranks must); returns the rendezvous store (rank 0 hosts it)."""
    os.environ.update(env.export())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device_for(env))
    where = f"{env.master_addr}:{env.master_port}"
    try:
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # DistStoreError, RuntimeError, ...: say what it means
        raise RankGroupError(_explain(exc, env, where, timeout_s)) from None
    return dist.distributed_c10d._get_default_store()  # the rendezvous store: reports and addresses ride on it


def _explain(exc: Exception, env: RankEnv, where: str, timeout_s: float) -> str:
    text = str(exc)
    if "address already in use" in text.lower() or "failed to listen" in text.lower() or "errno: 98" in text.lower():
        return f"rank group set-up failed: rank 0 cannot listen on {where} (port taken? pick another MASTER_PORT): {text.splitlines()[0]}"
    if "clients joined" in text:
        return f"rank group set-up timed out after {timeout_s:.0f} s: {text.strip().splitlines()[-1]} (a rank failed to start or cannot reach {where})"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"rank {env.rank}: rank group set-up timed out after {timeout_s:.0f} s reaching rank 0 at {where}"
    return f"rank {env.rank}: rank group set-up failed at {where}: {text.splitlines()[0] if text else type(exc).__name__}"


def leave() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group: nothing left to tear down cleanly
            pass
