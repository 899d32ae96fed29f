"""The secrets of one `pdserve up`: NATS credentials per role and the gateway's API keys.

Secure by default where `pdserve up` starts the parts itself:
- the embedded nats-server gets fresh nkey users (one per role, shared/nats_permissions.py)
  in a private 0700 temporary directory, removed at stop; with `--nats URL` the services
  use `--nats-creds` (a `pdserve nats-config` directory, or one file for all) or nothing;
- the gateway requires an API key: `--api-key`, `PDSERVE_API_KEY`, or one generated here
  and printed once; `--no-api-key` serves without.
Children receive secrets through their environment (a path to a 0600 file for NATS, the
keys for the gateway), never on their command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from services.gateway.auth import ENV_API_KEY, configured_keys
from shared.nats_auth import ENV_CREDS, NatsAuth
from shared.nats_credentials import CredentialsDir, private_stack_credentials
from shared.nats_permissions import NatsRole
from shared.subjects import Subjects

GENERATED_KEY_PREFIX = "pd-"


@dataclass
class StackAuth:
    subjects: Subjects
    nats: NatsAuth  # the TLS options, and creds for one-file setups
    creds_dir: CredentialsDir | None = None
    owns_creds_dir: bool = False  # made for the embedded server: removed at stop
    api_keys: list[str] = field(default_factory=list)
    generated_api_key: str | None = None

    @classmethod
    def prepare(cls, args: argparse.Namespace, subjects: Subjects) -> "StackAuth":
        """Raises ValueError (naming the flag) for unusable keys or credentials."""
        nats = NatsAuth.from_args(args)
        auth = cls(subjects, nats)
        if args.nats is None:
            auth.creds_dir, auth.owns_creds_dir = private_stack_credentials(subjects), True
        elif nats.creds is not None and nats.creds.is_dir():
            auth.creds_dir = CredentialsDir(nats.creds)
            missing = [str(auth.creds_dir.creds_file(r)) for r in NatsRole if not auth.creds_dir.creds_file(r).is_file()]
            if missing:
                raise ValueError(f"--nats-creds {nats.creds}: missing {', '.join(missing)} (write them with `pdserve nats-config`)")
        if not args.no_api_key:
            auth.api_keys = configured_keys(args.api_key)
            if not auth.api_keys:
                auth.generated_api_key = GENERATED_KEY_PREFIX + secrets.token_urlsafe(24)
                auth.api_keys = [auth.generated_api_key]
        return auth

    @property
    def server_config(self) -> Path | None:
        return self.creds_dir.server_config_path if self.owns_creds_dir else None

    def creds_file(self, role: NatsRole) -> Path | None:
        return self.creds_dir.creds_file(role) if self.creds_dir else self.nats.creds

    def child_env(self, role: NatsRole) -> dict[str, str]:
        env = dict(os.environ)
        creds = self.creds_file(role)
        if creds is not None:
            env[ENV_CREDS] = str(creds)
        if role is NatsRole.GATEWAY:
            env[ENV_API_KEY] = ",".join(self.api_keys)  # empty: open (--no-api-key)
        return env

    def connect_options(self, role: NatsRole) -> dict:
        return dataclasses.replace(self.nats, creds=self.creds_file(role)).connect_options(self.subjects, role)

    def close(self) -> None:
        if self.owns_creds_dir and self.creds_dir is not None:
            self.creds_dir.remove()
