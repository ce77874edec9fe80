"""deploy/ as far as it can be proven without a container engine or a cluster: the Kubernetes
manifests valid against the Kubernetes JSON schemas (offline, kubernetes-validate), and the KEDA
ScaledObject, probes, PDB, Services, bundle volume and kustomize file lists consistent with each
other and with the ConfigMap; the compose files' services, builds and mounts; the Dockerfiles;
every INTEREST_* name a real setting and every value one it accepts. Each check is a function
returning its problems, run on the real files (none) and on a broken copy (some), so that each
check is seen to fail."""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
import tomllib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, get_args

import kubernetes_validate
import pytest
from pydantic import SecretStr, ValidationError

from streams.settings import Settings
from tests.conftest import REPO_ROOT
from tests.deploy.manifests import (
    COMPOSE,
    COMPOSE_OVERRIDES,
    DEPLOY,
    DOCKERFILES,
    GPU_OVERLAY,
    K8S,
    KUSTOMIZATION,
    Doc,
    container,
    deploy_text_files,
    dockerfile_instructions,
    final_stage,
    find,
    interpolate,
    k8s_resources,
    kustomization,
    replaced,
    selects,
    setting,
    setting_env_names,
    strategic_merge,
    unknown_setting_names,
    workloads,
    yaml_documents,
)

# The oldest Kubernetes deploy/README.md names and the newest the validator bundles.
KUBERNETES_VERSIONS = ("1.30", "1.37")
WORKER, INGEST, MONITOR = "interest-worker", "interest-ingest", "interest-monitor"
COMPOSE_SERVICES = {"kafka", "redis", "worker", "ingest", "monitor", "prometheus", "grafana"}
TEMPLATE_LABELS = ("spec", "template", "metadata", "labels")
POD = ("spec", "template", "spec")


@pytest.fixture(scope="module")
def resources() -> list[Doc]:
    return k8s_resources()


@pytest.fixture(scope="module")
def config(resources: list[Doc]) -> dict[str, str]:
    return find(resources, "ConfigMap")["data"]


# --- Kubernetes schemas ---


def schema_problems(doc: Doc, version: str) -> list[str]:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(map(str, exc.path))
        return [f"{doc['kind']}/{doc['metadata']['name']} {where}: {exc.message}"]
    return []


def has_schema(doc: Doc, version: str) -> bool:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:
        pass
    return True


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(
    resources: list[Doc], version: str
) -> None:
    unchecked = {doc["kind"] for doc in resources if not has_schema(doc, version)}
    assert unchecked == {"ScaledObject"}  # KEDA's CRD: checked by its own test below
    checked = [doc for doc in resources if doc["kind"] != "ScaledObject"]
    assert {doc["kind"] for doc in checked} == {
        "Namespace",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }
    assert [problem for doc in checked for problem in schema_problems(doc, version)] == []


def test_the_schemas_catch_a_misspelt_field_and_a_wrong_type(resources: list[Doc]) -> None:
    worker = find(resources, "Deployment", WORKER)
    misspelt = replaced(worker, (*POD, "containers", 0, "livenesProbe"), {})
    wrong_type = replaced(worker, (*POD, "terminationGracePeriodSeconds"), "60")
    for version in KUBERNETES_VERSIONS:
        assert schema_problems(misspelt, version)
        assert schema_problems(wrong_type, version)


# --- kustomize ---


def kustomization_problems(folder: Path) -> list[str]:
    """The files a kustomization lists (resources and patches) are exactly the folder's."""
    spec = kustomization(folder)
    listed = [*spec.get("resources", []), *(p["path"] for p in spec.get("patches", []))]
    problems = [f"listed twice: {name}" for name in set(listed) if listed.count(name) > 1]
    problems += [f"missing: {name}" for name in listed if not (folder / name).exists()]
    local = {name for name in listed if "/" not in name.rstrip("/")} - {"../"}
    present = {path.name for path in folder.glob("*.yaml")} - {KUSTOMIZATION}
    problems += [f"not listed: {name}" for name in sorted(present - local)]
    return problems


