"""The compose files validate against the Compose specification's JSON schema (no Docker
engine here), and every service command is one our CLI accepts."""

import copy
import json
from importlib.metadata import distribution
from pathlib import Path

import jsonschema
import pytest
import yaml

from services.cli import build_parser

COMPOSE = Path(__file__).resolve().parent.parent / "compose"


def compose_schema() -> dict:
    # docker-compose 1.29's wheel ships the compose-spec schema; installed --no-deps for it.
    path = distribution("docker-compose").locate_file("compose/config/compose_spec.json")
    return json.loads(Path(path).read_text())


def load(name: str) -> dict:
    return yaml.safe_load((COMPOSE / name).read_text())


def merge(base: dict, override: dict) -> dict:
    """Compose's merge for what our override uses: mappings merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def without_extensions(document: dict) -> dict:
    return {k: v for k, v in document.items() if not k.startswith("x-")}


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]])
def test_compose_files_match_the_specification(files):
    document = load(files[0])
    for name in files[1:]:
        document = merge(document, without_extensions(load(name)))
    jsonschema.validate(document, compose_schema(), cls=jsonschema.Draft201909Validator)


def test_schema_rejects_a_broken_file():
    broken = load("docker-compose.yml")
    broken["services"]["gateway"]["depends_on"]["nats-1"]["condition"] = "whenever"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, compose_schema(), cls=jsonschema.Draft201909Validator)


NATS_NODES = ("nats-1", "nats-2", "nats-3")


def test_stack_shape():
    services = load("docker-compose.yml")["services"]
    assert set(services) == {*NATS_NODES, "scheduler", "gateway", "prefill", "decode"}
    for node in NATS_NODES:  # a three-node cluster: each routes to the other two
        command = services[node]["command"]
        routes = command[command.index("--routes") + 1].split(",")
        assert sorted(routes) == sorted(f"nats://{other}:6222" for other in NATS_NODES if other != node)
        assert "healthcheck" in services[node]
    for name in ("scheduler", "gateway", "prefill", "decode"):
        assert {node: dep["condition"] for node, dep in services[name]["depends_on"].items()} == dict.fromkeys(NATS_NODES, "service_healthy")
        assert services[name]["environment"]["PDSERVE_NATS"] == ",".join(f"nats://{node}:4222" for node in NATS_NODES)
    assert "/health" in services["gateway"]["healthcheck"]["test"][-1]  # healthy means ready to serve
    for scalable in ("prefill", "decode"):  # `--scale` needs no fixed name or host port
        assert "container_name" not in services[scalable] and "ports" not in services[scalable]
    gpu = load("docker-compose.gpu.yml")["services"]
    for worker in ("prefill", "decode"):
        devices = gpu[worker]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]


def test_every_service_command_parses(monkeypatch):
    for name, service in load("docker-compose.yml")["services"].items():
        if name not in NATS_NODES:
            monkeypatch.setenv("PDSERVE_NATS", service["environment"]["PDSERVE_NATS"])  # as the container sees it
            assert build_parser().parse_args(service["command"]).nats.count("nats://") == 3


def test_compose_is_secured_like_pdserve_up():
    """nats admits only the users of `pdserve nats-config`'s files; each service gets exactly
    its role's credentials as a Docker secret; the gateway cannot start without an API key."""
    from shared.nats_credentials import CredentialsDir
    from shared.nats_permissions import NatsRole

    document = load("docker-compose.yml")
    written = CredentialsDir(Path("nats-auth"))  # what `pdserve nats-config --out compose/nats-auth` writes
    assert document["configs"]["nats-server"]["file"] == f"./{written.server_config_path}"
    for node in NATS_NODES:  # every node of the cluster admits the same users
        nats = document["services"][node]
        config_target = nats["configs"][0]["target"]
        assert nats["command"][-2:] == ["-c", config_target] and nats["configs"][0]["source"] == "nats-server"
    roles = {"scheduler": NatsRole.SCHEDULER, "gateway": NatsRole.GATEWAY, "prefill": NatsRole.WORKER, "decode": NatsRole.WORKER}
    for name, role in roles.items():
        service = document["services"][name]
        (secret,) = service["secrets"]
        assert document["secrets"][secret]["file"] == f"./{written.creds_file(role)}"
        assert service["environment"]["PDSERVE_NATS_CREDS"] == f"/run/secrets/{secret}"
        assert service["environment"]["UCX_TLS"]  # the shared environment is kept
    assert document["services"]["gateway"]["environment"]["PDSERVE_API_KEY"].startswith("${PDSERVE_API_KEY:?")
    ignored = (COMPOSE.parent / ".gitignore").read_text().splitlines() + (COMPOSE.parent / ".dockerignore").read_text().splitlines()
    assert ignored.count("compose/nats-auth/") == 2  # secrets stay out of git and of images
