"""The Kubernetes manifests (deploy/k8s): every overlay renders, every object validates
against the Kubernetes schemas (kubernetes-validate, offline), and every pdserve container's
command is one our CLI accepts."""

import re
from pathlib import Path

import kubernetes_validate
import pytest

from services.cli import build_parser
from tests.kustomize import KustomizeError, render

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"
OVERLAYS = ["base", "overlays/gpu", "overlays/strict-spread", "overlays/secure"]
SERVICES = {"scheduler", "gateway", "prefill", "decode"}


def by_kind_and_name(documents: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


def container(documents: list[dict], name: str) -> dict:
    kind = "StatefulSet" if name == "nats" else "Deployment"
    return by_kind_and_name(documents)[(kind, name)]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    documents = render(K8S / overlay)
    assert len(documents) == 8  # config, NATS (Service, StatefulSet), scheduler, gateway (+ Service), two pools
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_validation_rejects_a_broken_object():
    documents = render(K8S / "base")
    broken = by_kind_and_name(documents)[("Deployment", "scheduler")]
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def expanded_args(documents: list[dict], name: str) -> list[str]:
    """The container's args with $(VAR) filled in as the kubelet does, from its env and ConfigMap."""
    config = by_kind_and_name(documents)[("ConfigMap", "pdserve-config")]["data"]
    spec = container(documents, name)
    env = dict(config) | {e["name"]: e.get("value", f"<{e['name']}>") for e in spec.get("env", [])}
    env |= {"POD_IP": "10.0.0.7", "POD_NAME": f"{name}-0"}
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], arg) for arg in spec["args"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pdserve_command_parses(overlay, monkeypatch):
    documents = render(K8S / overlay)
    config = by_kind_and_name(documents)[("ConfigMap", "pdserve-config")]["data"]
    monkeypatch.setenv("PDSERVE_NATS", config["PDSERVE_NATS"])  # the services read it from envFrom
    parser = build_parser()
    for name in SERVICES:
        args = parser.parse_args(expanded_args(documents, name))
        assert args.nats == "nats://nats-0.nats:4222,nats://nats-1.nats:4222,nats://nats-2.nats:4222"
        if name in ("prefill", "decode"):
            assert args.ucx_host == "10.0.0.7"


def test_base_shape():
    documents = render(K8S / "base")
    objects = by_kind_and_name(documents)
    nats = objects[("StatefulSet", "nats")]
    assert nats["spec"]["replicas"] == 3
    routes = next(a for a in nats["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--routes="))
    assert routes.count("nats://") == 3
    assert objects[("Deployment", "scheduler")]["spec"]["replicas"] == 2  # one queue group
    gateway = container(documents, "gateway")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/live"
    assert objects[("Service", "gateway")]["spec"]["ports"][0]["port"] == 8000
    for pool in ("prefill", "decode"):
        env = {e["name"]: e for e in container(documents, pool)["env"]}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert "--ucx-host=$(POD_IP)" in container(documents, pool)["args"]


def test_overlays_change_what_they_say():
    base, gpu = render(K8S / "base"), render(K8S / "overlays/gpu")
    for pool in ("prefill", "decode"):
        assert "limits" not in container(base, pool)["resources"]
        assert container(gpu, pool)["resources"]["limits"] == {"nvidia.com/gpu": 1}
        assert container(gpu, pool)["image"] == "pdserve:dev-cuda"
    assert container(gpu, "gateway")["image"] == "pdserve:dev"  # the CPU services are untouched

    strict = render(K8S / "overlays/strict-spread")
    affinity = by_kind_and_name(strict)[("Deployment", "decode")]["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert list(affinity) == ["requiredDuringSchedulingIgnoredDuringExecution"]

    secure = render(K8S / "overlays/secure")
    for name, role in (("gateway", "gateway"), ("scheduler", "scheduler"), ("prefill", "worker"), ("decode", "worker")):
        env = {e["name"]: e for e in container(secure, name)["env"]}
        assert env["PDSERVE_NATS_CREDS"]["value"] == f"/etc/pdserve/nats/{role}.nk"
        volumes = by_kind_and_name(secure)[("Deployment", name)]["spec"]["template"]["spec"]["volumes"]
        assert volumes == [{"name": "nats-creds", "secret": {"secretName": f"pdserve-nats-{role}", "defaultMode": 0o400}}]
    api_key = {e["name"]: e for e in container(secure, "gateway")["env"]}["PDSERVE_API_KEY"]
    assert api_key["valueFrom"]["secretKeyRef"]["optional"] is False
    assert "--config=/etc/nats-auth/nats-server.conf" in container(secure, "nats")["args"]


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError):
        render(tmp_path)
