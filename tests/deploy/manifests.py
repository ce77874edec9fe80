"""What tests/deploy/test_manifests.py reads from deploy/: the Kubernetes resources as kustomize
lists them, the compose files, the Dockerfiles, and the setting names `streams.settings` knows.
Reading only: no cluster, no container engine, no network."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from streams.settings import Settings
from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
GPU_OVERLAY = K8S / "gpu"
KUSTOMIZATION = "kustomization.yaml"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_OVERRIDES = (DEPLOY / "docker-compose.model.yml", DEPLOY / "docker-compose.gpu.yml")
DOCKERFILES = (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.gpu")

Doc = dict[str, Any]

# A setting as named in a file: INTEREST_ and upper-case words (`INTEREST_SSL_*` names a prefix).
SETTING_NAME = re.compile(r"(?<![A-Za-z0-9_])INTEREST_[A-Z0-9_]+")
# Compose interpolation with a default: ${NAME:-default} or ${NAME-default}.
COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def yaml_documents(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization(folder: Path = K8S) -> Doc:
    return yaml_documents(folder / KUSTOMIZATION)[0]


def k8s_resources() -> list[Doc]:
    """Every resource of the base, in the order its kustomization lists the files."""
    return [doc for name in kustomization()["resources"] for doc in yaml_documents(K8S / name)]


def find(resources: list[Doc], kind: str, name: str | None = None) -> Doc:
    """The one resource of this kind (and name); a clear failure when there is not one."""
    found = [
        doc for doc in resources if doc["kind"] == kind and name in (None, doc["metadata"]["name"])
    ]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def workloads(resources: list[Doc]) -> list[Doc]:
    return [doc for doc in resources if doc["kind"] == "Deployment"]


def container(deployment: Doc) -> Doc:
    """The one container of a Deployment's pods (each of ours runs one process)."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


def setting(data: dict[str, str], env_name: str) -> str:
    """A setting as the ConfigMap sets it, else its default in `Settings`."""
    if env_name in data:
        return str(data[env_name])
    return str(Settings.model_fields[env_name.removeprefix("INTEREST_").lower()].default)


def setting_env_names() -> set[str]:
    """The variables `Settings` reads: INTEREST_<FIELD>, plus any alias a field declares."""
    names = set()
    for field_name, field in Settings.model_fields.items():
        names.add(f"INTEREST_{field_name.upper()}")
        for alias in (field.alias, field.validation_alias):
            if isinstance(alias, str):
                names.add(alias.upper())
    return names


def unknown_setting_names(text: str, known: set[str]) -> set[str]:
    """INTEREST_* names in `text` that no setting has (a trailing _ is a prefix of some)."""
    unknown = set()
    for name in SETTING_NAME.findall(text):
        if name.endswith("_"):
            if not any(known_name.startswith(name) for known_name in known):
                unknown.add(name)
        elif name not in known:
            unknown.add(name)
    return unknown


def deploy_text_files() -> list[Path]:
    """The configuration and documentation under deploy/ (not bundles a user put there)."""
    bundles = DEPLOY / "bundles"
    return sorted(
        path
        for path in DEPLOY.rglob("*")
        if path.is_file()
        and (path.suffix in (".yml", ".yaml", ".md", ".py") or path.name.startswith("Dockerfile"))
        and (bundles not in path.parents or path == bundles / "README.md")
    )


def interpolate(value: Any) -> Any:
    """A compose value with each ${NAME:-default} replaced by its default, as for an unset NAME."""
    if not isinstance(value, str):
        return value
    return COMPOSE_VARIABLE.sub(lambda match: match.group(2) or "", value)


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics; an empty selector selects every pod (policy/v1)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def strategic_merge(base: Any, patch: Any) -> Any:
    """A new object: `patch` merged into `base` as kubectl's strategic merge does for the keys
    the GPU overlay patches (maps merge; lists of named items, like containers, merge by name;
    other lists are replaced). `$patch` directives are not handled: the test refuses them."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        patched = {item["name"]: item for item in patch}
        merged = [strategic_merge(item, patched.get(item["name"], {})) for item in base]
        names = {item["name"] for item in base}
        return merged + [item for item in patch if item["name"] not in names]
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return all(isinstance(item, dict) and "name" in item for item in items)


def replaced(doc: Any, keys: tuple[Any, ...], value: Any) -> Any:
    """A deep copy of `doc` with the item at `keys` set to `value` (for the broken variants)."""
    changed = copy.deepcopy(doc)
    target = changed
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return changed


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (line.strip().split(None, 1) for line in joined.splitlines())
        if parts
    ]


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions of the last FROM onwards: what the image runs with."""
    starts = [i for i, (name, _) in enumerate(instructions) if name == "FROM"]
    return instructions[starts[-1] :]