def test_each_kustomization_lists_exactly_the_files_present(tmp_path: Path) -> None:
    assert kustomization_problems(K8S) == []
    assert kustomization_problems(GPU_OVERLAY) == []
    assert kustomization(GPU_OVERLAY)["resources"] == ["../"]
    for path in K8S.glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "forgotten.yaml").write_text("kind: ConfigMap\n")
    (tmp_path / "worker-pdb.yaml").unlink()
    assert kustomization_problems(tmp_path) == [
        "missing: worker-pdb.yaml",
        "not listed: forgotten.yaml",
    ]


def test_every_resource_is_in_the_kustomization_namespace(resources: list[Doc]) -> None:
    namespace = kustomization()["namespace"]
    assert find(resources, "Namespace")["metadata"]["name"] == namespace
    for doc in resources:
        assert doc["metadata"].get("namespace", namespace) == namespace, doc["metadata"]["name"]


def test_every_image_is_one_the_kustomizations_rename(resources: list[Doc]) -> None:
    base = {image["name"] for image in kustomization()["images"]}
    for deployment in workloads(resources):
        assert container(deployment)["image"].split(":")[0] in base
    patch = yaml_documents(GPU_OVERLAY / "worker-gpu.yaml")[0]
    gpu = {image["name"] for image in kustomization(GPU_OVERLAY)["images"]}
    assert container(patch)["image"].split(":")[0] in gpu


# --- KEDA ---


def scaledobject_problems(scaled: Doc, worker: Doc, config: dict[str, str]) -> list[str]:
    """Scales the worker Deployment on the group's lag of the input topics, 1..partitions."""
    problems = []
    if (scaled["apiVersion"], scaled["kind"]) != ("keda.sh/v1alpha1", "ScaledObject"):
        problems.append(f"not a KEDA ScaledObject: {scaled['apiVersion']} {scaled['kind']}")
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    if (target.get("kind", "Deployment"), target["name"]) != (
        "Deployment",
        worker["metadata"]["name"],
    ):
        problems.append(f"scales {target}, not the worker Deployment")
    if "replicas" in worker["spec"]:
        problems.append("the worker Deployment sets replicas, which KEDA owns")
    partitions = int(setting(config, "INTEREST_TOPIC_PARTITIONS"))
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)  # KEDA's defaults
    if not 1 <= low <= high <= partitions:
        problems.append(f"replicas {low}..{high} not within 1..{partitions} partitions")
    problems += trigger_problems(spec["triggers"], config)
    return problems


def trigger_problems(triggers: list[Doc], config: dict[str, str]) -> list[str]:
    problems, topics = [], set()
    expected = {
        "consumerGroup": setting(config, "INTEREST_GROUP_ID"),
        "bootstrapServers": setting(config, "INTEREST_BOOTSTRAP_SERVERS"),
    }
    for trigger in triggers:
        metadata = trigger.get("metadata", {})
        if trigger["type"] != "kafka":
            problems.append(f"trigger type {trigger['type']}, not kafka")
        for key, value in expected.items():
            if metadata.get(key) != value:
                problems.append(f"{key} {metadata.get(key)!r}, the ConfigMap says {value!r}")
        if not str(metadata.get("lagThreshold", "")).isdigit():
            problems.append(f"lagThreshold {metadata.get('lagThreshold')!r}")
        if metadata.get("allowIdleConsumers", "false") != "false":
            problems.append(
                "allowIdleConsumers lets the scaler ask for more workers than partitions"
            )
        topics.add(metadata.get("topic"))
    inputs = {setting(config, "INTEREST_TOPIC_CLICKS"), setting(config, "INTEREST_TOPIC_PURCHASES")}
    if topics != inputs:
        problems.append(f"triggers on {topics}, the input topics are {inputs}")
    return problems


