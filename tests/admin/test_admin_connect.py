"""`pdserve admin` fails fast: a wrong URL, a silent server or refused credentials get one clear line in seconds.

Each case runs the real CLI as a subprocess.
"""

import json
import socket
import subprocess
import sys
import time

import jsonschema
import pytest

from services.admin.connection import AUTHORIZATION, REFUSED, TIMED_OUT
from services.admin.schema import load_schema
from shared import processes
from shared.nats_server import nats_server_binary

TIMEOUT_S = 1.5
ANSWER_WITHIN_S = 10.0  # the bound: the timeout plus Python starts on a busy machine


def run_each(*commands: list[str]) -> list[tuple[subprocess.CompletedProcess, float]]:
    """Runs `pdserve admin <command> --timeout TIMEOUT_S` for each, one after the other; (result, seconds) each.

    One at a time, so each one's time is its own and not its siblings' on a busy machine.
    """
    results = []
    for command in commands:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "admin", *command, "--timeout", str(TIMEOUT_S)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        results.append((result, time.monotonic() - started))
    return results


def assert_one_line_failure(result: subprocess.CompletedProcess, seconds: float, url: str, cause: str) -> None:
    assert result.returncode == 1, result
    assert seconds < ANSWER_WITHIN_S
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no reconnect warnings, no traceback
    assert url in lines[0] and cause in lines[0], lines[0]


def assert_error_object(result: subprocess.CompletedProcess, url: str, cause: str) -> None:
    error = json.loads(result.stdout)
    jsonschema.validate(error, load_schema("error"))
    assert error["error"]["url"] == url and error["error"]["cause"] == cause
    assert error["error"]["message"] == result.stderr.strip()


@pytest.fixture(scope="module")
def secured_nats(tmp_path_factory):
    """A real nats-server that only lets user a with password b in."""
    config = tmp_path_factory.mktemp("nats") / "auth.conf"
    config.write_text("authorization { user: a, password: b }\n")
    port = processes.free_port()
    server = processes.spawn(
        [str(nats_server_binary()), "-c", str(config), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        processes.wait_for_port("127.0.0.1", port, timeout=10.0, proc=server)
        yield port
    finally:
        processes.stop([server])


def test_every_command_answers_a_closed_port_with_one_line():
    url = f"nats://127.0.0.1:{processes.free_port()}"  # nothing listens there
    # They share one connect path; status, drain (the longest-running) and a --json run stand for all.
    commands = [["status"], ["drain", "decode-0"]]
    results = run_each(*([*c, "--nats", url] for c in commands), ["status", "--nats", url, "--json"])
    for result, seconds in results:
        assert_one_line_failure(result, seconds, url, REFUSED)
    assert all(result.stdout == "" for result, _ in results[:-1])
    assert_error_object(results[-1][0], url, REFUSED)


def test_a_server_that_never_speaks_times_out_within_the_timeout():
    with socket.socket() as silent:  # accepts TCP (the kernel's backlog) but never sends INFO
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        [(result, seconds)] = run_each(["status", "--nats", url])
    assert_one_line_failure(result, seconds, url, TIMED_OUT)
    assert seconds >= TIMEOUT_S  # it did wait for the server, once


def test_refused_credentials_are_an_authorization_violation(secured_nats):
    anonymous, wrong, right = (f"nats://{userinfo}127.0.0.1:{secured_nats}" for userinfo in ("", "a:wrong@", "a:b@"))
    results = run_each(*(["status", "--nats", url, "--json"] for url in (anonymous, wrong, right)))
    for (result, seconds), url in zip(results[:2], (anonymous, wrong)):
        assert_one_line_failure(result, seconds, url, AUTHORIZATION)
        assert_error_object(result, url, AUTHORIZATION)
    reached = results[2][0]
    assert reached.returncode == 0, reached.stderr  # the server itself is fine: the credentials were the problem
    report = json.loads(reached.stdout)
    jsonschema.validate(report, load_schema("status"))
    assert report["services"] == [] and report["policy"] is None  # reached, and nothing runs there


def test_a_missing_credentials_file_names_the_flag():
    [(result, _)] = run_each(["status", "--nats", "nats://127.0.0.1:1", "--nats-creds", "/nonexistent/admin.creds"])
    assert result.returncode == 1
    assert "--nats-creds" in result.stderr and "/nonexistent/admin.creds" in result.stderr
