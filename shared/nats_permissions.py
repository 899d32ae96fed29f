"""Who may publish and subscribe to what on NATS: one user per role (ARCHITECTURE.md §4b).

A pure table, derived from shared/subjects.py, that both the embedded nats-server of
`pdserve up` and `pdserve nats-config` turn into a server config. Replies travel on
per-role inboxes (`_INBOX.<prefix>.<role>.>`), so no role can read another's replies, and
answering a request needs no publish right (`allow_responses`).

| role      | publishes                                              | subscribes |
|-----------|--------------------------------------------------------|------------|
| gateway   | place requests, readiness checks, prefill jobs, cancels | token streams, worker-down events, its admin endpoints |
| scheduler | worker-down events                                      | place requests, readiness checks, heartbeats, its admin endpoints |
| worker    | heartbeats, token streams, decode jobs (hand-offs), place requests (another decoder) | its jobs and cancels, heartbeats, its admin endpoints |
| admin     | admin endpoint calls, `$SRV` discovery                  | heartbeats, worker-down events (readiness, watching) |

Services register admin endpoints with nats.micro, which answers `$SRV.PING|INFO|STATS`;
only the admin role may call them. A subject not listed here is refused: a new message
kind needs a line in this table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shared.subjects import Subjects

MICRO_DISCOVERY = "$SRV.>"
ANY = "*"


class NatsRole(enum.Enum):
    GATEWAY = "gateway"
    SCHEDULER = "scheduler"
    WORKER = "worker"
    ADMIN = "admin"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool  # may answer any request it received (request/reply, micro)

    def server_entry(self) -> dict:
        """The `permissions` block of a nats-server user; an empty allow list denies all."""
        return {
            "publish": {"allow": list(self.publish)} if self.publish else {"deny": [">"]},
            "subscribe": {"allow": list(self.subscribe)} if self.subscribe else {"deny": [">"]},
            "allow_responses": self.allow_responses,
        }


def inbox_prefix(subjects: Subjects, role: NatsRole) -> str:
    """Where a role's clients receive replies; only that role may subscribe there."""
    return f"_INBOX.{subjects.prefix}.{role.value}"


def role_permissions(subjects: Subjects, role: NatsRole) -> Permissions:
    inbox = inbox_prefix(subjects, role) + ".>"
    admin_endpoints = subjects.admin(ANY, ANY)
    service = (admin_endpoints, MICRO_DISCOVERY)  # every service answers admin calls
    all_streams = subjects.stream(">")
    if role is NatsRole.GATEWAY:
        return Permissions(
            publish=(subjects.place, subjects.ready, subjects.worker_prefill(ANY), subjects.worker_cancel(ANY)),
            subscribe=(all_streams, subjects.worker_down, inbox, *service),
            allow_responses=True,
        )
    if role is NatsRole.SCHEDULER:
        return Permissions(
            publish=(subjects.worker_down,),
            subscribe=(subjects.place, subjects.ready, subjects.all_heartbeats, inbox, *service),
            allow_responses=True,
        )
    if role is NatsRole.WORKER:
        jobs = (subjects.worker_prefill(ANY), subjects.worker_decode(ANY), subjects.worker_cancel(ANY))
        return Permissions(
            # place: a prefill worker whose decoder refused asks the scheduler for another
            publish=(subjects.heartbeat(ANY, ANY), all_streams, subjects.worker_decode(ANY), subjects.place),
            subscribe=(*jobs, subjects.all_heartbeats, inbox, *service),
            allow_responses=True,
        )
    return Permissions(
        publish=(admin_endpoints, MICRO_DISCOVERY),
        subscribe=(inbox, subjects.all_heartbeats, subjects.worker_down),
        allow_responses=False,
    )


def all_role_permissions(subjects: Subjects) -> dict[NatsRole, Permissions]:
    return {role: role_permissions(subjects, role) for role in NatsRole}
