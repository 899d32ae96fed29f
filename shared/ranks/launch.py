"""Starting a worker instance's other ranks on this host, and noticing when one dies.

`pdserve prefill|decode|worker --layout tp=4` (and `pdserve up`) start the leader; it
starts ranks 1..N-1 as the same command with the rendezvous variables set, exactly as
`torchrun --nproc-per-node N` would (then nothing is spawned here: every rank is started by
torchrun, possibly on several hosts). The children die with the leader (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable

from shared import processes
from shared.ranks.process_group import RankEnv

MONITOR_INTERVAL_S = 0.2


def spawn_followers(world: int, master_port: int, argv: list[str] | None = None) -> list[subprocess.Popen]:
    """Ranks 1..world-1 of a group whose leader is this process, each its own process on this host."""
    argv = sys.argv[1:] if argv is None else argv
    command = [sys.executable, "-m", "services.cli", *argv]
    followers = []
    for rank in range(1, world):
        env = RankEnv(rank, world, rank, "127.0.0.1", master_port).export()
        followers.append(processes.spawn(command, env={**os.environ, **env}))
    return followers


async def watch_followers(followers: list[subprocess.Popen], on_death: Callable[[int, str], None]) -> None:
    """Calls `on_death(rank, how)` once, for the first follower that ends."""
    while True:
        for rank, proc in enumerate(followers, start=1):
            if proc.poll() is not None:
                on_death(rank, f"rank {rank} (pid {proc.pid}) {processes.describe_exit(proc.returncode)}")
                return
        await asyncio.sleep(MONITOR_INTERVAL_S)


def stop_followers(followers: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    processes.stop(followers, grace_seconds=grace_s)
