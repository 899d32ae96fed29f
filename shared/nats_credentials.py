"""NATS credentials: one nkey user per role, and the nats-server config that admits them.

An nkey is an Ed25519 key pair: the server config holds only the public keys, each
service holds its role's seed in a file (the format `nk -gen user` writes, which nats.py
reads with `nkeys_seed=`). Everything written here is 0600 in a 0700 directory.

Used twice: `pdserve up` writes a fresh set into a private temporary directory for its
embedded nats-server and removes it at stop; `pdserve nats-config --out DIR` writes one
to keep, for an external server (compose, several hosts).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nkeys

from shared.nats_permissions import NatsRole, all_role_permissions
from shared.subjects import Subjects

SERVER_CONFIG_NAME = "nats-server.conf"
CREDS_SUFFIX = ".nk"


@dataclass(frozen=True)
class UserKey:
    seed: str  # secret: "SU..."
    public_key: str  # "U...", what the server config names

    @classmethod
    def generate(cls) -> "UserKey":
        seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
        return cls(seed.decode(), nkeys.from_seed(bytearray(seed)).public_key.decode())


def server_config(subjects: Subjects, public_keys: dict[NatsRole, str]) -> dict:
    """A nats-server config (as a dict; JSON is valid nats-server syntax) admitting one user
    per role with its permissions and nobody else. Add `listen`, `cluster`, `tls` keys as needed."""
    permissions = all_role_permissions(subjects)
    users = [{"nkey": public_keys[role], "permissions": permissions[role].server_entry()} for role in NatsRole]
    return {"authorization": {"users": users}}


def render_server_config(config: dict, subjects: Subjects, public_keys: dict[NatsRole, str]) -> str:
    legend = "\n".join(f"#   {role.value:<10} {public_keys[role]}" for role in NatsRole)
    header = f'# pdserve NATS users for subject prefix "{subjects.prefix}" (nkey public keys):\n{legend}\n'
    return header + json.dumps(config, indent=2) + "\n"


def write_private(path: Path, text: str) -> None:
    """Creates (or replaces) `path` readable by its owner only, before any byte is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(text)


@dataclass(frozen=True)
class CredentialsDir:
    """A directory holding `nats-server.conf` and `<role>.nk` for every role."""

    path: Path

    def creds_file(self, role: NatsRole) -> Path:
        return self.path / f"{role.value}{CREDS_SUFFIX}"

    @property
    def server_config_path(self) -> Path:
        return self.path / SERVER_CONFIG_NAME

    def existing_files(self) -> list[Path]:
        return [p for p in [self.server_config_path, *map(self.creds_file, NatsRole)] if p.exists()]

    def write(self, subjects: Subjects, extra_config: dict | None = None) -> "CredentialsDir":
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys = {role: UserKey.generate() for role in NatsRole}
        public_keys = {role: key.public_key for role, key in keys.items()}
        for role, key in keys.items():
            write_private(self.creds_file(role), key.seed + "\n")
        config = server_config(subjects, public_keys) | (extra_config or {})
        write_private(self.server_config_path, render_server_config(config, subjects, public_keys))
        return self

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def private_stack_credentials(subjects: Subjects) -> CredentialsDir:
    """Fresh credentials for one `pdserve up` in a new 0700 temporary directory."""
    return CredentialsDir(Path(tempfile.mkdtemp(prefix="pdserve-nats-"))).write(subjects)
