"""API keys and NATS users: what each role may do, refused for real.

A real nats-server runs the config `pdserve nats-config` writes; clients connect with the
per-role credentials and try what their role must not do. A full `pdserve up` (tiny-llama)
shows the defaults: a generated API key, a secured embedded NATS whose admin credentials
`pdserve admin` finds by itself.
"""

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import nats
import openai
import pytest

from services.admin.client import call, discover
from services.cli import main as pdserve
from services.gateway.auth import ApiKeys, configured_keys
from shared import processes
from shared.admin import start_admin
from shared.nats_auth import NatsAuth, NatsAuthorizationError, NatsCredentialsError
from shared.nats_credentials import CredentialsDir, UserKey, write_private
from shared.nats_permissions import NatsRole, all_role_permissions
from shared.nats_server import EmbeddedNats
from shared.runtime import connect_nats
from shared.subjects import Subjects
from tests.stack import start_stack, stop_stack_group

SUBJECTS = Subjects("pd")
MODEL = "tiny-llama"


def matches(pattern: str, subject: str) -> bool:
    """NATS wildcard semantics: `*` one token, `>` one or more trailing tokens."""
    tokens, wanted = pattern.split("."), subject.split(".")
    for i, token in enumerate(tokens):
        if token == ">":
            return len(wanted) > i
        if i >= len(wanted) or token not in ("*", wanted[i]):
            return False
    return len(tokens) == len(wanted)


def who_may(action: str, subject: str, subjects: Subjects = SUBJECTS) -> set[str]:
    table = all_role_permissions(subjects)
    return {role.value for role, perms in table.items() if any(matches(p, subject) for p in getattr(perms, action))}


# --- the permission table (pure) ------------------------------------------------------


@pytest.mark.parametrize(
    "action, subject, roles",
    [
        ("publish", SUBJECTS.place, {"gateway", "worker"}),  # a worker asks for another decoder
        ("subscribe", SUBJECTS.place, {"scheduler"}),
        ("publish", SUBJECTS.ready, {"gateway"}),  # /health asks a scheduler
        ("subscribe", SUBJECTS.ready, {"scheduler"}),
        ("publish", SUBJECTS.worker_prefill("prefill-0"), {"gateway"}),
        ("publish", SUBJECTS.worker_decode("decode-1"), {"worker"}),  # hand-offs go worker to worker
        ("publish", SUBJECTS.worker_cancel("decode-1"), {"gateway"}),
        ("subscribe", SUBJECTS.worker_decode("decode-1"), {"worker"}),
        ("publish", SUBJECTS.heartbeat("decode", "decode-1"), {"worker"}),
        ("subscribe", SUBJECTS.heartbeat("decode", "decode-1"), {"scheduler", "worker", "admin"}),
        ("publish", SUBJECTS.stream("chatcmpl-1"), {"worker"}),
        ("subscribe", SUBJECTS.stream("chatcmpl-1"), {"gateway"}),
        ("publish", SUBJECTS.worker_down, {"scheduler"}),  # failure detection: schedulers tell gateways
        ("subscribe", SUBJECTS.worker_down, {"gateway", "admin"}),
        ("publish", SUBJECTS.admin("decode-1", "drain"), {"admin"}),
        ("subscribe", SUBJECTS.admin("decode-1", "drain"), {"gateway", "scheduler", "worker"}),
        ("publish", "$SRV.PING", {"admin"}),
        ("subscribe", "$SRV.INFO.pdserve-worker", {"gateway", "scheduler", "worker"}),
        ("publish", "pd.anything.else", set()),
        ("subscribe", ">", set()),
    ],
)
def test_each_subject_belongs_to_the_roles_that_need_it(action, subject, roles):
    assert who_may(action, subject) == roles


def test_replies_go_to_each_roles_own_inbox_and_prefixes_stay_apart():
    for role in NatsRole:
        assert who_may("subscribe", f"_INBOX.pd.{role.value}.abc123") == {role.value}
    other = Subjects("blue")
    assert who_may("publish", SUBJECTS.place, other) == set() and who_may("subscribe", SUBJECTS.stream("r"), other) == set()
    entries = {role: perms.server_entry() for role, perms in all_role_permissions(SUBJECTS).items()}
    assert entries[NatsRole.SCHEDULER]["publish"] == {"allow": [SUBJECTS.worker_down]}  # answers requests; announces dead workers
    assert [role for role, entry in entries.items() if not entry["allow_responses"]] == [NatsRole.ADMIN]