def test_keda_scales_the_workers_on_lag_never_beyond_the_partitions(
    resources: list[Doc], config: dict[str, str]
) -> None:
    scaled = find(resources, "ScaledObject")
    worker = find(resources, "Deployment", WORKER)
    assert scaledobject_problems(scaled, worker, config) == []
    partitions = int(config["INTEREST_TOPIC_PARTITIONS"])
    broken = [
        replaced(scaled, ("spec", "maxReplicaCount"), partitions + 1),
        replaced(scaled, ("spec", "minReplicaCount"), 0),
        replaced(scaled, ("spec", "scaleTargetRef", "name"), INGEST),
        replaced(scaled, ("spec", "triggers", 0, "type"), "cpu"),
        replaced(scaled, ("spec", "triggers", 0, "metadata", "consumerGroup"), "other"),
        replaced(scaled, ("spec", "triggers", 1, "metadata", "topic"), "recommendations"),
        replaced(scaled, ("apiVersion",), "autoscaling/v2"),
    ]
    for variant in broken:
        assert scaledobject_problems(variant, worker, config), variant["spec"]
    fewer_partitions = {**config, "INTEREST_TOPIC_PARTITIONS": "2"}
    assert scaledobject_problems(scaled, worker, fewer_partitions)
    assert scaledobject_problems(scaled, replaced(worker, ("spec", "replicas"), 3), config)


# --- selectors: the PDB, the Deployments and the Services ---


def pdb_problems(pdb: Doc, deployments: list[Doc]) -> list[str]:
    """The budget covers the worker pods and no others."""
    problems = []
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        chosen = selects(pdb["spec"]["selector"], labels_of(deployment))
        if name == WORKER and not chosen:
            problems.append("does not select the worker pods")
        if name != WORKER and chosen:
            problems.append(f"also selects the {name} pods")
    if not {"maxUnavailable", "minAvailable"} & set(pdb["spec"]):
        problems.append("no budget")
    return problems


def labels_of(deployment: Doc) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_the_pdb_selects_the_workers_and_only_them(resources: list[Doc]) -> None:
    pdb = find(resources, "PodDisruptionBudget")
    deployments = workloads(resources)
    assert pdb_problems(pdb, deployments) == []
    component = ("spec", "selector", "matchLabels", "app.kubernetes.io/component")
    assert pdb_problems(replaced(pdb, component, "workers"), deployments)
    assert pdb_problems(replaced(pdb, ("spec", "selector"), {}), deployments)
    wrong_pods = [
        replaced(d, (*TEMPLATE_LABELS, "app.kubernetes.io/component"), "x") for d in deployments
    ]
    assert pdb_problems(pdb, wrong_pods)


def test_each_deployment_selects_its_own_pods_and_no_other(resources: list[Doc]) -> None:
    deployments = workloads(resources)
    assert {d["metadata"]["name"] for d in deployments} == {WORKER, INGEST, MONITOR}
    for deployment in deployments:
        for other in deployments:
            chosen = selects(deployment["spec"]["selector"], labels_of(other))
            assert chosen == (other is deployment), (
                deployment["metadata"]["name"],
                other["metadata"]["name"],
            )


def service_problems(service: Doc, deployments: list[Doc], name: str, port: int) -> list[str]:
    """The Service sends to deployment `name`'s pods only, on their container port `port`."""
    problems = []
    for deployment in deployments:
        chosen = selects({"matchLabels": service["spec"]["selector"]}, labels_of(deployment))
        if chosen != (deployment["metadata"]["name"] == name):
            problems.append(f"selects {deployment['metadata']['name']}: {chosen}")
    target = next(d for d in deployments if d["metadata"]["name"] == name)
    for entry in service["spec"]["ports"]:
        resolved = container_port(container(target), entry.get("targetPort", entry["port"]))
        if resolved != port:
            problems.append(f"port {entry['port']} reaches {resolved}, not {port}")
    return problems


def container_port(spec: Doc, port: int | str) -> int | None:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in spec.get("ports", []) if p.get("name") == port]
    return named[0] if named else None


def test_the_services_reach_the_ingest_and_the_monitor(
    resources: list[Doc], config: dict[str, str]
) -> None:
    deployments = workloads(resources)
    ingest = find(resources, "Service", INGEST)
    monitor = find(resources, "Service", MONITOR)
    http_port = int(setting(config, "INTEREST_HTTP_PORT"))
    assert service_problems(ingest, deployments, INGEST, http_port) == []
    assert service_problems(monitor, deployments, MONITOR, monitor_port(resources)) == []
    assert service_problems(
        replaced(ingest, ("spec", "ports", 0, "targetPort"), "metrics"),
        deployments,
        INGEST,
        http_port,
    )
    component = ("spec", "selector", "app.kubernetes.io/component")
    assert service_problems(replaced(ingest, component, "worker"), deployments, INGEST, http_port)


