"""Which rank this process is, and bringing its group up (and down) around it.

- Started by `torchrun` (or any launcher that sets RANK/WORLD_SIZE/MASTER_*): this process is
  that rank; the launcher owns the other processes.
- Started alone with a layout of N > 1 ranks: this process is rank 0 and starts ranks
  1..N-1 on this host (shared/ranks/launch.py), watches them, and stops them when it stops.
- A one-rank layout: no group at all.
A layout this host cannot run for real is refused before anything starts (on CUDA: more
ranks per host than GPUs); on a CPU any number of ranks runs, one thread each by default.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shared.processes import free_port
from shared.ranks.launch import spawn_followers, stop_followers, watch_followers
from shared.ranks.process_group import RankEnv, RankGroupError, join


@dataclass
class RankSetup:
    world: int
    env: RankEnv | None  # None: a one-rank worker
    spawns_followers: bool = False
    followers: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def for_layout(cls, layout, args) -> RankSetup:
        env = RankEnv.from_environment()
        if env is not None:
            if env.world_size != layout.world:
                raise SystemExit(
                    f"pdserve {args.command}: --layout {layout.describe()} has {layout.world} ranks, "
                    f"but WORLD_SIZE={env.world_size} (the launcher's group size must match the layout)"
                )
            return cls(layout.world, env)
        if layout.world == 1:
            return cls(1, None)
        if torch.cuda.is_available() and layout.world > torch.cuda.device_count():
            raise SystemExit(
                f"pdserve {args.command}: --layout {layout.describe()} needs {layout.world} GPUs on this host "
                f"(one per rank); it has {torch.cuda.device_count()}. Use a smaller layout or torchrun across hosts."
            )
        return cls(layout.world, RankEnv(0, layout.world, 0, "127.0.0.1", free_port()), spawns_followers=True)

    @property
    def rank(self) -> int:
        return 0 if self.env is None else self.env.rank

    async def join(self, timeout_s: float) -> dist.Store | None:
        """Starts the other ranks if this process leads a local group, then joins; None for a one-rank worker."""
        if self.env is None:
            return None
        if self.spawns_followers:
            self.followers = spawn_followers(self.world, self.env.master_port)
        try:
            return await asyncio.to_thread(join, self.env, timeout_s)
        except RankGroupError:
            self.stop_followers()
            raise

    async def watch(self, on_death: Callable[[int, str], object]) -> None:
        """Returns only after telling `on_death` which rank of this host's group ended (never for a lone worker)."""
        if not self.followers:
            await asyncio.Event().wait()
        await watch_followers(self.followers, on_death)

    def stop_followers(self) -> None:
        if self.followers:
            stop_followers(self.followers)
            self.followers = []
