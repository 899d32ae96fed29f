"""The `--json` contract: every output carries `version`; one JSON Schema per command in schemas/.

Scripts may rely on the required fields and types of that version; services may add
fields later (schemas allow additional properties where they do). A change that breaks a
script bumps the version.
"""

from __future__ import annotations

import json
from importlib import resources

VERSION = "pdserve.admin/v1"
COMMANDS = ("status", "requests", "drain", "policy", "loglevel", "cancel", "error")


def versioned(payload: dict) -> dict:
    return {"version": VERSION, **payload}


def load_schema(name: str) -> dict:
    """The JSON Schema of one command's output (`error`: of any failure)."""
    if name not in COMMANDS:
        raise KeyError(f"no schema {name!r}; there are {', '.join(COMMANDS)}")
    return json.loads(resources.files("services.admin").joinpath("schemas", f"{name}.json").read_text())