def monitor_port(resources: list[Doc]) -> int:
    command = container(find(resources, "Deployment", MONITOR))["command"]
    assert command[:2] == ["interest", "monitor"]
    return int(command[command.index("--port") + 1])


# --- probes, scraping, shutdown, resources ---


def probe_problems(spec: Doc, expected: dict[str, tuple[str, int]]) -> list[str]:
    """Each named probe is an HTTP GET of the expected path on the expected port."""
    problems = []
    for probe, (path, port) in expected.items():
        get = spec.get(probe, {}).get("httpGet", {})
        found = (get.get("path"), container_port(spec, get.get("port", "")))
        if found != (path, port):
            problems.append(f"{probe} asks {found}, not {(path, port)}")
    return problems


def scrape_problems(deployment: Doc, port: int) -> list[str]:
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    wanted = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }
    return [
        f"{key}: {annotations.get(key)!r}"
        for key, value in wanted.items()
        if annotations.get(key) != value
    ]


def test_the_worker_probes_and_scrape_use_the_configmaps_metrics_port(
    resources: list[Doc], config: dict[str, str]
) -> None:
    worker = find(resources, "Deployment", WORKER)
    port = int(setting(config, "INTEREST_METRICS_PORT"))
    expected = {"livenessProbe": ("/healthz", port), "readinessProbe": ("/readyz", port)}
    assert probe_problems(container(worker), expected) == []
    assert scrape_problems(worker, port) == []
    swapped = {"livenessProbe": ("/readyz", port), "readinessProbe": ("/healthz", port)}
    assert probe_problems(container(worker), swapped)
    moved = {name: (path, port + 1) for name, (path, _) in expected.items()}
    assert probe_problems(container(worker), moved)
    assert scrape_problems(worker, port + 1)


def test_the_ingest_and_monitor_probes(resources: list[Doc], config: dict[str, str]) -> None:
    ingest = container(find(resources, "Deployment", INGEST))
    http_port = int(setting(config, "INTEREST_HTTP_PORT"))
    # The ingest's /healthz fails while Kafka is down: readiness only, liveness by TCP.
    assert probe_problems(ingest, {"readinessProbe": ("/healthz", http_port)}) == []
    assert container_port(ingest, ingest["livenessProbe"]["tcpSocket"]["port"]) == http_port
    monitor = find(resources, "Deployment", MONITOR)
    port = monitor_port(resources)
    expected = {"livenessProbe": ("/healthz", port), "readinessProbe": ("/healthz", port)}
    assert probe_problems(container(monitor), expected) == []
    assert scrape_problems(monitor, port) == []


def pod_problems(deployment: Doc, resources: list[Doc], uid: int) -> list[str]:
    """Settings from the ConfigMap and Secret, requests and a memory limit, a non-root user
    (the images'), and a writable /tmp where the root filesystem is read-only."""
    spec = container(deployment)
    security = deployment["spec"]["template"]["spec"].get("securityContext", {})
    problems = env_from_problems(spec, resources)
    requests, limits = (
        spec.get("resources", {}).get("requests", {}),
        spec["resources"].get("limits", {}),
    )
    if not {"cpu", "memory"} <= set(requests) or "memory" not in limits:
        problems.append(f"resources {spec['resources']}")
    if (security.get("runAsNonRoot"), security.get("runAsUser")) != (True, uid):
        problems.append(f"securityContext {security}, the images run as {uid}")
    mounts = {m["mountPath"]: m for m in spec.get("volumeMounts", [])}
    writable_tmp = "/tmp" in mounts and not mounts["/tmp"].get("readOnly")
    if spec.get("securityContext", {}).get("readOnlyRootFilesystem") and not writable_tmp:
        problems.append("read-only root without a writable /tmp (scratch, numba's cache)")
    return problems


def env_from_problems(spec: Doc, resources: list[Doc]) -> list[str]:
    refs = {kind: ref["name"] for entry in spec.get("envFrom", []) for kind, ref in entry.items()}
    wanted = {
        "configMapRef": find(resources, "ConfigMap")["metadata"]["name"],
        "secretRef": find(resources, "Secret")["metadata"]["name"],
    }
    return [f"envFrom {refs}, not {wanted}"] if refs != wanted else []


