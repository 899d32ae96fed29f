"""`pdserve up` start-up: children's logs to files, loading progress, and a start-up failure
that names the service and shows the last lines of its log."""

import io
import json
import sys

import pytest

from services.startup_progress import Progress, ReadyCheck, ServiceLogs, StartupError, StartupView, readable, wait_until_ready
from shared.processes import stop
from shared.subjects import Subjects


def child_script(lines: list[dict], exit_code: int | None) -> list[str]:
    body = "; ".join(f"print({json.dumps(json.dumps(line))}, flush=True)" for line in lines)
    tail = f"; import sys; sys.exit({exit_code})" if exit_code is not None else "; import time; time.sleep(60)"
    return [sys.executable, "-c", body + tail]


async def test_a_worker_that_dies_is_named_with_the_last_lines_of_its_log(nats_server, tmp_path):
    stream = io.StringIO()
    logs = ServiceLogs(tmp_path, stream=stream)
    progress = [{"event": "load_progress", "stage": "converting GGUF weights", "done": i, "total": 4} for i in range(1, 5)]
    crash = {"event": "worker_failed", "level": "error", "error": "CUDA out of memory"}
    logs.spawn("scheduler", child_script([{"event": "scheduler_started"}], None))
    logs.spawn("decode-0", child_script(progress + [crash], exit_code=3))
    check = ReadyCheck(nats_server.url, Subjects("pdstart"), {"decode-0"}, "gateway", "http://127.0.0.1:9/health", 30, lambda: False)
    try:
        with pytest.raises(StartupError) as error:
            await wait_until_ready(check, logs)
    finally:
        stop([s.proc for s in logs.services])
    message = str(error.value)
    assert message.startswith("decode-0 exited with code 3")
    assert str(tmp_path / "decode-0.log") in message
    assert "worker_failed" in message and "CUDA out of memory" in message
    assert "worker_failed" in (tmp_path / "decode-0.log").read_text()  # the whole log stays on disk
    plain = stream.getvalue()  # not a terminal: children's lines are forwarded as they are
    assert '"event": "scheduler_started"' in plain
    assert "pdserve up: decode-0: converting GGUF weights" in plain


def test_plain_view_prints_a_line_per_stage_and_per_ten_percent(tmp_path):
    stream = io.StringIO()
    logs = ServiceLogs(tmp_path, stream=stream)
    view = StartupView(logs)
    view.draw({"decode-0": Progress("reading weights")}, ["decode-0"])
    for done in range(0, 201):
        view.draw({"decode-0": Progress("converting GGUF weights", done, 200)}, ["decode-0"])
    view.draw({"decode-0": "ready"}, [])
    lines = stream.getvalue().splitlines()
    assert lines[0] == "pdserve up: decode-0: reading weights"
    assert len([line for line in lines if "converting" in line]) == 11  # 0%, 10%, ..., 100%
    assert lines[-1] == "pdserve up: decode-0: ready"


def test_progress_bar_text_and_readable_log_lines():
    assert Progress("converting GGUF weights", 68, 272).text() == "converting GGUF weights [#####               ]  25% (68/272)"
    assert Progress("building model").text() == "building model"
    line = readable(json.dumps({"event": "worker_started", "level": "info", "worker_id": "decode-0"}))
    assert "worker_started" in line and "worker_id=decode-0" in line and not line.startswith("{")
    assert readable("not json") == "not json"
