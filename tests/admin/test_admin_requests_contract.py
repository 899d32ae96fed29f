"""The CLI side of `pdserve admin requests`, against services that answer the documented `requests` contract.

The stand-ins below are NATS micro services registered the way every pdserve service
registers (shared.admin); they answer what docs/admin.md says a worker's request table
answers, including what today's workers do not send yet (a row's `rank`), so this checks
admin's merging, tagging, error reporting and schema. The real tables:
tests/admin/test_admin_stack.py::test_requests_lists_each_phase_and_forgets_what_ended.
"""

import jsonschema

from services.admin.client import AdminSession
from services.admin.connection import connect_admin
from services.admin.requests import requests_lines, take_requests
from services.admin.schema import load_schema, versioned
from shared.admin import start_admin
from shared.subjects import Subjects

ROWS = [
    {"request_id": "cmpl-a", "phase": "decoding", "path": "disagg", "prompt_tokens": 40, "generated_tokens": 12, "age_s": 1.5, "kv_blocks": 4},
    {"request_id": "cmpl-b", "phase": "prefilling", "rank": 2, "prompt_tokens": 900, "generated_tokens": 0, "age_s": 0.2, "kv_blocks": 57},
]


async def test_requests_are_tagged_by_worker_and_a_bad_answer_is_reported(nats_server):
    subjects = Subjects("pd")
    nc = await connect_admin(nats_server.url, timeout=5.0)

    async def table(_: dict) -> dict:
        return {"instance": "decode-7", "ranks": 4, "requests": ROWS}

    async def other_contract(_: dict) -> dict:
        return {"instance": "decode-8", "items": []}

    services = [
        await start_admin(nc, subjects, "worker", "decode-7", {"requests": table}),
        await start_admin(nc, subjects, "worker", "decode-8", {"requests": other_contract}),
        await start_admin(nc, subjects, "worker", "decode-9", {}),  # a worker without the endpoint
    ]
    try:
        session = AdminSession(nc, nats_server.url, subjects, timeout=2.0)
        report = await take_requests(session)
        only_one = await take_requests(session, ["decode-7"])
    finally:
        for service in services:
            await service.stop()
        await nc.close()
    jsonschema.validate(versioned(report), load_schema("requests"))
    assert [(r["worker_id"], r["request_id"], r["phase"]) for r in report["requests"]] == [
        ("decode-7", "cmpl-a", "decoding"),
        ("decode-7", "cmpl-b", "prefilling"),
    ]
    assert [r.get("rank") for r in report["requests"]] == [None, 2] and report["requests"][0]["ranks"] == 4
    assert {e["instance"] for e in report["errors"]} == {"decode-8", "decode-9"}
    assert only_one["errors"] == [] and len(only_one["requests"]) == 2
    lines = requests_lines(report)
    assert "decode-7/0-3" in lines[1] and "disagg" in lines[1] and "decoding" in lines[1]  # held across the 4 ranks
    assert "decode-7/2 " in lines[2]
    assert any(line.startswith("decode-9: ") and "'requests'" in line for line in lines)