def test_every_pod_reads_the_settings_runs_as_the_image_user_with_resources(
    resources: list[Doc],
) -> None:
    uid = image_uid(DOCKERFILES[0])
    for deployment in workloads(resources):
        assert pod_problems(deployment, resources, uid) == [], deployment["metadata"]["name"]
    worker = find(resources, "Deployment", WORKER)
    container_0 = (*POD, "containers", 0)
    only_configmap = [{"configMapRef": {"name": "interest-stream"}}]
    broken = [
        replaced(worker, (*container_0, "envFrom"), only_configmap),
        replaced(worker, (*container_0, "resources", "limits"), {}),
        replaced(worker, (*POD, "securityContext", "runAsUser"), 0),
        replaced(worker, (*container_0, "volumeMounts"), []),
    ]
    for variant in broken:
        assert pod_problems(variant, resources, uid)


def test_the_worker_grace_period_outlasts_the_delivery_timeout(
    resources: list[Doc], config: dict[str, str]
) -> None:
    worker = find(resources, "Deployment", WORKER)
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(setting(config, "INTEREST_KAFKA_DELIVERY_TIMEOUT_SECONDS"))


# --- the bundle ---


def bundle_problems(deployment: Doc, config: dict[str, str], resources: list[Doc]) -> list[str]:
    """INTEREST_MODEL lies on a read-only mount of the bundles PVC."""
    model = PurePosixPath(config["INTEREST_MODEL"])
    spec = container(deployment)
    mounts = [m for m in spec.get("volumeMounts", []) if model.is_relative_to(m["mountPath"])]
    if not mounts:
        return [f"nothing mounted at {model}"]
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mount["name"]].get("persistentVolumeClaim", {})
    problems = [] if mount.get("readOnly") else [f"{mount['mountPath']} is writable"]
    if claim.get("claimName") != find(resources, "PersistentVolumeClaim")["metadata"]["name"]:
        problems.append(f"{mount['name']} is not the bundles claim: {volumes[mount['name']]}")
    return problems


def test_the_worker_and_ingest_read_the_bundle_from_a_read_only_volume(
    resources: list[Doc], config: dict[str, str]
) -> None:
    for name in (WORKER, INGEST):
        assert bundle_problems(find(resources, "Deployment", name), config, resources) == []
    worker = find(resources, "Deployment", WORKER)
    assert bundle_problems(
        replaced(worker, (*POD, "containers", 0, "volumeMounts", 0, "readOnly"), False),
        config,
        resources,
    )
    assert bundle_problems(
        replaced(worker, (*POD, "volumes", 0, "persistentVolumeClaim", "claimName"), "x"),
        config,
        resources,
    )
    assert bundle_problems(worker, {**config, "INTEREST_MODEL": "/srv/current"}, resources)


# --- settings: names and values ---


def secret_setting_names() -> set[str]:
    return {
        f"INTEREST_{name.upper()}"
        for name, field in Settings.model_fields.items()
        if SecretStr in (field.annotation, *get_args(field.annotation))
    }


def secret_problems(config: dict[str, str], secret: Doc) -> list[str]:
    """Passwords and tokens in the Secret only; the Redis URL carries none."""
    secrets = secret_setting_names()
    problems = [f"{name} in the ConfigMap" for name in sorted(secrets & set(config))]
    problems += [
        f"{name} in the Secret is no secret setting"
        for name in sorted(set(secret["stringData"]) - secrets)
    ]
    if urllib.parse.urlsplit(setting(config, "INTEREST_REDIS_URL")).password:
        problems.append("a password in INTEREST_REDIS_URL")
    return problems


def test_secrets_are_in_the_secret_and_nowhere_else(
    resources: list[Doc], config: dict[str, str]
) -> None:
    secret = find(resources, "Secret")
    assert secret_problems(config, secret) == []
    assert set(secret["stringData"]) == secret_setting_names()
    assert secret_problems({**config, "INTEREST_HTTP_TOKEN": "t"}, secret)
    assert secret_problems({**config, "INTEREST_REDIS_URL": "redis://:pw@redis:6379/0"}, secret)
    assert secret_problems(config, replaced(secret, ("stringData", "INTEREST_GROUP_ID"), "g"))


