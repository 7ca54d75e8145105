"""The Kubernetes manifests: valid against Kubernetes' own schemas (offline, strict), and the
properties a rolling restart and a drain depend on."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.tools import DEPLOY, require_program

pytestmark = [pytest.mark.slow, pytest.mark.deploy]

MANIFESTS = DEPLOY / "kubernetes"
RESOURCES = sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
GUNICORN_MARGIN = 5  # graceful_timeout = COLLAB_SHUTDOWN_TIMEOUT + 5 (deploy/gunicorn.conf.py)


def _documents() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in RESOURCES:
        for document in yaml.safe_load_all(path.read_text()):
            found[(document["kind"], document["metadata"]["name"])] = document
    return found


# The oldest Kubernetes still commonly run, and the newest the validator knows.
@pytest.mark.parametrize("version", ["1.29.0", None])
def test_manifests_are_valid_kubernetes(version: str | None) -> None:
    validate = require_program("kubernetes-validate", "kubernetes-validate, in the test extra")
    flags = ["--kubernetes-version", version] if version else []
    result = subprocess.run(
        [validate, "--strict", *flags, *map(str, RESOURCES)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARN" not in result.stdout, result.stdout


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in RESOURCES]


def test_hub_drains_within_its_grace_period_and_is_ready_on_readyz() -> None:
    documents = _documents()
    config = documents[("ConfigMap", "collab")]["data"]
    hub = documents[("Deployment", "collab-hub")]["spec"]["template"]["spec"]
    container = hub["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = int(pre_stop[1]) + float(config["COLLAB_SHUTDOWN_TIMEOUT"]) + GUNICORN_MARGIN
    assert hub["terminationGracePeriodSeconds"] > drain
    # The secret settings come from a Secret, and none is written into the manifests.
    assert {"secretRef": {"name": "collab"}} in container["envFrom"]
    assert not any("SECRET" in key or "URL" in key for key in config)
    assert "*" not in config["COLLAB_FORWARDED_ALLOW_IPS"]
    # The budget covers the hub's pods, and allows one of them down at a time.
    budget = documents[("PodDisruptionBudget", "collab-hub")]["spec"]
    selector = documents[("Deployment", "collab-hub")]["spec"]["selector"]["matchLabels"]
    assert budget["selector"]["matchLabels"] == selector
    assert budget["maxUnavailable"] == 1


def test_worker_has_its_own_probe_not_the_hubs_http_check() -> None:
    worker = _documents()[("Deployment", "collab-worker")]["spec"]["template"]["spec"]
    container = worker["containers"][0]
    assert container["command"][:2] == ["collab", "worker"]
    assert "httpGet" not in container["livenessProbe"]
    assert "inspect ping" in " ".join(container["livenessProbe"]["exec"]["command"])


def test_ingress_keeps_quiet_websockets_open() -> None:
    annotations = _documents()[("Ingress", "collab")]["metadata"]["annotations"]
    # The server's heartbeat is 25 s; ingress-nginx's default 60 s would do, barely.
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 120
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 120
