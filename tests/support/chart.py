"""The Helm chart (deploy/helm/chatmesh) rendered offline by Helm's own Go SDK (helm-python-sdk), as
objects to assert on, and checked as `helm lint --strict` and the Kubernetes API schemas would check it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "chatmesh"
VALUES_DIR = ROOT / "tests" / "deploy" / "values"
RELEASE = "chatmesh"
NAMESPACE = "prod"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest whose schemas we have.
KUBE_VERSIONS = ("1.30", kubernetes_validate.latest_version())
# Custom resources of the Prometheus Operator and cert-manager: no schema in kubernetes-validate, checked by hand.
CRD_KINDS = frozenset({"ServiceMonitor", "PrometheusRule", "Certificate"})
WARNING = 2


def values_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((VALUES_DIR / name).read_text(encoding="utf-8")) or {}


@dataclass
class Rendered:
    objects: list[dict[str, Any]]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: found {len(found)} among {self.names()}"
        return found[0]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        found = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        return found[0] if found else None

    def names(self) -> list[str]:
        return [f"{obj['kind']}/{obj['metadata']['name']}" for obj in self.objects]


def render(values: dict[str, Any] | None = None, chart_dir: Path = CHART) -> Rendered:
    """What `helm install chatmesh deploy/helm/chatmesh -n prod -f values` would create (schema checked)."""
    with helm.Chart.load(chart_dir) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(objects, notes)


def lint_findings(values: dict[str, Any] | None = None, chart_dir: Path = CHART) -> list[str]:
    """What `helm lint --strict --kube-version 1.30` reports as a warning or an error."""
    report = helm.lint(chart_dir, values, strict=True, kube_version=f"v{KUBE_VERSIONS[0]}.0")
    findings = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= WARNING]
    return findings + [error for error in report["errors"] if not any(error in f for f in findings)]


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Each Kubernetes version's strict schema (unknown fields rejected) against the object."""
    errors = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']} ({version}): {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(error.message)
    return errors


def selector_labels(process: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "chatmesh",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": process,
    }


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec(deployment)["containers"]
    return only


def env_of(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container(deployment).get("env", [])}


def port_of(deployment: dict[str, Any], name: str) -> int:
    return next(port["containerPort"] for port in container(deployment)["ports"] if port["name"] == name)