def test_every_interest_name_in_deploy_is_a_setting() -> None:
    known = setting_env_names()
    files = deploy_text_files()
    assert {
        DEPLOY / "docker-compose.yml",
        DEPLOY / "Dockerfile.gpu",
        K8S / "configmap.yaml",
    } <= set(files)
    unknown = {
        str(p.relative_to(DEPLOY)): unknown_setting_names(p.read_text(), known) for p in files
    }
    assert {name: found for name, found in unknown.items() if found} == {}
    named = {name for p in files for name in re.findall(r"INTEREST_[A-Z0-9_]+", p.read_text())}
    assert len(named) > 20  # the scan reads what the files name
    assert unknown_setting_names("INTEREST_REDIS_PASSWROD, INTEREST_NOPE_*", known) == {
        "INTEREST_REDIS_PASSWROD",
        "INTEREST_NOPE_",
    }


def settings_problems(env: dict[str, Any]) -> list[str]:
    """The INTEREST_* values as `Settings` parses them (compose defaults filled in)."""
    values = {
        name.removeprefix("INTEREST_").lower(): str(interpolate(value))
        for name, value in env.items()
        if name.startswith("INTEREST_")
    }
    try:
        Settings(**values)
    except ValidationError as exc:
        return [str(exc)]
    return []


def test_every_setting_value_in_deploy_parses(resources: list[Doc], config: dict[str, str]) -> None:
    secret = find(resources, "Secret")["stringData"]
    assert settings_problems({**config, **secret}) == []
    for name, env in compose_environments().items():
        assert settings_problems(env) == [], name
    for path in DOCKERFILES:
        assert settings_problems(dockerfile_env(path)) == [], path.name
    assert settings_problems({**config, "INTEREST_TOPIC_PARTITIONS": "many"})
    assert settings_problems({**config, "INTEREST_METRICS_PORT": "99999"})


# --- compose ---


def compose() -> Doc:
    return yaml_documents(COMPOSE)[0]


def compose_environments() -> dict[str, dict[str, Any]]:
    """Each service's environment in each file (base, model, GPU), anchors and merges resolved."""
    return {
        f"{path.name}:{name}": service.get("environment", {})
        for path in (COMPOSE, *COMPOSE_OVERRIDES)
        for name, service in yaml_documents(path)[0]["services"].items()
    }


def compose_problems(spec: Doc) -> list[str]:
    """The services the stack needs: Kafka in KRaft mode, Redis, N workers, ingest, monitor,
    Prometheus and Grafana."""
    services = spec["services"]
    problems = [f"no service {name}" for name in sorted(COMPOSE_SERVICES - set(services))]
    if problems:
        return problems
    kafka = services["kafka"]
    roles = set(str(kafka["environment"].get("KAFKA_PROCESS_ROLES", "")).split(","))
    if not kafka["image"].startswith("apache/kafka:") or roles != {"broker", "controller"}:
        problems.append(f"Kafka is not Apache Kafka in KRaft mode: {kafka['image']} {roles}")
    if any("zookeeper" in str(service.get("image", "")) for service in services.values()):
        problems.append("a ZooKeeper service")
    for name, command in (("worker", "worker"), ("ingest", "serve"), ("monitor", "monitor")):
        if services[name].get("command", [])[:2] != ["interest", command]:
            problems.append(f"{name} does not run `interest {command}`")
    worker = services["worker"]
    replicas = worker.get("deploy", {}).get("replicas", 1)
    partitions = int(interpolate(worker["environment"]["INTEREST_TOPIC_PARTITIONS"]))
    if not 2 <= replicas <= partitions:
        problems.append(f"{replicas} workers for {partitions} partitions")
    return problems


def test_the_compose_file_has_the_services_of_the_stack() -> None:
    spec = compose()
    assert compose_problems(spec) == []
    assert compose_problems(
        replaced(spec, ("services", "kafka", "environment", "KAFKA_PROCESS_ROLES"), "broker")
    )
    assert compose_problems(replaced(spec, ("services", "worker", "deploy", "replicas"), 9))
    assert compose_problems(
        replaced(spec, ("services", "ingest", "command"), ["interest", "worker"])
    )
    without_grafana = {
        **spec,
        "services": {k: v for k, v in spec["services"].items() if k != "grafana"},
    }
    assert compose_problems(without_grafana) == ["no service grafana"]