def test_api_keys_compare_every_key_and_refuse_by_reason():
    keys = ApiKeys(["first-key", "second-key"])
    assert keys.refusal("Bearer second-key") is None and keys.refusal("bearer first-key") is None
    assert "didn't provide" in keys.refusal(None) and "didn't provide" in keys.refusal("Basic Zm9vOmJhcg==")
    assert keys.refusal("Bearer second-ke") == keys.refusal("Bearer \udcff") == "Incorrect API key provided."
    assert configured_keys(None, {"PDSERVE_API_KEY": " a, b ,"}) == ["a", "b"]
    assert configured_keys(["x"], {"PDSERVE_API_KEY": "a"}) == ["x"]
    with pytest.raises(ValueError, match="--api-key"):
        configured_keys(["has,comma"], {})


# --- a real nats-server with the config `pdserve nats-config` writes ----------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    out = tmp_path_factory.mktemp("auth") / "nats-auth"
    assert pdserve(["nats-config", "--out", str(out)]) == 0
    with EmbeddedNats(config=CredentialsDir(out).server_config_path) as server:
        yield server.url, CredentialsDir(out)


def test_nats_config_writes_private_files_and_keeps_existing_ones(secured, capsys):
    _, creds = secured
    assert stat.S_IMODE(creds.path.stat().st_mode) == 0o700
    for path in [creds.server_config_path, *map(creds.creds_file, NatsRole)]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert all(creds.creds_file(role).read_text().startswith("SU") for role in NatsRole)
    before = creds.creds_file(NatsRole.ADMIN).read_text()
    assert pdserve(["nats-config", "--out", str(creds.path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert creds.creds_file(NatsRole.ADMIN).read_text() == before


class Client:
    """A connection as one role that records the server's refusals."""

    def __init__(self, url: str, creds: CredentialsDir, role: NatsRole):
        self.url, self.options, self.errors = url, NatsAuth(creds.creds_file(role)).connect_options(SUBJECTS, role), []
        self.received: list[bytes] = []

    async def __aenter__(self):
        async def on_error(exc):
            self.errors.append(str(exc))

        self.nc = await nats.connect(self.url, error_cb=on_error, allow_reconnect=False, **self.options)
        return self

    async def __aexit__(self, *exc):
        await self.nc.close()

    async def collect(self, msg):
        self.received.append(msg.data)


async def settle(*clients: Client) -> None:
    for client in clients:
        await client.nc.flush()
    await asyncio.sleep(0.3)  # refusals arrive asynchronously


async def test_anonymous_and_unknown_clients_get_no_access(secured):
    url, _ = secured
    with pytest.raises(nats.errors.Error) as anonymous:
        await nats.connect(url, allow_reconnect=False)
    stranger = write_seed(Path(os.environ.get("TMPDIR", "/tmp")) / f"stranger-{os.getpid()}.nk")
    try:
        started = time.monotonic()
        with pytest.raises(NatsAuthorizationError):
            await connect_nats(url, "stranger", options=NatsAuth(stranger).connect_options(SUBJECTS, NatsRole.ADMIN))
        elapsed = time.monotonic() - started
    finally:
        stranger.unlink()
    assert "authorization violation" in str(anonymous.value).lower()
    assert elapsed < 10  # refused at once, not retried for ever


def write_seed(path: Path) -> Path:
    write_private(path, UserKey.generate().seed + "\n")
    return path


async def test_worker_cannot_call_admin_or_take_placements_but_admin_can(secured):
    url, creds = secured
    async with (
        Client(url, creds, NatsRole.SCHEDULER) as scheduler,
        Client(url, creds, NatsRole.WORKER) as worker,
        Client(url, creds, NatsRole.GATEWAY) as gateway,
        Client(url, creds, NatsRole.ADMIN) as admin,
    ):

        async def status(_: dict) -> dict:
            return {"kind": "scheduler", "answered": True}

        async def place(msg):
            await msg.respond(b"decode-1")

        service = await start_admin(scheduler.nc, SUBJECTS, "scheduler", "scheduler-t", {"status": status})
        await scheduler.nc.subscribe(SUBJECTS.place, cb=place)
        await worker.nc.subscribe(SUBJECTS.place, cb=worker.collect)
        await settle(scheduler, worker)
        await gateway.nc.publish(SUBJECTS.place, b"placement")
        with pytest.raises(nats.errors.TimeoutError):
            await worker.nc.request(SUBJECTS.admin("scheduler-t", "drain"), b"{}", timeout=1.0)
        await settle(gateway, worker)
        answer = await call(admin.nc, SUBJECTS, "scheduler-t", "status")
        another_decoder = await worker.nc.request(SUBJECTS.place, b"exclude decode-0", timeout=2.0)  # hand-off retry
        found = await discover(admin.nc, "pd", wait_s=0.3)
        await service.stop()
    assert answer == {"kind": "scheduler", "answered": True}
    assert another_decoder.data == b"decode-1"
    assert [s["metadata"]["instance"] for s in found] == ["scheduler-t"]
    assert worker.received == []
    assert any("subscription" in e and SUBJECTS.place in e for e in worker.errors), worker.errors
    assert any("publish" in e and SUBJECTS.admin("scheduler-t", "drain") in e for e in worker.errors), worker.errors


async def test_gateway_cannot_publish_heartbeats_or_tokens(secured):
    url, creds = secured
    heartbeat, stream = SUBJECTS.heartbeat("decode", "decode-0"), SUBJECTS.stream("chatcmpl-1")
    async with (
        Client(url, creds, NatsRole.GATEWAY) as gateway,
        Client(url, creds, NatsRole.ADMIN) as watcher,
        Client(url, creds, NatsRole.WORKER) as worker,
    ):
        await watcher.nc.subscribe(SUBJECTS.all_heartbeats, cb=watcher.collect)
        await gateway.nc.subscribe(stream, cb=gateway.collect)
        await settle(watcher, gateway)
        for client in (gateway, worker):
            name = client.options["inbox_prefix"].rsplit(".", 1)[1].encode()
            await client.nc.publish(heartbeat, b"beat from " + name)
            await client.nc.publish(stream, b"token from " + name)
        await settle(gateway, worker, watcher)
    assert watcher.received == [b"beat from worker"]
    assert gateway.received == [b"token from worker"]
    assert any(heartbeat in e for e in gateway.errors) and any(stream in e for e in gateway.errors), gateway.errors


def cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *argv], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


async def test_services_take_credentials_from_the_environment_and_fail_fast_without(secured):
    url, creds = secured
    with pytest.raises(NatsCredentialsError, match="--nats-creds"):
        NatsAuth(creds.server_config_path).connect_options(SUBJECTS, NatsRole.SCHEDULER)  # not a credentials file
    scheduler_argv = [sys.executable, "-m", "services.cli", "scheduler", "--nats", url]
    anonymous = subprocess.Popen(scheduler_argv, stderr=subprocess.PIPE, text=True)
    scheduler = processes.spawn(scheduler_argv, env={**os.environ, "PDSERVE_NATS_CREDS": str(creds.creds_file(NatsRole.SCHEDULER))})
    try:
        _, refusal = anonymous.communicate(timeout=60)
        async with Client(url, creds, NatsRole.ADMIN) as admin:
            deadline = time.monotonic() + 60
            while not (found := await discover(admin.nc, "pd", wait_s=0.3)) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            status = await call(admin.nc, SUBJECTS, found[0]["metadata"]["instance"], "status")
    finally:
        processes.stop([scheduler])
    assert anonymous.returncode == 2 and "refused" in refusal, refusal
    assert [s["metadata"]["kind"] for s in found] == ["scheduler"]
    assert status["workers"] == []


def test_tls_options_reach_the_connection(tmp_path):
    if subprocess.run(["openssl", "version"], capture_output=True).returncode != 0:
        pytest.skip("openssl is needed to make a test certificate")
    ca, cert, key = make_certificates(tmp_path)
    creds = CredentialsDir(tmp_path / "auth").write(SUBJECTS, {"tls": {"cert_file": str(cert), "key_file": str(key)}})

    async def connect(auth: NatsAuth):
        nc = await nats.connect(server.url, allow_reconnect=False, **auth.connect_options(SUBJECTS, NatsRole.ADMIN))
        await nc.close()

    with EmbeddedNats(config=creds.server_config_path) as server:
        asyncio.run(connect(NatsAuth(creds.creds_file(NatsRole.ADMIN), tls_ca=ca)))
        with pytest.raises(Exception) as untrusted:  # the system's CAs do not know ours
            asyncio.run(connect(NatsAuth(creds.creds_file(NatsRole.ADMIN), tls_ca=None)))
    assert "certificate" in repr(untrusted.value).lower() or "tls" in repr(untrusted.value).lower()
    with pytest.raises(NatsCredentialsError, match="--nats-tls-ca"):
        NatsAuth(tls_ca=tmp_path / "missing.pem").connect_options(SUBJECTS, NatsRole.ADMIN)


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    ca, ca_key, cert, key, csr = (folder / n for n in ("ca.pem", "ca.key", "server.pem", "server.key", "server.csr"))
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (
        f"req -x509 -newkey rsa:2048 -nodes -keyout {ca_key} -out {ca} -days 1 -subj /CN=pdserve-test-ca",
        f"req -newkey rsa:2048 -nodes -keyout {key} -out {csr} -subj /CN=127.0.0.1",
        f"x509 -req -in {csr} -CA {ca} -CAkey {ca_key} -CAcreateserial -out {cert} -days 1 -extfile {folder / 'san.ext'}",
    ):
        subprocess.run(["openssl", *command.split()], check=True, capture_output=True)
    return ca, cert, key


# --- the defaults of `pdserve up` ----------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # Its own state directory: `pdserve admin` without --nats must find this stack, not
    # another one running on the machine.
    state = {"PDSERVE_STATE_DIR": str(tmp_path_factory.mktemp("state"))}
    running = start_stack("--model", MODEL, "--threads", "1", open_gateway=False, env=state)
    running.env = state
    entry = json.loads(next(Path(state["PDSERVE_STATE_DIR"], "stacks").glob("*.json")).read_text())
    yield running, entry
    assert stop_stack_group(running.proc), "pdserve up left processes behind"
    assert not Path(entry["admin_creds"]).parent.exists(), "the stack's credentials outlived it"


async def get(url: str, headers: dict | None = None) -> tuple[int, str, dict | str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers or {}) as response:
            text = await response.text()
            return response.status, response.headers.get("WWW-Authenticate", ""), json.loads(text) if response.content_type == "application/json" else text


async def test_up_generates_a_key_and_refuses_requests_without_it(stack):
    running, _ = stack
    assert running.api_key and running.api_key.startswith("pd-")
    models = f"{running.base_url}/models"
    missing = await get(models)
    wrong = await get(models, {"Authorization": "Bearer pd-not-the-key"})
    right = await get(models, {"Authorization": f"Bearer {running.api_key}"})
    for status, challenge, body in (missing, wrong):
        assert (status, challenge, body["error"]["code"], body["error"]["type"]) == (401, "Bearer", "invalid_api_key", "invalid_request_error")
    assert "didn't provide" in missing[2]["error"]["message"] and "Incorrect" in wrong[2]["error"]["message"]
    assert right[0] == 200 and right[2]["data"][0]["id"] == MODEL
    for open_path in ("/health", "/metrics"):
        assert (await get(running.root_url + open_path))[0] == 200, open_path


async def test_openai_client_with_the_key_streams_and_without_it_is_refused(stack):
    running, _ = stack
    messages = [{"role": "user", "content": "hello"}]
    client = openai.AsyncOpenAI(base_url=running.base_url, api_key=running.api_key)
    stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, stream=True, extra_body={"ignore_eos": True})
    pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    await client.close()
    intruder = openai.AsyncOpenAI(base_url=running.base_url, api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        await intruder.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    await intruder.close()
    assert len(pieces) >= 1
    assert refused.value.code == "invalid_api_key"


async def test_embedded_nats_is_locked_and_admin_finds_its_credentials(stack):
    running, entry = stack
    with pytest.raises(nats.errors.Error):
        await nats.connect(running.nats_url, allow_reconnect=False)
    creds = Path(entry["admin_creds"])
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600 and stat.S_IMODE(creds.parent.stat().st_mode) == 0o700
    registry = next(Path(running.env["PDSERVE_STATE_DIR"], "stacks").glob("*.json"))
    assert stat.S_IMODE(registry.stat().st_mode) == 0o600
    assert "SU" not in registry.read_text()  # a path to the secret, never the secret
    status = cli("admin", "status", "--json", env=running.env)  # no --nats, no --nats-creds
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert sorted(s["kind"] for s in report["services"]) == ["gateway", "scheduler", "worker", "worker"]
    assert {w["worker_id"] for w in report["workers"]} == {"prefill-0", "decode-0"}
    secrets_in_argv = [pid for pid in processes.children_of(running.proc.pid) if "SU" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert secrets_in_argv == []
