"""Where a running `pdserve up` leaves its NATS URL, so `pdserve admin` finds it without --nats.

An entry holds the path of the stack's admin credentials (a 0600 file in the stack's
private directory), never a secret itself; entries are 0600 in a 0700 directory anyway.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shared.nats_credentials import write_private
from shared.processes import alive


def state_dir() -> Path:
    base = os.environ.get("PDSERVE_STATE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve"
    return Path(base) / "stacks"


def record_stack(pid: int, nats_url: str, prefix: str, gateway_url: str, admin_creds: Path | None = None) -> Path:
    directory = state_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{pid}.json"
    entry = {"pid": pid, "nats_url": nats_url, "prefix": prefix, "gateway_url": gateway_url}
    if admin_creds is not None:
        entry["admin_creds"] = str(Path(admin_creds).resolve())  # `pdserve admin` may run elsewhere
    write_private(path, json.dumps(entry))
    return path


def running_stacks() -> list[dict]:
    """Stacks whose `pdserve up` is still alive, newest first; stale files are removed."""
    directory = state_dir()
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob("*.json"):
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if alive(int(entry.get("pid", -1))):
            found.append((path.stat().st_mtime, entry))
        else:
            path.unlink(missing_ok=True)
    return [entry for _, entry in sorted(found, key=lambda item: item[0], reverse=True)]
