"""`pdserve nats-config --out DIR`: credentials and a nats-server config for an external NATS.

Writes `DIR/nats-server.conf` (one nkey user per role with its subject permissions, no
anonymous access) and `DIR/<role>.nk` for gateway, scheduler, worker and admin, all 0600.
Start the server with `nats-server -c DIR/nats-server.conf`; give each service its file
with `--nats-creds` (or PDSERVE_NATS_CREDS).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.nats_credentials import CredentialsDir
from shared.nats_permissions import NatsRole
from shared.subjects import Subjects


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write (created 0700 if missing)")
    parser.add_argument("--prefix", default="pd", help="NATS subject prefix of the deployment (default pd)")
    parser.add_argument("--force", action="store_true", help="replace existing files (every service then needs its new file)")


def run(args: argparse.Namespace) -> int:
    try:
        subjects = Subjects(args.prefix)
    except ValueError as exc:
        print(f"pdserve nats-config: --prefix: {exc}", file=sys.stderr)
        return 2
    target = CredentialsDir(args.out)
    existing = target.existing_files()
    if existing and not args.force:
        names = ", ".join(p.name for p in existing)
        print(f"pdserve nats-config: --out {args.out} already holds {names}; pass --force to replace them", file=sys.stderr)
        return 2
    target.write(subjects)
    print(f"nats-server config: {target.server_config_path}   (nats-server -c {target.server_config_path})")
    for role in NatsRole:
        print(f"{role.value + ' credentials:':<23} {target.creds_file(role)}")
    return 0
