"""Whether a model can be served now, from the live workers: the answer behind the gateway's /health.

Pure, like placement (policy.py): a model is servable when the workers the placement mode
needs are alive and not draining: a prefill-capable and a decode-capable worker in disagg
mode (a `both` worker is each), a `both` worker in colocated mode, a decode-capable one in
auto mode (it prefills locally when no prefill worker is there).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.scheduler.policy import Mode
from services.scheduler.registry import WorkerLoad
from shared.protocol import Readiness, Role

_NEEDS: dict[Mode, tuple[tuple[str, frozenset[Role]], ...]] = {
    Mode.DISAGG: (("prefill worker", frozenset({Role.PREFILL, Role.BOTH})), ("decode worker", frozenset({Role.DECODE, Role.BOTH}))),
    Mode.COLOCATED: (("colocated (role=both) worker", frozenset({Role.BOTH})),),
    Mode.AUTO: (("decode worker", frozenset({Role.DECODE, Role.BOTH})),),
}


def readiness(model: str, workers: Sequence[WorkerLoad], mode: Mode) -> Readiness:
    serving = [w.beat.role for w in workers if w.beat.model == model and not w.beat.draining]
    missing = [what for what, roles in _NEEDS[mode] if not any(role in roles for role in serving)]
    return Readiness(
        ready=not missing,
        mode=mode.value,
        missing=missing,
        prefill_workers=serving.count(Role.PREFILL),
        decode_workers=serving.count(Role.DECODE),
        both_workers=serving.count(Role.BOTH),
    )