def build_and_mount_problems(spec: Doc) -> list[str]:
    """Every build's Dockerfile and every bind-mounted host path exists (paths relative to
    deploy/, where compose resolves them)."""
    problems = []
    for name, service in spec["services"].items():
        build = service.get("build")
        if build:
            context = DEPLOY / build["context"]
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                problems.append(f"{name}: no {build.get('dockerfile')} in {context}")
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith((".", "/")) and not (DEPLOY / host).exists():
                problems.append(f"{name}: no {host} to mount")
    return problems


def test_every_build_and_bind_mount_of_the_compose_files_exists() -> None:
    for path in (COMPOSE, *COMPOSE_OVERRIDES):
        assert build_and_mount_problems(yaml_documents(path)[0]) == [], path.name
    spec = compose()
    assert build_and_mount_problems(
        replaced(spec, ("services", "worker", "build", "dockerfile"), "deploy/Nope")
    )
    assert build_and_mount_problems(
        replaced(spec, ("services", "worker", "volumes"), ["./nope:/models:ro"])
    )


def override_problems(override: Doc, base: Doc) -> list[str]:
    """An override names only base services; INTEREST_MODEL lies on a read-only bind mount."""
    problems = [
        f"no base service {name}" for name in set(override["services"]) - set(base["services"])
    ]
    for name, service in override["services"].items():
        model = service.get("environment", {}).get("INTEREST_MODEL")
        if model is None:
            continue
        volumes = [*base["services"][name].get("volumes", []), *service.get("volumes", [])]
        read_only = [v.split(":")[1] for v in volumes if v.endswith(":ro")]
        if not any(PurePosixPath(model).is_relative_to(path) for path in read_only):
            problems.append(f"{name}: {model} is not on a read-only mount")
    return problems


def test_the_model_and_gpu_overrides_serve_a_read_only_bundle() -> None:
    base = compose()
    for path in COMPOSE_OVERRIDES:
        assert override_problems(yaml_documents(path)[0], base) == [], path.name
    gpu = yaml_documents(COMPOSE_OVERRIDES[1])[0]
    assert override_problems(
        replaced(gpu, ("services", "worker", "volumes"), ["./bundles:/models"]),
        replaced(base, ("services", "worker", "volumes"), []),
    )
    assert override_problems(replaced(gpu, ("services", "workers"), {}), base)


def test_the_gpu_override_builds_the_cuda_image_and_reserves_an_nvidia_gpu() -> None:
    worker = yaml_documents(COMPOSE_OVERRIDES[1])[0]["services"]["worker"]
    assert worker["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile.gpu"}
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], "gpu" in d["capabilities"]) for d in devices] == [("nvidia", True)]


# --- Dockerfiles ---


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ENV settings of a Dockerfile's final stage (KEY=value form)."""
    pairs = [arg for name, arg in final_stage(dockerfile_instructions(path)) if name == "ENV"]
    return dict(re.findall(r"(\w+)=(\S+)", " ".join(pairs)))


def image_uid(path: Path) -> int:
    users = [arg for name, arg in final_stage(dockerfile_instructions(path)) if name == "USER"]
    return int(users[-1].split(":")[0])


def dockerfile_problems(path: Path) -> list[str]:
    """What is copied exists, nothing installs torch, and the image runs the worker as a
    non-root user with a HEALTHCHECK on /healthz."""
    instructions = dockerfile_instructions(path)
    problems = [
        f"COPY {source}: no such path"
        for name, arg in instructions
        if name == "COPY" and "--from" not in arg
        for source in arg.split()[:-1]
        if not (REPO_ROOT / source).exists()
    ]
    problems += [
        f"RUN installs torch: {arg}"
        for name, arg in instructions
        if name == "RUN" and re.search(r"torch|\[train", arg)
    ]
    final = dict(final_stage(instructions))
    if not re.fullmatch(r"\d+:\d+", final.get("USER", "")) or final["USER"].startswith("0"):
        problems.append(f"USER {final.get('USER')!r}: not a numeric non-root user")
    if "healthcheck.py" not in final.get("HEALTHCHECK", ""):
        problems.append("no HEALTHCHECK")
    if final.get("CMD") != '["interest", "worker"]':
        problems.append(f"CMD {final.get('CMD')}")
    return problems


