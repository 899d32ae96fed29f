"""Renders the kustomize subset deploy/k8s uses, so tests need no kustomize binary.

Supported, and nothing else (any other kustomization key is refused, so the manifests
cannot quietly depend on a feature this renderer would ignore):
- `resources`: YAML files (several documents each) and folders holding a kustomization;
- `patches`: `{path, target: {kind, name}}` whose file is a JSON 6902 patch (a list of
  `add` / `replace` / `remove` operations), applied to every resource the target names.
`kubectl apply -k` (kustomize) renders the same folders to the same objects.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KNOWN_KEYS = {"apiVersion", "kind", "resources", "patches"}


class KustomizeError(ValueError):
    pass


def render(folder: Path) -> list[dict]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{folder}/kustomization.yaml: unsupported keys {sorted(unknown)}")
    documents: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        if path.is_dir():
            documents += render(path)
        else:
            documents += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for patch in kustomization.get("patches", []):
        operations = yaml.safe_load((folder / patch["path"]).read_text())
        targets = [d for d in documents if _matches(d, patch["target"])]
        if not targets:
            raise KustomizeError(f"{folder}: patch {patch['path']} targets {patch['target']}, which no resource is")
        for document in targets:
            for operation in operations:
                _apply(document, operation, f"{folder / patch['path']}")
    return documents


def _matches(document: dict, target: dict) -> bool:
    return document.get("kind") == target.get("kind") and document["metadata"]["name"] == target.get("name")


def _apply(document: dict, operation: dict, where: str) -> None:
    op, pointer = operation["op"], operation["path"]
    *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in pointer.lstrip("/").split("/")]
    node: Any = document
    for part in parents:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError):
            raise KustomizeError(f"{where}: {pointer}: no {part!r} on the way") from None
    value = copy.deepcopy(operation.get("value"))
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op == "add":
            node.insert(index, value)
        elif op == "replace":
            node[index] = value
        elif op == "remove":
            del node[index]
        else:
            raise KustomizeError(f"{where}: unsupported op {op!r}")
        return
    if op in ("replace", "remove") and last not in node:
        raise KustomizeError(f"{where}: {op} {pointer}: nothing there")
    if op in ("add", "replace"):
        node[last] = value
    elif op == "remove":
        del node[last]
    else:
        raise KustomizeError(f"{where}: unsupported op {op!r}")
