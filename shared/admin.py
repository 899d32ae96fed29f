"""Admin endpoints on the NATS micro framework, for every service.

Each process registers a micro service (`$SRV.PING|INFO|STATS` discovery, as `nats micro`
lists them) whose endpoints live on per-instance subjects `<prefix>.admin.<id>.<name>`.
Requests and replies are JSON objects. A micro endpoint handles one request at a time, so
handlers must return quickly and start a task for anything slow (drain does).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.client import Client as NatsClient
from nats.micro import Request, add_service
from nats.micro.service import Service

from shared.log import set_log_level
from shared.subjects import Subjects

log = structlog.get_logger()

AdminHandler = Callable[[dict], Awaitable[dict]]
SERVICE_VERSION = "0.1.0"


class AdminError(Exception):
    """Becomes an error reply (micro's Nats-Service-Error headers) with this code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


async def set_loglevel(body: dict) -> dict:
    level = str(body.get("level", "")).lower()
    if level not in ("debug", "info", "warning", "error"):
        raise AdminError(400, f"level must be one of debug, info, warning, error; got {level!r}")
    set_log_level(level)
    return {"level": level}


def _json_endpoint(name: str, handler: AdminHandler):
    async def endpoint(request: Request) -> None:
        try:
            body = json.loads(request.data) if request.data else {}
            if not isinstance(body, dict):
                raise AdminError(400, "admin requests are JSON objects")
            reply = await handler(body)
        except json.JSONDecodeError as exc:
            await request.respond_error("400", f"malformed JSON: {exc}")
        except AdminError as exc:
            await request.respond_error(str(exc.code), exc.message)
        except Exception as exc:
            log.exception("admin_endpoint_failed", endpoint=name)
            await request.respond_error("500", f"{name} failed: {exc!r}")
        else:
            await request.respond(json.dumps(reply).encode())

    return endpoint


async def start_admin(
    nc: NatsClient, subjects: Subjects, kind: str, instance_id: str, handlers: dict[str, AdminHandler]
) -> Service:
    service = await add_service(
        nc,
        name=f"pdserve-{kind}",
        version=SERVICE_VERSION,
        description=f"pdserve {kind}",
        metadata={"instance": instance_id, "kind": kind, "prefix": subjects.prefix},
    )
    for name, handler in {"loglevel": set_loglevel, **handlers}.items():
        await service.add_endpoint(
            name=name,
            subject=subjects.admin(instance_id, name),
            handler=_json_endpoint(name, handler),
            queue_group=instance_id,
        )
    return service