def test_the_dockerfiles_copy_what_exists_and_run_the_worker_unprivileged(tmp_path: Path) -> None:
    for path in DOCKERFILES:
        assert dockerfile_problems(path) == [], path.name
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:3.11-slim\nCOPY nope /app\nRUN pip install . torch\nUSER root\n")
    assert len(dockerfile_problems(broken)) == 5


def test_the_gpu_image_is_cuda_12_with_cudnn_9_and_the_runtime_needs_no_torch() -> None:
    bases = [arg for name, arg in dockerfile_instructions(DOCKERFILES[1]) if name == "FROM"]
    assert bases and all(
        re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu2[24]\.04( AS \w+)?", base)
        for base in bases
    ), bases
    assert dockerfile_env(DOCKERFILES[1])["INTEREST_MODEL"] == "/models/current"
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    assert any(d.startswith("onnxruntime-gpu") for d in dependencies)
    assert not any(d.startswith("torch") for d in dependencies)


@pytest.fixture
def health_server() -> Iterator[int]:
    """A loopback server answering /healthz 200 and anything else 503."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_the_image_healthcheck_passes_on_200_only(health_server: int) -> None:
    def check(*args: str, port: int = 9108) -> int:
        env = {**os.environ, "INTEREST_METRICS_PORT": str(port)}
        script = DEPLOY / "healthcheck.py"
        return subprocess.run(
            [sys.executable, script, *args], env=env, capture_output=True, timeout=30
        ).returncode

    assert check(port=health_server) == 0
    assert check(f"http://127.0.0.1:{health_server}/healthz") == 0
    assert check(f"http://127.0.0.1:{health_server}/readyz") == 1
    assert check(f"http://127.0.0.2:{health_server}/healthz") == 1  # nothing listens there


# --- the GPU overlay ---


def overlay_problems(base: list[Doc], overlay: Doc, patches: dict[str, Doc]) -> list[str]:
    """Each patch targets a base resource and merges into it without adding a container."""
    problems = []
    for entry in overlay["patches"]:
        target = entry["target"]
        found = [
            d
            for d in base
            if (d["kind"], d["metadata"]["name"]) == (target["kind"], target["name"])
        ]
        if len(found) != 1:
            problems.append(f"patch target {target} is not one base resource")
            continue
        merged = strategic_merge(found[0], patches[entry["path"]])
        containers = merged["spec"]["template"]["spec"]["containers"]
        if len(containers) != len(found[0]["spec"]["template"]["spec"]["containers"]):
            problems.append(f"the patch adds a container: {[c['name'] for c in containers]}")
    return problems


def gpu_patches() -> dict[str, Doc]:
    text = {
        entry["path"]: (GPU_OVERLAY / entry["path"]).read_text()
        for entry in kustomization(GPU_OVERLAY)["patches"]
    }
    assert not any("$patch" in body for body in text.values())  # directives strategic_merge lacks
    return {path: yaml_documents(GPU_OVERLAY / path)[0] for path in text}


def test_the_gpu_overlay_gives_each_worker_one_gpu_and_stays_valid(resources: list[Doc]) -> None:
    overlay, patches = kustomization(GPU_OVERLAY), gpu_patches()
    assert overlay_problems(resources, overlay, patches) == []
    worker = find(resources, "Deployment", WORKER)
    merged = strategic_merge(worker, patches["worker-gpu.yaml"])
    for version in KUBERNETES_VERSIONS:
        assert schema_problems(merged, version) == []
    spec = container(merged)
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["resources"]["requests"] == container(worker)["resources"]["requests"]
    assert spec["image"].startswith("interest-stream-gpu:")
    assert spec["readinessProbe"] == container(worker)["readinessProbe"]
    misnamed = replaced(patches, ("worker-gpu.yaml", *POD, "containers", 0, "name"), "wroker")
    assert overlay_problems(resources, overlay, misnamed)
    retargeted = replaced(overlay, ("patches", 0, "target", "name"), "interest-workers")
    assert overlay_problems(resources, retargeted, patches)
