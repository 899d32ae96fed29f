"""How a pdserve process authenticates to NATS: the keyword arguments for `nats.connect`.

Every service takes `--nats-creds FILE` (or `PDSERVE_NATS_CREDS`): an nkey seed file as
`pdserve nats-config` writes (`<role>.nk`), or a JWT `.creds` file from an operator/account
setup. TLS: `--nats-tls-ca`, `--nats-tls-cert`, `--nats-tls-key` (or a `tls://` URL with
the system's CAs). Replies come back on the role's own inbox (shared/nats_permissions.py).
"""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from shared.nats_permissions import NatsRole, inbox_prefix
from shared.subjects import Subjects

ENV_CREDS = "PDSERVE_NATS_CREDS"
ENV_TLS_CA = "PDSERVE_NATS_TLS_CA"
ENV_TLS_CERT = "PDSERVE_NATS_TLS_CERT"
ENV_TLS_KEY = "PDSERVE_NATS_TLS_KEY"
_JWT_MARKER = "-----BEGIN NATS USER JWT-----"


class NatsCredentialsError(ValueError):
    """A credentials or TLS file that cannot be used; the message names the flag."""


class NatsAuthorizationError(RuntimeError):
    """The server refused this client's credentials (or it sent none where some are needed)."""


def add_arguments(parser: argparse.ArgumentParser, creds_help: str | None = None) -> None:
    group = parser.add_argument_group("NATS authentication")
    group.add_argument(
        "--nats-creds",
        metavar="FILE",
        default=os.environ.get(ENV_CREDS) or None,
        help=creds_help or f"nkey seed (.nk, from `pdserve nats-config`) or JWT .creds file (env {ENV_CREDS})",
    )
    group.add_argument("--nats-tls-ca", metavar="FILE", default=os.environ.get(ENV_TLS_CA) or None, help=f"CA bundle that signed the NATS server's certificate (env {ENV_TLS_CA})")
    group.add_argument("--nats-tls-cert", metavar="FILE", default=os.environ.get(ENV_TLS_CERT) or None, help=f"client certificate for mutual TLS (env {ENV_TLS_CERT})")
    group.add_argument("--nats-tls-key", metavar="FILE", default=os.environ.get(ENV_TLS_KEY) or None, help=f"client certificate's key (env {ENV_TLS_KEY})")


@dataclass(frozen=True)
class NatsAuth:
    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "NatsAuth":
        def path(name: str) -> Path | None:
            value = getattr(args, name, None)
            return Path(value) if value else None

        return cls(path("nats_creds"), path("nats_tls_ca"), path("nats_tls_cert"), path("nats_tls_key"))

    def tls_flags(self) -> list[str]:
        """The TLS options as command-line flags (file paths, no secrets), for child processes."""
        pairs = (("--nats-tls-ca", self.tls_ca), ("--nats-tls-cert", self.tls_cert), ("--nats-tls-key", self.tls_key))
        return [item for flag, value in pairs if value for item in (flag, str(value))]

    def connect_options(self, subjects: Subjects, role: NatsRole) -> dict:
        options: dict = {"inbox_prefix": inbox_prefix(subjects, role)}
        if self.creds is not None:
            options |= _credentials_options(self.creds)
        tls = self._tls_context()
        if tls is not None:
            options["tls"] = tls
        return options

    def _tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert or self.tls_key):
            return None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise NatsCredentialsError("--nats-tls-cert and --nats-tls-key go together")
        try:
            context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        except (OSError, ssl.SSLError) as exc:
            raise NatsCredentialsError(f"--nats-tls-ca {self.tls_ca}: {exc}") from None
        if self.tls_cert:
            try:
                context.load_cert_chain(str(self.tls_cert), str(self.tls_key))
            except (OSError, ssl.SSLError) as exc:
                raise NatsCredentialsError(f"--nats-tls-cert {self.tls_cert} / --nats-tls-key {self.tls_key}: {exc}") from None
        return context


def _credentials_options(path: Path) -> dict:
    """Picks nats.py's option by the file's content; nats.py re-reads the file on every
    (re)connect, so the secret is not kept in this process's memory."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise NatsCredentialsError(f"--nats-creds {path}: {exc.strerror or exc}") from None
    if _JWT_MARKER in text:
        return {"user_credentials": str(path)}
    if text.startswith("SU") and "\n" not in text:
        return {"nkeys_seed": str(path)}
    raise NatsCredentialsError(f"--nats-creds {path}: neither an nkey user seed (SU...) nor a NATS .creds file")


def connect_options_for(args: argparse.Namespace, role: NatsRole) -> dict:
    """The usual call: options for a service started with the flags of `add_arguments`."""
    return NatsAuth.from_args(args).connect_options(Subjects(args.prefix or "pd"), role)
