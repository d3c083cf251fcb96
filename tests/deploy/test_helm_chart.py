"""The Helm chart, rendered and linted by Helm's Go SDK, validated against the Kubernetes schemas, and checked
for what a production install needs: headless internal Services dialled with round_robin, native gRPC probes, a
drain that fits the termination grace, hardened pods, NetworkPolicies, autoscalers, Secrets and rolling config."""

import base64
import os
import re
import shutil
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from support.chart import (
    CHART,
    CRD_KINDS,
    NAMESPACE,
    RELEASE,
    Rendered,
    container,
    env_of,
    lint_findings,
    pod_spec,
    port_of,
    render,
    schema_errors,
    selector_labels,
    values_file,
)

from chatmesh.dialogue.server_tools import CURRENT_TIME, KNOWLEDGE_SEARCH, ServerTools
from chatmesh.model.deployments import parse_deployments
from chatmesh.runtime.settings import (
    PROCESS_SETTINGS,
    CacheSettings,
    DialogueSettings,
    ProcessSettings,
    ServiceSettings,
)

CORE = ("gateway", "dialogue", "safety", "cache")
INTERNAL = ("dialogue", "safety", "cache")
DEFAULT_PORTS = {"gateway": 50051, "dialogue": 50052, "safety": 50053, "cache": 50054}
HEALTH_PORTS = {"gateway": 50061, "dialogue": 50062, "safety": 50063, "cache": 50064}
VALUE_SETS = {
    "defaults": lambda: None,
    "all-features": lambda: values_file("all-features.yaml"),
    "per-process": lambda: values_file("per-process.yaml"),
}


def name(process: str) -> str:
    return f"{RELEASE}-{process}"


@pytest.fixture(scope="module")
def rendered() -> dict[str, Rendered]:
    return {label: render(values()) for label, values in VALUE_SETS.items()}


@pytest.fixture(scope="module")
def defaults(rendered: dict[str, Rendered]) -> Rendered:
    return rendered["defaults"]


@pytest.fixture(scope="module")
def full(rendered: dict[str, Rendered]) -> Rendered:
    return rendered["all-features"]


@pytest.fixture(scope="module")
def per_process(rendered: dict[str, Rendered]) -> Rendered:
    return rendered["per-process"]


def deployments(chart: Rendered) -> dict[str, dict[str, Any]]:
    """Each Deployment by its component label."""
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in chart.of_kind("Deployment")}


def workloads(chart: Rendered) -> dict[str, dict[str, Any]]:
    """Each Deployment and StatefulSet (the data Redis) by its component label."""
    return {
        w["metadata"]["labels"]["app.kubernetes.io/component"]: w
        for w in chart.of_kind("Deployment") + chart.of_kind("StatefulSet")
    }


def settings_data(chart: Rendered) -> dict[str, str]:
    return chart.get("ConfigMap", f"{RELEASE}-settings")["data"]


# Rendering, lint and schemas.


@pytest.mark.parametrize("label", VALUE_SETS)
def test_lints_strictly(label: str) -> None:
    assert lint_findings(VALUE_SETS[label]()) == []


@pytest.mark.parametrize("label", VALUE_SETS)
def test_every_manifest_is_valid_kubernetes(rendered: dict[str, Rendered], label: str) -> None:
    chart = rendered[label]
    errors = [error for obj in chart.objects if obj["kind"] not in CRD_KINDS for error in schema_errors(obj)]
    assert errors == []
    for obj in chart.objects:
        assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]
        assert len(obj["metadata"]["name"]) <= 63


def test_custom_resources_are_well_formed(full: Rendered) -> None:
    (monitor,) = full.of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # It selects the metrics Service, which selects every chatmesh process but modelsim, by a named port.
    service = next(s for s in full.of_kind("Service") if s["metadata"]["name"] == f"{RELEASE}-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["clusterIP"] == "None"
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    selected = {
        process
        for process, deployment in deployments(full).items()
        if service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    }
    assert selected == set(CORE)


def test_default_install_runs_the_four_processes_two_bundled_redises_and_nothing_optional(defaults: Rendered) -> None:
    # Redis is required (tenants, keys, limits and conversations shared by every replica), so the default is the
    # bundled one, persistent (a StatefulSet), and a second one for the cache, which may evict.
    assert set(deployments(defaults)) == {*CORE, "cache-redis"}
    assert [s["metadata"]["name"] for s in defaults.of_kind("StatefulSet")] == [f"{RELEASE}-redis"]
    for kind in ("ServiceMonitor", "PrometheusRule", "Certificate"):
        assert defaults.of_kind(kind) == [], kind
    # The only Secrets: the generated admin token and API key pepper, the generated CA and certificate, and the
    # bundled Redises' generated password.
    assert sorted(s["metadata"]["name"] for s in defaults.of_kind("Secret")) == [
        f"{RELEASE}-auth",
        f"{RELEASE}-ca",
        f"{RELEASE}-redis-auth",
        f"{RELEASE}-tls",
    ]
    assert defaults.find("ConfigMap", f"{RELEASE}-dashboards") is None
    assert {s["metadata"]["name"] for s in defaults.of_kind("Service")} == {name(p) for p in CORE} | {
        f"{RELEASE}-metrics",
        f"{RELEASE}-redis",
        f"{RELEASE}-cache-redis",
    }
    assert len(defaults.of_kind("NetworkPolicy")) == 6
    assert len(defaults.of_kind("HorizontalPodAutoscaler")) == 4
    assert len(defaults.of_kind("PodDisruptionBudget")) == 4


def test_all_features_adds_modelsim_redis_and_monitoring(full: Rendered) -> None:
    assert set(workloads(full)) == {*CORE, "modelsim", "redis", "cache-redis"}
    assert full.of_kind("ServiceMonitor")
    # The rules and dashboards are the chart's copies of deploy/prometheus and deploy/grafana (see
    # test_chart_files.py); with none there yet, there is nothing to render.
    files = CHART / "files"
    rule_groups = [
        group
        for path in sorted([*files.glob("prometheus/*.yml"), *files.glob("prometheus/*.yaml")])
        for group in yaml.safe_load(path.read_text())["groups"]
    ]
    assert [rule["spec"]["groups"] for rule in full.of_kind("PrometheusRule")] == ([rule_groups] if rule_groups else [])
    dashboards = {path.name: path.read_text() for path in files.glob("grafana/*.json")}
    configmap = full.find("ConfigMap", f"{RELEASE}-dashboards")
    if dashboards:
        assert configmap is not None and configmap["data"] == dashboards
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    else:
        assert configmap is None


def test_every_setting_the_chart_sets_is_a_chatmesh_setting(rendered: dict[str, Rendered]) -> None:
    """A misspelt variable would be ignored silently (the settings ignore unknown names)."""
    fields = {field for settings in PROCESS_SETTINGS.values() for field in settings.model_fields}
    known = {f"CHATMESH_{field.upper()}" for field in fields} | {"OPENAI_API_KEY", "OPENAI_BASE_URL"}
    for chart in rendered.values():
        names = set(settings_data(chart))
        for deployment in deployments(chart).values():
            names |= set(env_of(deployment))
        unknown = {n for n in names if n.startswith(("CHATMESH_", "OPENAI_")) and n not in known}
        assert unknown == set()


# gRPC wiring: headless Services, dns:/// targets, round_robin (in the code), max connection age.


def test_internal_services_are_headless_and_the_gateway_is_not(rendered: dict[str, Rendered]) -> None:
    for chart in rendered.values():
        for process in INTERNAL:
            service = chart.get("Service", name(process))
            assert service["spec"]["clusterIP"] == "None"
            assert service["spec"]["selector"] == selector_labels(process)
            (port,) = service["spec"]["ports"]
            assert (port["targetPort"], port["appProtocol"]) == ("grpc", "grpc")
        assert chart.get("Service", name("gateway")).get("spec", {}).get("clusterIP") != "None"


def test_clients_dial_every_pod_through_dns(rendered: dict[str, Rendered]) -> None:
    for chart in rendered.values():
        data = settings_data(chart)
        for process in INTERNAL:
            port = chart.get("Service", name(process))["spec"]["ports"][0]["port"]
            assert data[f"CHATMESH_{process.upper()}_TARGET"] == (
                f"dns:///{name(process)}.{NAMESPACE}.svc.cluster.local:{port}"
            )
            assert port == port_of(deployments(chart)[process], "grpc")
        assert data["CHATMESH_BIND_HOST"] == "0.0.0.0"
        assert int(data["CHATMESH_GRPC_MAX_CONNECTION_AGE_MS"]) > 0
    # The channels spread calls over every address the name resolves to.
    channels = (Path(__file__).parents[2] / "services" / "runtime" / "channels.py").read_text()
    assert '"round_robin"' in channels


def test_processes_listen_on_the_ports_their_services_and_probes_use(defaults: Rendered) -> None:
    data = settings_data(defaults)
    for process in CORE:
        deployment = deployments(defaults)[process]
        # Without this, a Service named chatmesh-gateway would inject CHATMESH_GATEWAY_PORT=tcp://… into every pod.
        assert pod_spec(deployment)["enableServiceLinks"] is False
        assert container(deployment)["args"] == [process]
        assert container(deployment)["command"] == ["chatmesh"]
        assert int(data[f"CHATMESH_{process.upper()}_PORT"]) == port_of(deployment, "grpc") == DEFAULT_PORTS[process]


# Probes and the drain.


@pytest.mark.parametrize("label", VALUE_SETS)
def test_native_grpc_probes_on_the_plaintext_health_port_and_a_termination_grace_that_fits_the_drain(
    rendered: dict[str, Rendered], label: str
) -> None:
    chart = rendered[label]
    data = settings_data(chart)
    drain = float(data["CHATMESH_SHUTDOWN_DELAY_SECONDS"]) + float(data["CHATMESH_SHUTDOWN_GRACE_SECONDS"])
    assert float(data["CHATMESH_SHUTDOWN_DELAY_SECONDS"]) > 0
    for process in CORE:
        deployment = deployments(chart)[process]
        main = container(deployment)
        # The kubelet's gRPC probes cannot present a client certificate, so they ask the process's plaintext
        # health port (grpc.health.v1 only), which the process serves where the settings say.
        health_port = port_of(deployment, "health")
        assert health_port == HEALTH_PORTS[process] == int(data[f"CHATMESH_{process.upper()}_HEALTH_PORT"])
        assert health_port != port_of(deployment, "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert main[probe]["grpc"] == {"port": health_port}, (process, probe)
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert grace > drain
        # Liveness keeps passing for longer than a whole drain, so the kubelet never cuts one short.
        liveness = main["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace


def test_topology_spread_across_zones_and_nodes(rendered: dict[str, Rendered]) -> None:
    for process in CORE:
        deployment = deployments(rendered["defaults"])[process]
        constraints = pod_spec(deployment)["topologySpreadConstraints"]
        keys = [c["topologyKey"] for c in constraints]
        assert keys == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
        for constraint in constraints:
            assert constraint["labelSelector"]["matchLabels"] == selector_labels(process)


# Hardening.


@pytest.mark.parametrize("label", VALUE_SETS)
def test_every_pod_is_hardened(rendered: dict[str, Rendered], label: str) -> None:
    for process, deployment in workloads(rendered[label]).items():
        spec = pod_spec(deployment)
        assert spec["automountServiceAccountToken"] is False, process
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True
        assert pod_security["runAsUser"] > 0
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
        for each in spec["containers"]:
            security = each["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, process
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert "privileged" not in security
        # The only writable paths are emptyDirs, and the data Redis's volume.
        volumes = {v["name"]: v for v in spec["volumes"]}
        claims = {c["metadata"]["name"] for c in deployment["spec"].get("volumeClaimTemplates", [])}
        writable = [m for m in container(deployment)["volumeMounts"] if not m.get("readOnly")]
        assert writable and all(m["name"] in claims or "emptyDir" in volumes[m["name"]] for m in writable)
        assert claims == ({"data"} if process == "redis" else set())
    for account in rendered[label].of_kind("ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


# NetworkPolicy.


def _rules(policy: dict[str, Any], direction: str) -> list[dict[str, Any]]:
    return policy["spec"].get(direction, [])


def _peer_components(rule: dict[str, Any], key: str) -> set[str]:
    return {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule.get(key, [])}


def _ingress_on(policy: dict[str, Any], port: str) -> list[dict[str, Any]]:
    return [rule for rule in _rules(policy, "ingress") if any(p["port"] == port for p in rule["ports"])]


@pytest.mark.parametrize("label", VALUE_SETS)
def test_network_policies_admit_only_each_process_callers(rendered: dict[str, Rendered], label: str) -> None:
    chart = rendered[label]
    callers = {"dialogue": {"gateway"}, "safety": {"dialogue"}, "cache": {"dialogue"}}
    policies = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in chart.of_kind("NetworkPolicy")}
    for process in CORE:
        policy = policies[process]
        assert policy["spec"]["podSelector"]["matchLabels"] == selector_labels(process)
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        (grpc_rule,) = _ingress_on(policy, "grpc")
        if process == "gateway":
            # Reachable from outside the release: anyone by default, or the configured peers.
            assert grpc_rule.get("from", []) == (chart_values_gateway_from(label))
        else:
            # From its caller's pods in this release only: a podSelector without namespaceSelector.
            assert all(set(peer) == {"podSelector"} for peer in grpc_rule["from"])
            assert _peer_components(grpc_rule, "from") == callers[process]
        # Metrics only from the monitoring namespace.
        (metrics_rule,) = _ingress_on(policy, "metrics")
        assert metrics_rule["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ]
        # The plaintext health port from networkPolicy.healthFrom: by default any source, since the kubelet's
        # probes come from the node's addresses, which no pod or namespace selector matches.
        (health_rule,) = _ingress_on(policy, "health")
        assert health_rule.get("from", []) == chart_values_health_from(label)
        assert [p["port"] for p in health_rule["ports"]] == ["health"]
        assert len(_rules(policy, "ingress")) == 3


def chart_values_health_from(label: str) -> list[dict[str, Any]]:
    values = VALUE_SETS[label]() or {}
    return values.get("networkPolicy", {}).get("healthFrom", [])


def chart_values_gateway_from(label: str) -> list[dict[str, Any]]:
    values = VALUE_SETS[label]() or {}
    return values.get("networkPolicy", {}).get("gatewayFrom", [])


def _egress_ports(policy: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Each egress port number and the peers of its rule ([] means any)."""
    ports: dict[int, list[dict[str, Any]]] = {}
    for rule in _rules(policy, "egress"):
        for port in rule["ports"]:
            ports.setdefault(port["port"], []).extend(rule.get("to", []))
    return ports


def test_egress_is_only_what_each_process_calls(defaults: Rendered, full: Rendered, per_process: Rendered) -> None:
    by_process = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in defaults.of_kind("NetworkPolicy")}
    # Default install: external model on 443 (public addresses), the bundled Redises, no tracing.
    assert set(_egress_ports(by_process["gateway"])) == {53, 50052, 6379}
    assert set(_egress_ports(by_process["dialogue"])) == {53, 50053, 50054, 443, 6379}
    assert set(_egress_ports(by_process["safety"])) == {53, 443}
    assert set(_egress_ports(by_process["cache"])) == {53, 6379}
    # The gateway and dialogue reach the data Redis only; the cache its own Redis only.
    for process, redis in (("gateway", "redis"), ("dialogue", "redis"), ("cache", "cache-redis")):
        redis_peers = _egress_ports(by_process[process])[6379]
        assert {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in redis_peers} == {redis}
    # Each bundled Redis admits only its own clients, and calls nothing.
    for redis, clients in (("redis", {"gateway", "dialogue"}), ("cache-redis", {"cache"})):
        (rule,) = by_process[redis]["spec"]["ingress"]
        assert _peer_components(rule, "from") == clients and rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
        assert by_process[redis]["spec"]["egress"] == []
        assert by_process[redis]["spec"]["podSelector"]["matchLabels"] == selector_labels(redis)
    model_peers = _egress_ports(by_process["dialogue"])[443]
    assert model_peers[0]["ipBlock"]["cidr"] == "0.0.0.0/0" and "10.0.0.0/8" in model_peers[0]["ipBlock"]["except"]
    gateway_to = [rule for rule in _rules(by_process["gateway"], "egress") if rule["ports"][0]["port"] == 50052]
    assert _peer_components(gateway_to[0], "to") == {"dialogue"}

    # External Redis: the gateway, dialogue and cache may reach it, safety not.
    by_process = {
        p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in per_process.of_kind("NetworkPolicy")
    }
    for process in ("gateway", "dialogue", "cache"):
        assert _egress_ports(by_process[process])[6379] == [], process
    assert 6379 not in _egress_ports(by_process["safety"])

    # Everything on: the bundled Redis and modelsim by pod selector, the OTLP collector, extra rules.
    by_process = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in full.of_kind("NetworkPolicy")}
    dialogue = _egress_ports(by_process["dialogue"])
    assert {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in dialogue[6379]} == {"redis"}
    assert {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in dialogue[8089]} == {
        "modelsim"
    }
    assert 443 not in dialogue and {4317, 4318, 8443} <= set(dialogue)
    redis = by_process["redis"]
    assert _peer_components(redis["spec"]["ingress"][0], "from") == {"gateway", "dialogue"}
    assert redis["spec"]["egress"] == []
    modelsim = by_process["modelsim"]
    assert _peer_components(modelsim["spec"]["ingress"][0], "from") == {"dialogue", "safety", "cache"}
    # Without a cache Redis of its own, the cache uses the data Redis, which then admits it too.
    shared = render({"redis": {"cache": {"bundled": {"enabled": False}}}})
    shared_policies = {
        p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in shared.of_kind("NetworkPolicy")
    }
    assert "cache-redis" not in shared_policies
    assert _peer_components(shared_policies["redis"]["spec"]["ingress"][0], "from") == {"gateway", "dialogue", "cache"}
    assert _peer_components(_rules(shared_policies["cache"], "egress")[1], "to") == {"redis"}


# Scaling.


@pytest.mark.parametrize("label", VALUE_SETS)
def test_autoscalers_target_their_deployment_with_the_values_bounds(rendered: dict[str, Rendered], label: str) -> None:
    chart = rendered[label]
    values = render_values(label)
    autoscalers = {h["spec"]["scaleTargetRef"]["name"]: h for h in chart.of_kind("HorizontalPodAutoscaler")}
    for process, deployment in deployments(chart).items():
        if process == "cache-redis":
            continue
        scaling = values[process]["autoscaling"]
        if scaling["enabled"]:
            hpa = autoscalers.pop(deployment["metadata"]["name"])
            assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
            assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
                scaling["minReplicas"],
                scaling["maxReplicas"],
            )
            (metric,) = hpa["spec"]["metrics"]
            assert metric["resource"]["name"] == "cpu"
            assert metric["resource"]["target"] == {
                "type": "Utilization",
                "averageUtilization": scaling["targetCPUUtilizationPercentage"],
            }
            # The autoscaler owns the replica count.
            assert "replicas" not in deployment["spec"]
        else:
            assert deployment["spec"]["replicas"] == values[process]["replicas"]
    assert autoscalers == {}


def render_values(label: str) -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        return chart.merge_values(VALUE_SETS[label]())


def test_replicas_resources_and_budgets_per_process(per_process: Rendered) -> None:
    chart = deployments(per_process)
    assert chart["dialogue"]["spec"]["replicas"] == 6
    assert chart["safety"]["spec"]["replicas"] == 0
    assert container(chart["gateway"])["resources"] == {
        "requests": {"cpu": "1", "memory": "512Mi"},
        "limits": {"memory": "1Gi"},
    }
    assert container(chart["dialogue"])["resources"]["requests"] == {"cpu": "2", "memory": "1Gi"}
    assert container(chart["safety"])["resources"]["limits"] == {"memory": "256Mi"}
    assert container(chart["cache"])["resources"]["requests"]["memory"] == "2Gi"
    budgets = {p["metadata"]["name"]: p["spec"] for p in per_process.of_kind("PodDisruptionBudget")}
    assert set(budgets) == {name("gateway"), name("dialogue"), name("cache")}
    assert budgets[name("cache")]["maxUnavailable"] == "50%"
    assert budgets[name("cache")]["selector"]["matchLabels"] == selector_labels("cache")


# Secrets and configuration.


def test_the_model_key_comes_from_the_charts_secret(full: Rendered) -> None:
    secret = full.get("Secret", RELEASE)
    assert base64.b64decode(secret["data"]["OPENAI_API_KEY"]).decode() == "sk-test-not-a-real-key"
    # The processes that call the model: dialogue, safety, and the cache for embeddings (all-features turns the
    # semantic cache on).
    for process, deployment in deployments(full).items():
        env = env_of(deployment)
        if process in ("dialogue", "safety", "cache"):
            assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {
                "name": secret["metadata"]["name"],
                "key": "OPENAI_API_KEY",
            }
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/secret"])
        else:
            assert "OPENAI_API_KEY" not in env, process
    # The key is never in the ConfigMap or in plain env.
    for obj in full.objects:
        if obj["kind"] != "Secret":
            assert "sk-test-not-a-real-key" not in yaml.safe_dump(obj)


def test_the_log_salt_is_a_secret_of_every_process(full: Rendered, per_process: Rendered) -> None:
    secret = full.get("Secret", RELEASE)
    assert base64.b64decode(secret["data"]["CHATMESH_LOG_USER_ID_SALT"]).decode() == "not-a-real-salt"
    for chart, reference in (
        (full, {"name": secret["metadata"]["name"], "key": "CHATMESH_LOG_USER_ID_SALT"}),
        (per_process, {"name": "chatmesh-logs", "key": "CHATMESH_LOG_USER_ID_SALT"}),
    ):
        for process in CORE:
            env = env_of(deployments(chart)[process])
            assert env["CHATMESH_LOG_USER_ID_SALT"]["valueFrom"]["secretKeyRef"] == reference
        assert "not-a-real-salt" not in yaml.safe_dump(chart.get("ConfigMap", f"{RELEASE}-settings"))
    assert settings_data(full)["CHATMESH_LOG_LEVEL"] == "DEBUG"


def test_existing_secrets_are_referenced_and_the_chart_makes_none(per_process: Rendered) -> None:
    assert per_process.of_kind("Secret") == []
    chart = deployments(per_process)
    for process in ("dialogue", "safety"):
        assert env_of(chart[process])["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "openai",
            "key": "api-key",
        }
    for process in ("gateway", "dialogue"):
        env = env_of(chart[process])
        assert env["CHATMESH_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "chatmesh-redis", "key": "url"}
        assert env["CHATMESH_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "chatmesh-redis",
            "key": "password",
        }
        assert "CHATMESH_CACHE_REDIS_URL" not in env
    cache = env_of(chart["cache"])
    assert cache["CHATMESH_CACHE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "chatmesh-cache-redis",
        "key": "url",
    }
    assert "CHATMESH_REDIS_URL" not in cache and "CHATMESH_REDIS_PASSWORD" not in cache
    assert not {"CHATMESH_REDIS_URL", "CHATMESH_CACHE_REDIS_URL"} & set(env_of(chart["safety"]))
    gateway = env_of(chart["gateway"])
    assert gateway["CHATMESH_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "chatmesh-admin",
        "key": "admin-token",
    }
    assert gateway["CHATMESH_API_KEY_PEPPER"]["valueFrom"]["secretKeyRef"] == {
        "name": "chatmesh-admin",
        "key": "pepper",
    }
    assert settings_data(per_process)["OPENAI_BASE_URL"] == "https://llm.internal.example/v1"


def test_a_redis_url_given_as_a_value_is_kept_in_the_secret() -> None:
    chart = render({"redis": {"url": "rediss://:hunter2@redis.example:6380/0"}})
    secret = chart.get("Secret", RELEASE)
    assert base64.b64decode(secret["data"]["CHATMESH_REDIS_URL"]).decode() == "rediss://:hunter2@redis.example:6380/0"
    assert "OPENAI_API_KEY" not in secret["data"]
    assert "redis" not in workloads(chart)
    for process in ("gateway", "dialogue"):
        env = env_of(deployments(chart)[process])
        assert env["CHATMESH_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": RELEASE, "key": "CHATMESH_REDIS_URL"}
    assert "hunter2" not in yaml.safe_dump(chart.get("ConfigMap", f"{RELEASE}-settings"))
    # The cache's URL, likewise; without a cache Redis of any kind, the cache is given the data Redis's URL.
    chart = render(
        {"redis": {"url": "rediss://redis.example:6380/0", "cache": {"url": "redis://cache.example:6379/1"}}}
    )
    secret = chart.get("Secret", RELEASE)
    assert base64.b64decode(secret["data"]["CHATMESH_CACHE_REDIS_URL"]).decode() == "redis://cache.example:6379/1"
    assert env_of(deployments(chart)["cache"])["CHATMESH_CACHE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": RELEASE,
        "key": "CHATMESH_CACHE_REDIS_URL",
    }
    assert workloads(chart).keys() == set(CORE)
    chart = render({"redis": {"url": "rediss://redis.example:6380/0", "cache": {"bundled": {"enabled": False}}}})
    assert env_of(deployments(chart)["cache"])["CHATMESH_CACHE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": RELEASE,
        "key": "CHATMESH_REDIS_URL",
    }


def _config_checksums(chart: Rendered) -> dict[str, str]:
    return {
        process: d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        for process, d in deployments(chart).items()
        if process in CORE
    }


def test_pods_roll_when_a_setting_changes_but_not_when_keywords_change(defaults: Rendered) -> None:
    before = _config_checksums(defaults)
    assert len(set(before.values())) == 1 and re.fullmatch(r"[0-9a-f]{64}", next(iter(before.values())))
    changed = render({"config": {"CHATMESH_CACHE_TTL_SECONDS": "600"}})
    assert settings_data(changed)["CHATMESH_CACHE_TTL_SECONDS"] == "600"
    after = _config_checksums(changed)
    assert all(after[process] != before[process] for process in before)
    # Keyword lists reload in place: a new list changes the ConfigMap, not the pods.
    keywords = render({"safety": {"keywords": {"lists": {"fruit.txt": "fruit\tforbidden fruit\n"}}}})
    assert keywords.get("ConfigMap", f"{RELEASE}-keywords")["data"] == {"fruit.txt": "fruit\tforbidden fruit\n"}
    assert _config_checksums(keywords) == before
    for deployment in deployments(keywords).values():
        assert not any("keyword" in key for key in deployment["spec"]["template"]["metadata"].get("annotations", {}))


def test_the_chart_wiring_wins_over_config(defaults: Rendered) -> None:
    chart = render({"config": {"CHATMESH_BIND_HOST": "127.0.0.1", "CHATMESH_SAFETY_FAIL_OPEN": "true"}})
    assert settings_data(chart)["CHATMESH_BIND_HOST"] == "0.0.0.0"
    assert settings_data(chart)["CHATMESH_SAFETY_FAIL_OPEN"] == "true"


def test_safety_mounts_the_keyword_folder_it_reloads(defaults: Rendered) -> None:
    safety = deployments(defaults)["safety"]
    path = env_of(safety)["CHATMESH_SAFETY_KEYWORDS"]["value"]
    (mount,) = [m for m in container(safety)["volumeMounts"] if m["name"] == "keywords"]
    # The folder itself, not a subPath: only then do ConfigMap updates reach the files.
    assert mount["mountPath"] == path and "subPath" not in mount and mount["readOnly"] is True
    volume = next(v for v in pod_spec(safety)["volumes"] if v["name"] == "keywords")
    configmap = defaults.get("ConfigMap", volume["configMap"]["name"])
    shipped = (Path(__file__).parents[2] / "services" / "safety" / "default_keywords.txt").read_text()
    assert configmap["data"] == {"default_keywords.txt": shipped}
    for process in ("gateway", "dialogue", "cache"):
        assert "CHATMESH_SAFETY_KEYWORDS" not in env_of(deployments(defaults)[process])
    existing = render({"safety": {"keywords": {"existingConfigMap": "our-lists"}}})
    assert existing.find("ConfigMap", f"{RELEASE}-keywords") is None
    volume = next(v for v in pod_spec(deployments(existing)["safety"])["volumes"] if v["name"] == "keywords")
    assert volume["configMap"]["name"] == "our-lists"


def test_modelsim_and_bundled_redis_are_wired_when_enabled(full: Rendered) -> None:
    data = settings_data(full)
    assert data["OPENAI_BASE_URL"] == f"http://{name('modelsim')}.{NAMESPACE}.svc.cluster.local:8089/v1"
    redis_url = f"rediss://{RELEASE}-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    for process in ("gateway", "dialogue"):
        assert env_of(deployments(full)[process])["CHATMESH_REDIS_URL"]["value"] == redis_url
    assert env_of(deployments(full)["cache"])["CHATMESH_CACHE_REDIS_URL"]["value"] == (
        f"rediss://{RELEASE}-cache-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    )
    assert full.get("Service", f"{RELEASE}-redis")["spec"]["ports"][0]["port"] == 6379
    redis = workloads(full)["redis"]
    assert redis["spec"]["replicas"] == 1
    modelsim = deployments(full)["modelsim"]
    assert container(modelsim)["readinessProbe"]["httpGet"]["port"] == "http"


# TLS: every gRPC port, mutual TLS between the processes, certificates from a Secret, cert-manager or the chart.

TLS_ENV = {
    "CHATMESH_TLS_CERT_FILE": "tls.crt",
    "CHATMESH_TLS_KEY_FILE": "tls.key",
    "CHATMESH_TLS_CA_FILE": "ca.crt",
}
GATEWAY_TLS_ENV = {"CHATMESH_GATEWAY_TLS_CERT_FILE": "tls.crt", "CHATMESH_GATEWAY_TLS_KEY_FILE": "tls.key"}
CA_LOOKUP = '(lookup "v1" "Secret" .Release.Namespace (include "chatmesh.caSecretName" .)).data'
TLS_LOOKUP = 'lookup "v1" "Secret" .Release.Namespace (include "chatmesh.tlsSecretName" .)'


def _secret_mounted_at(deployment: dict[str, Any], path: str) -> str:
    """The Secret whose whole folder the container mounts at path, read-only (a subPath would never see renewals)."""
    (mount,) = [m for m in container(deployment).get("volumeMounts", []) if m["mountPath"] == path]
    assert mount["readOnly"] is True and "subPath" not in mount
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"])
    return volume["secret"]["secretName"]


def _tls_files(deployment: dict[str, Any], variables: dict[str, str]) -> str:
    """The Secret that holds the files the variables name, checking that each is <its folder>/<its key>."""
    env = env_of(deployment)
    folders = {env[variable]["value"].rsplit("/", 1)[0] for variable in variables}
    assert [env[variable]["value"].rsplit("/", 1)[1] for variable in variables] == list(variables.values())
    (folder,) = folders
    return _secret_mounted_at(deployment, folder)


def _target_hosts(chart: Rendered) -> list[str]:
    """The host names the channels dial (dns:///<host>:<port>), which the server certificate must carry."""
    data = settings_data(chart)
    return [data[f"CHATMESH_{p.upper()}_TARGET"].removeprefix("dns:///").rsplit(":", 1)[0] for p in INTERNAL]


def _certificate(secret: dict[str, Any], key: str = "tls.crt") -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(secret["data"][key]))


def _dns_names(certificate: x509.Certificate) -> list[str]:
    return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )


def test_the_default_install_serves_mutual_tls_with_a_generated_ca(defaults: Rendered) -> None:
    secret = defaults.get("Secret", f"{RELEASE}-tls")
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    for process in CORE:
        deployment = deployments(defaults)[process]
        assert _tls_files(deployment, TLS_ENV) == f"{RELEASE}-tls", process
        # The public port has no certificate of its own by default: the internal one.
        assert not set(GATEWAY_TLS_ENV) & set(env_of(deployment))
    certificate, ca = _certificate(secret), _certificate(secret, "ca.crt")
    certificate.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert _certificate(defaults.get("Secret", f"{RELEASE}-ca")) == ca
    # One certificate for servers and, for mutual TLS, clients; with the names the channels dial.
    usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    assert set(_target_hosts(defaults)) <= set(_dns_names(certificate))
    assert f"{name('gateway')}.{NAMESPACE}.svc.cluster.local" in _dns_names(certificate)
    # The CA's key is in no pod.
    for deployment in deployments(defaults).values():
        volumes = pod_spec(deployment)["volumes"]
        assert all(v.get("secret", {}).get("secretName") != f"{RELEASE}-ca" for v in volumes)


def test_without_tls_nothing_tls_is_set() -> None:
    chart = render({"tls": {"enabled": False, "gateway": {"existingSecret": "ignored"}}})
    for deployment in deployments(chart).values():
        assert not {*TLS_ENV, *GATEWAY_TLS_ENV} & set(env_of(deployment))
        assert all("secret" not in volume for volume in pod_spec(deployment)["volumes"])
    assert not any(variable.startswith("CHATMESH_TLS") for variable in settings_data(chart))
    assert sorted(s["metadata"]["name"] for s in chart.of_kind("Secret")) == [
        f"{RELEASE}-auth",
        f"{RELEASE}-redis-auth",
    ]
    assert chart.of_kind("Certificate") == []
    # The health ports and probes stay as they are.
    assert container(deployments(chart)["dialogue"])["readinessProbe"]["grpc"] == {"port": HEALTH_PORTS["dialogue"]}


def test_certificates_from_existing_secrets(per_process: Rendered) -> None:
    for process in CORE:
        assert _tls_files(deployments(per_process)[process], TLS_ENV) == "chatmesh-internal-tls"
    # The public port's own certificate, for the gateway only.
    gateway = deployments(per_process)["gateway"]
    assert _tls_files(gateway, GATEWAY_TLS_ENV) == "chatmesh-public-tls"
    for process in INTERNAL:
        assert not set(GATEWAY_TLS_ENV) & set(env_of(deployments(per_process)[process]))
    assert per_process.of_kind("Secret") == [] and per_process.of_kind("Certificate") == []


def test_certificates_from_cert_manager(full: Rendered) -> None:
    certificates = {c["metadata"]["name"]: c for c in full.of_kind("Certificate")}
    assert set(certificates) == {f"{RELEASE}-tls", f"{RELEASE}-gateway-tls"}
    internal = certificates[f"{RELEASE}-tls"]
    assert internal["apiVersion"] == "cert-manager.io/v1"
    spec = internal["spec"]
    assert spec["issuerRef"] == {"name": "chatmesh-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert {"server auth", "client auth"} <= set(spec["usages"])
    assert set(_target_hosts(full)) <= set(spec["dnsNames"])
    assert (spec["duration"], spec["renewBefore"]) == ("720h", "240h")
    assert spec["privateKey"]["rotationPolicy"] == "Always"
    for process in CORE:
        assert _tls_files(deployments(full)[process], TLS_ENV) == spec["secretName"]
    assert full.find("Secret", f"{RELEASE}-tls") is None and full.find("Secret", f"{RELEASE}-ca") is None
    # The public certificate: server auth only, for the names callers use.
    public = certificates[f"{RELEASE}-gateway-tls"]["spec"]
    assert public["dnsNames"] == ["chat.example.com"] and "client auth" not in public["usages"]
    assert public["issuerRef"] == {"name": "letsencrypt", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert _tls_files(deployments(full)["gateway"], GATEWAY_TLS_ENV) == public["secretName"]
    # modelsim speaks HTTP inside the release: no certificate.
    assert not set(TLS_ENV) & set(env_of(deployments(full)["modelsim"]))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls": {"certManager": {"enabled": True}}}, r"set tls\.certManager\.issuerRef\.name"),
        (
            {"tls": {"gateway": {"certManager": {"enabled": True, "issuerRef": {"name": "acme"}}}}},
            r"set tls\.gateway\.certManager\.dnsNames",
        ),
    ],
)
def test_incomplete_cert_manager_values_fail_with_what_to_set(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def _render_upgrade(chart_dir: Path, installed: Rendered, values: dict[str, Any] | None = None) -> Rendered:
    """An upgrade of the release installed as `installed`: lookup answers with its TLS Secrets."""

    def literal(secret: dict[str, Any]) -> str:
        data = " ".join(f'"{key}" "{value}"' for key, value in secret["data"].items())
        annotations = " ".join(f'"{k}" "{v}"' for k, v in secret["metadata"].get("annotations", {}).items())
        return f'(dict "data" (dict {data}) "metadata" (dict "annotations" (dict {annotations})))'

    helpers = chart_dir / "templates" / "_helpers.tpl"
    text = (CHART / "templates" / "_helpers.tpl").read_text()
    assert text.count(CA_LOOKUP) == 1 and text.count(TLS_LOOKUP) == 1
    ca, tls = installed.get("Secret", f"{RELEASE}-ca"), installed.get("Secret", f"{RELEASE}-tls")
    text = text.replace(CA_LOOKUP, f"{literal(ca)}.data").replace(TLS_LOOKUP, literal(tls))
    helpers.write_text(text)
    return render(values, chart_dir=chart_dir)


def test_the_generated_ca_and_certificate_are_kept_across_upgrades(defaults: Rendered, tmp_path: Path) -> None:
    chart_dir = tmp_path / "chatmesh"
    shutil.copytree(CHART, chart_dir)
    upgraded = _render_upgrade(chart_dir, defaults)
    for secret in (f"{RELEASE}-ca", f"{RELEASE}-tls"):
        assert upgraded.get("Secret", secret)["data"] == defaults.get("Secret", secret)["data"]
    # New names to carry (another cluster domain): the kept CA signs a new certificate, which every process
    # already trusts.
    renamed = _render_upgrade(chart_dir, defaults, {"clusterDomain": "example.internal"})
    assert renamed.get("Secret", f"{RELEASE}-ca")["data"] == defaults.get("Secret", f"{RELEASE}-ca")["data"]
    secret = renamed.get("Secret", f"{RELEASE}-tls")
    assert secret["data"]["tls.crt"] != defaults.get("Secret", f"{RELEASE}-tls")["data"]["tls.crt"]
    assert secret["data"]["ca.crt"] == defaults.get("Secret", f"{RELEASE}-tls")["data"]["ca.crt"]
    _certificate(secret).verify_directly_issued_by(_certificate(secret, "ca.crt"))
    assert set(_target_hosts(renamed)) <= set(_dns_names(_certificate(secret)))


# Redis: a persistent data Redis that never evicts, a cache Redis that may, a password, TLS.

REDIS_PASSWORD_LOOKUP = '(lookup "v1" "Secret" .Release.Namespace (include "chatmesh.redisPasswordSecretName" .)).data'


def _args(workload: dict[str, Any]) -> dict[str, str]:
    """A Redis container's `--flag value` arguments."""
    args = container(workload)["args"]
    assert len(args) % 2 == 0 and all(flag.startswith("--") for flag in args[::2])
    return dict(zip(args[::2], args[1::2], strict=True))


def test_the_data_redis_keeps_every_write_on_a_volume_and_never_evicts(defaults: Rendered, full: Rendered) -> None:
    for chart, memory, size, storage_class in ((defaults, "256mb", "1Gi", None), (full, "512mb", "2Gi", "fast-ssd")):
        redis = chart.get("StatefulSet", f"{RELEASE}-redis")
        assert redis["spec"]["replicas"] == 1 and redis["spec"]["serviceName"] == f"{RELEASE}-redis"
        args = _args(redis)
        # Every write in the append-only file; a full store refuses writes instead of evicting conversations.
        assert (args["--appendonly"], args["--appendfsync"], args["--dir"]) == ("yes", "everysec", "/data")
        assert (args["--maxmemory"], args["--maxmemory-policy"]) == (memory, "noeviction")
        (claim,) = redis["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["resources"]["requests"]["storage"] == size
        assert claim["spec"].get("storageClassName") == storage_class
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        (data,) = [m for m in container(redis)["volumeMounts"] if m["mountPath"] == "/data"]
        assert data["name"] == claim["metadata"]["name"]
        assert redis["spec"]["persistentVolumeClaimRetentionPolicy"] == {
            "whenDeleted": "Retain",
            "whenScaled": "Retain",
        }
        # Its memory limit leaves room for the fork of an AOF rewrite.
        assert container(redis)["resources"]["limits"]["memory"]
        # The Service stays a ClusterIP one, as it was before: an upgrade cannot change a Service's clusterIP.
        assert "clusterIP" not in chart.get("Service", f"{RELEASE}-redis")["spec"]


def test_the_cache_redis_evicts_and_keeps_nothing(defaults: Rendered, full: Rendered) -> None:
    for chart, memory in ((defaults, "128mb"), (full, "64mb")):
        cache_redis = chart.get("Deployment", f"{RELEASE}-cache-redis")
        args = _args(cache_redis)
        assert (args["--maxmemory"], args["--maxmemory-policy"]) == (memory, "allkeys-lru")
        assert (args["--appendonly"], args["--save"]) == ("no", "")
        assert "volumeClaimTemplates" not in cache_redis["spec"]


def test_the_bundled_redises_serve_tls_only_with_a_password_and_probes_that_use_both(defaults: Rendered) -> None:
    password = defaults.get("Secret", f"{RELEASE}-redis-auth")
    assert re.fullmatch(r"[A-Za-z0-9]{48}", base64.b64decode(password["data"]["password"]).decode())
    reference = {"name": f"{RELEASE}-redis-auth", "key": "password"}
    for component in ("redis", "cache-redis"):
        redis = workloads(defaults)[component]
        env = env_of(redis)
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == reference
        assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == reference
        args = _args(redis)
        assert args["--requirepass"] == "$(REDIS_PASSWORD)"
        # TLS only, with the internal certificate, mounted as a whole Secret; clients need no certificate.
        assert (args["--port"], args["--tls-port"], args["--tls-auth-clients"]) == ("0", "6379", "no")
        assert _secret_mounted_at(redis, "/etc/redis/tls") == f"{RELEASE}-tls"
        for flag, file in (
            ("--tls-cert-file", "tls.crt"),
            ("--tls-key-file", "tls.key"),
            ("--tls-ca-cert-file", "ca.crt"),
        ):
            assert args[flag] == f"/etc/redis/tls/{file}"
        probe = " ".join(container(redis)["readinessProbe"]["exec"]["command"])
        assert "redis-cli -h 127.0.0.1 -p 6379 --tls --cacert /etc/redis/tls/ca.crt ping" in probe and "PONG" in probe
    # The internal certificate carries the names chatmesh dials the Redises by.
    names = _dns_names(_certificate(defaults.get("Secret", f"{RELEASE}-tls")))
    for component in ("redis", "cache-redis"):
        assert f"{RELEASE}-{component}.{NAMESPACE}.svc.cluster.local" in names
    # chatmesh: rediss:// URLs, the password, and the CA to verify them with.
    for process in ("gateway", "dialogue", "cache"):
        env = env_of(deployments(defaults)[process])
        url = env.get("CHATMESH_REDIS_URL", env.get("CHATMESH_CACHE_REDIS_URL"))["value"]
        assert url.startswith("rediss://") and "@" not in url
        assert env["CHATMESH_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == reference
        assert env["CHATMESH_REDIS_TLS_CA_FILE"]["value"] == env["CHATMESH_TLS_CA_FILE"]["value"]
    assert not {"CHATMESH_REDIS_PASSWORD", "CHATMESH_REDIS_TLS_CA_FILE"} & set(env_of(deployments(defaults)["safety"]))


def test_without_tls_the_bundled_redises_are_plaintext_with_a_password() -> None:
    chart = render({"tls": {"enabled": False}})
    for component in ("redis", "cache-redis"):
        redis = workloads(chart)[component]
        args = _args(redis)
        assert args["--port"] == "6379" and "--tls-port" not in args
        assert args["--requirepass"] == "$(REDIS_PASSWORD)"
        assert "--tls" not in " ".join(container(redis)["readinessProbe"]["exec"]["command"])
        assert all("secret" not in volume for volume in pod_spec(redis)["volumes"])
    env = env_of(deployments(chart)["dialogue"])
    assert env["CHATMESH_REDIS_URL"]["value"] == f"redis://{RELEASE}-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    assert "CHATMESH_REDIS_TLS_CA_FILE" not in env and "CHATMESH_REDIS_PASSWORD" in env


def test_an_external_redis_over_tls_gets_its_ca_from_a_secret(per_process: Rendered) -> None:
    for process in ("gateway", "dialogue", "cache"):
        deployment = deployments(per_process)[process]
        assert _tls_files(deployment, {"CHATMESH_REDIS_TLS_CA_FILE": "ca.crt"}) == "redis-ca"
        assert "CHATMESH_REDIS_TLS_CERT_FILE" not in env_of(deployment)
    assert "CHATMESH_REDIS_TLS_CA_FILE" not in env_of(deployments(per_process)["safety"])
    # With a client certificate, for a Redis with tls-auth-clients.
    chart = render(
        {
            "redis": {
                "existingSecret": "chatmesh-redis",
                "tls": {"existingSecret": "redis-ca", "clientCertificate": True},
            }
        }
    )
    files = {
        "CHATMESH_REDIS_TLS_CA_FILE": "ca.crt",
        "CHATMESH_REDIS_TLS_CERT_FILE": "tls.crt",
        "CHATMESH_REDIS_TLS_KEY_FILE": "tls.key",
    }
    assert _tls_files(deployments(chart)["dialogue"], files) == "redis-ca"
    # The bundled cache Redis still serves the internal certificate.
    cache = env_of(deployments(chart)["cache"])
    assert cache["CHATMESH_REDIS_TLS_CA_FILE"]["value"] == "/etc/chatmesh/tls/ca.crt"


def test_the_generated_redis_password_is_kept_across_upgrades(defaults: Rendered, tmp_path: Path) -> None:
    chart_dir = tmp_path / "chatmesh"
    shutil.copytree(CHART, chart_dir)
    helpers = chart_dir / "templates" / "_helpers.tpl"
    assert helpers.read_text().count(REDIS_PASSWORD_LOOKUP) == 1
    installed = defaults.get("Secret", f"{RELEASE}-redis-auth")["data"]["password"]
    helpers.write_text(helpers.read_text().replace(REDIS_PASSWORD_LOOKUP, f'(dict "password" "{installed}")'))
    assert render(chart_dir=chart_dir).get("Secret", f"{RELEASE}-redis-auth")["data"]["password"] == installed
    # Offline, each render generates a new one.
    assert render().get("Secret", f"{RELEASE}-redis-auth")["data"]["password"] != installed


# Regions: one install per region, each with its own Redises; region values files.

REGION_FILES = sorted((CHART / "regions").glob("*.yaml"))


def test_there_is_a_values_file_for_each_region_of_the_guide() -> None:
    assert [path.stem for path in REGION_FILES] == ["apac", "eu-west", "us-east"]


@pytest.mark.parametrize("path", REGION_FILES, ids=lambda path: path.stem)
def test_each_region_file_lints_strictly_validates_and_sets_its_region(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert lint_findings(values) == []
    chart = render(values)  # checked against values.schema.json
    assert [error for obj in chart.objects if obj["kind"] not in CRD_KINDS for error in schema_errors(obj)] == []
    # CHATMESH_REGION, which every service reads, is the file's region, and a valid one for the settings.
    assert settings_data(chart)["CHATMESH_REGION"] == path.stem
    for variable in list(os.environ):
        if variable.startswith("CHATMESH_"):
            monkeypatch.delenv(variable)
    assert ServiceSettings(region=path.stem).region == path.stem
    # The region's own Redises (nothing bundled, so nothing of a region's data lives elsewhere), over TLS.
    assert set(workloads(chart)) == set(CORE)
    dialogue, cache = env_of(deployments(chart)["dialogue"]), env_of(deployments(chart)["cache"])
    assert dialogue["CHATMESH_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "chatmesh-redis"
    assert cache["CHATMESH_CACHE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "chatmesh-cache-redis"
    assert "CHATMESH_REDIS_TLS_CA_FILE" in dialogue and "CHATMESH_REDIS_TLS_CA_FILE" in cache
    # TLS from cert-manager: the region's CA issuer, and a public certificate for the region's endpoint.
    certificates = {c["metadata"]["name"]: c["spec"] for c in chart.of_kind("Certificate")}
    assert certificates[f"{RELEASE}-tls"]["issuerRef"]["name"] == f"chatmesh-{path.stem}-ca"
    assert all(n.startswith(f"{path.stem}.") for n in certificates[f"{RELEASE}-gateway-tls"]["dnsNames"])
    # Pods in the region's nodes, spread over its zones.
    for deployment in deployments(chart).values():
        assert "topology.kubernetes.io/region" in pod_spec(deployment)["nodeSelector"]
        zones = pod_spec(deployment)["topologySpreadConstraints"][0]
        assert zones["topologyKey"] == "topology.kubernetes.io/zone"


def test_the_region_is_a_value_checked_like_the_settings_check_it(defaults: Rendered) -> None:
    assert "CHATMESH_REGION" not in settings_data(defaults)
    for bad in ("EU-West", "eu_west", "-eu", "eu-"):
        with pytest.raises(helm.HelmValuesError, match="at '/region'"):
            render({"region": bad})


# Callers and tenants: API keys always required, the admin token and pepper for the gateway only, Redis for all.

AUTH_SECRETS = ("CHATMESH_ADMIN_TOKEN", "CHATMESH_API_KEY_PEPPER")
LOOKUP = '(lookup "v1" "Secret" .Release.Namespace (include "chatmesh.authSecretName" .))'


def _auth_data(chart: Rendered) -> dict[str, str]:
    return {
        key: base64.b64decode(value).decode() for key, value in chart.get("Secret", f"{RELEASE}-auth")["data"].items()
    }


def _process_settings(chart: Rendered, monkeypatch: pytest.MonkeyPatch, process: str = "gateway") -> Any:
    """A process's settings as its pod would read them (its own class of PROCESS_SETTINGS): the settings ConfigMap,
    then its env (Secrets resolved)."""
    for variable in list(os.environ):
        if variable.startswith(("CHATMESH_", "OPENAI_", "OTEL_")):
            monkeypatch.delenv(variable)
    environment = dict(settings_data(chart))
    for variable, entry in env_of(deployments(chart)[process]).items():
        if "value" in entry:
            environment[variable] = entry["value"]
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            reference = entry["valueFrom"]["secretKeyRef"]
            data = chart.get("Secret", reference["name"])["data"]
            environment[variable] = base64.b64decode(data[reference["key"]]).decode()
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    return PROCESS_SETTINGS[process]()


def _assert_read_as(parsed: ProcessSettings, expected: dict[str, Any]) -> set[str]:
    """Asserts that the fields of `expected` that this process reads (its settings class has them) hold those
    values; returns the fields it read."""
    own = {field: value for field, value in expected.items() if field in type(parsed).model_fields}
    assert {field: getattr(parsed, field) for field in own} == own
    return set(own)


@pytest.mark.parametrize("label", VALUE_SETS)
def test_every_call_needs_an_api_key(rendered: dict[str, Rendered], label: str) -> None:
    assert settings_data(rendered[label])["CHATMESH_AUTH"] == "required"
    for process, deployment in deployments(rendered[label]).items():
        assert "CHATMESH_AUTH" not in env_of(deployment), process
    # Chart wiring, not a value: config cannot turn it off.
    chart = render({"config": {"CHATMESH_AUTH": "off"}})
    assert settings_data(chart)["CHATMESH_AUTH"] == "required"


def test_only_the_gateway_gets_the_admin_token_and_pepper_from_a_secret(defaults: Rendered, full: Rendered) -> None:
    for chart in (defaults, full):
        for process, deployment in deployments(chart).items():
            env = env_of(deployment)
            if process == "gateway":
                for variable in AUTH_SECRETS:
                    assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-auth", "key": variable}
                    assert "value" not in env[variable]
            else:
                assert not set(AUTH_SECRETS) & set(env), process
        assert not set(AUTH_SECRETS) & set(settings_data(chart))
    # Generated: 48 random characters each (lookup finds no Secret offline, so each render makes new ones).
    generated = _auth_data(defaults)
    assert set(generated) == set(AUTH_SECRETS)
    assert all(re.fullmatch(r"[A-Za-z0-9]{48}", value) for value in generated.values())
    assert generated["CHATMESH_ADMIN_TOKEN"] != generated["CHATMESH_API_KEY_PEPPER"]
    again = _auth_data(render())
    assert all(again[key] != generated[key] for key in AUTH_SECRETS)
    # Given: stored as given, and never anywhere but in the auth Secret; the pepper left empty is generated.
    given = _auth_data(full)
    assert given["CHATMESH_ADMIN_TOKEN"] == "not-a-real-admin-token"
    assert re.fullmatch(r"[A-Za-z0-9]{48}", given["CHATMESH_API_KEY_PEPPER"])
    for obj in full.objects:
        if obj["kind"] != "Secret":
            assert "not-a-real-admin-token" not in yaml.safe_dump(obj), obj["metadata"]["name"]
    # The chart's other Secret (model key, salt) holds none of them.
    assert not set(AUTH_SECRETS) & set(full.get("Secret", RELEASE)["data"])


def test_secrets_are_refused_in_config() -> None:
    for variable in (*AUTH_SECRETS, "CHATMESH_REDIS_PASSWORD"):
        with pytest.raises(helm.HelmValuesError, match=f"invalid propertyName '{variable}'"):
            render({"config": {variable: "x"}})


def test_generated_auth_values_are_kept_across_upgrades(tmp_path: Path) -> None:
    """On a cluster, lookup returns the auth Secret of the previous release: its values are kept, a given value
    wins. Offline lookup finds nothing, so the chart is copied with lookup answering as a cluster would."""
    chart_dir = tmp_path / "chatmesh"
    shutil.copytree(CHART, chart_dir)
    helpers = chart_dir / "templates" / "_helpers.tpl"
    assert helpers.read_text().count(LOOKUP) == 1
    existing = (
        '(dict "data" (dict "CHATMESH_ADMIN_TOKEN" ("kept-token" | b64enc)'
        ' "CHATMESH_API_KEY_PEPPER" ("kept-pepper" | b64enc)))'
    )
    helpers.write_text(helpers.read_text().replace(LOOKUP, existing))
    assert _auth_data(render(chart_dir=chart_dir)) == {
        "CHATMESH_ADMIN_TOKEN": "kept-token",
        "CHATMESH_API_KEY_PEPPER": "kept-pepper",
    }
    assert _auth_data(render({"auth": {"adminToken": "new-token"}}, chart_dir=chart_dir)) == {
        "CHATMESH_ADMIN_TOKEN": "new-token",
        "CHATMESH_API_KEY_PEPPER": "kept-pepper",
    }


def test_the_gateway_rolls_when_auth_values_change_but_not_on_every_render(defaults: Rendered) -> None:
    def checksum(chart: Rendered) -> str:
        return deployments(chart)["gateway"]["spec"]["template"]["metadata"]["annotations"]["checksum/auth"]

    # The generated values differ between these renders (no lookup offline), but what was given did not change.
    assert re.fullmatch(r"[0-9a-f]{64}", checksum(defaults)) and checksum(render()) == checksum(defaults)
    assert checksum(render({"auth": {"adminToken": "rotated"}})) != checksum(defaults)
    assert checksum(render({"auth": {"existingSecret": "chatmesh-admin"}})) != checksum(defaults)
    for process in INTERNAL:
        deployment = deployments(defaults)[process]
        assert "checksum/auth" not in deployment["spec"]["template"]["metadata"]["annotations"]


def test_an_existing_auth_secret_is_referenced_and_none_is_generated(per_process: Rendered) -> None:
    assert per_process.find("Secret", f"{RELEASE}-auth") is None
    env = env_of(deployments(per_process)["gateway"])
    assert env["CHATMESH_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "chatmesh-admin", "key": "admin-token"}
    assert env["CHATMESH_API_KEY_PEPPER"]["valueFrom"]["secretKeyRef"] == {"name": "chatmesh-admin", "key": "pepper"}
    assert "get secret chatmesh-admin -o jsonpath='{.data.admin-token}' | base64 -d" in per_process.notes
    # Given values are ignored when an existing Secret is named.
    chart = render({"auth": {"existingSecret": "chatmesh-admin", "adminToken": "ignored"}})
    assert chart.find("Secret", f"{RELEASE}-auth") is None
    assert env_of(deployments(chart)["gateway"])["CHATMESH_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "chatmesh-admin",
        "key": "CHATMESH_ADMIN_TOKEN",
    }
    assert "ignored" not in yaml.safe_dump_all(chart.objects)


def test_limit_settings_reach_the_gateway_and_dialogue_as_they_parse_them(
    defaults: Rendered, full: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _process_settings(defaults, monkeypatch)
    spend = _process_settings(defaults, monkeypatch, "dialogue")
    assert settings.auth == "required"
    assert (settings.auth_cache_seconds, settings.request_limits_fail_open, spend.spend_limits_fail_open) == (
        1.0,
        True,
        False,
    )
    assert (spend.limits_default_max_tokens, settings.metrics_max_tenants, spend.metrics_max_tenants) == (
        4096,
        100,
        100,
    )
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == _auth_data(defaults)["CHATMESH_ADMIN_TOKEN"]
    assert settings.api_key_pepper.get_secret_value() == _auth_data(defaults)["CHATMESH_API_KEY_PEPPER"]
    assert settings.redis_url == f"rediss://{RELEASE}-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    assert settings.redis_password is not None and len(settings.redis_password.get_secret_value()) == 48
    assert settings.redis_tls_ca_file == settings.tls_ca_file == "/etc/chatmesh/tls/ca.crt"
    settings = _process_settings(full, monkeypatch)
    spend = _process_settings(full, monkeypatch, "dialogue")
    assert (settings.auth_cache_seconds, settings.request_limits_fail_open, spend.spend_limits_fail_open) == (
        0.5,
        False,
        True,
    )
    # A large integer stays an integer (Helm reads numbers as floats: 1000000 would otherwise be "1e+06").
    assert settings_data(full)["CHATMESH_LIMITS_DEFAULT_MAX_TOKENS"] == "1000000"
    assert (spend.limits_default_max_tokens, settings.metrics_max_tenants) == (1_000_000, 0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"auth": {"cacheSeconds": 2}}, "at '/auth/cacheSeconds': maximum: got 2, want 1.5"),
        ({"auth": {"cacheSeconds": -1}}, "at '/auth/cacheSeconds': minimum: got -1, want 0"),
        ({"auth": {"adminTokn": "x"}}, "at '/auth': additional properties 'adminTokn' not allowed"),
        ({"auth": {"enabled": False}}, "at '/auth': additional properties 'enabled' not allowed"),
        ({"auth": {"defaultMaxTokens": 0}}, "at '/auth/defaultMaxTokens': minimum: got 0, want 1"),
        ({"auth": {"metricsMaxTenants": 1.5}}, "at '/auth/metricsMaxTenants': got number, want integer"),
        ({"auth": {"requestLimitsFailOpen": "yes"}}, "at '/auth/requestLimitsFailOpen': got string, want boolean"),
    ],
)
def test_bad_auth_values_are_rejected(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as rejected:
        render(values)
    assert message in str(rejected.value)


@pytest.mark.parametrize("label", VALUE_SETS)
def test_the_gateway_reaches_the_same_redis_as_dialogue_and_the_cache_its_own(
    rendered: dict[str, Rendered], label: str
) -> None:
    chart = deployments(rendered[label])
    assert env_of(chart["gateway"])["CHATMESH_REDIS_URL"] == env_of(chart["dialogue"])["CHATMESH_REDIS_URL"]
    # The cache process is given only the cache Redis (CHATMESH_CACHE_REDIS_URL), which may evict.
    cache = env_of(chart["cache"])
    assert "CHATMESH_CACHE_REDIS_URL" in cache and "CHATMESH_REDIS_URL" not in cache
    assert cache["CHATMESH_CACHE_REDIS_URL"] != env_of(chart["dialogue"])["CHATMESH_REDIS_URL"]
    for process in ("gateway", "dialogue"):
        assert "CHATMESH_CACHE_REDIS_URL" not in env_of(chart[process])
        policy = rendered[label].get("NetworkPolicy", name(process))
        assert 6379 in _egress_ports(policy)


NO_REDIS = r"chatmesh requires Redis.*a second dialogue replica would not see the first one's conversations.*NOT_FOUND"


def test_a_release_without_redis_fails_with_a_message_that_says_why() -> None:
    # More than one dialogue replica (the default: an autoscaler from 2, or fixed replicas) without a shared Redis
    # would lose conversations between turns: the render fails, saying so and what to set.
    for dialogue in (
        {},
        {
            "autoscaling": {
                "enabled": False,
                "minReplicas": 2,
                "maxReplicas": 10,
                "targetCPUUtilizationPercentage": 70,
            },
            "replicas": 3,
        },
    ):
        with pytest.raises(helm.HelmError, match=NO_REDIS) as failed:
            render({"redis": {"bundled": {"enabled": False}}, "dialogue": dialogue})
        assert "Set redis.url or redis.existingSecret" in str(failed.value)
    # A cache Redis alone is not enough: it may evict.
    with pytest.raises(helm.HelmError, match=NO_REDIS):
        render({"redis": {"bundled": {"enabled": False}, "cache": {"url": "redis://cache.example:6379/0"}}})
    # Any one source of the data Redis is.
    for values in ({"url": "redis://redis.example:6379/0"}, {"existingSecret": "chatmesh-redis"}):
        chart = render({"redis": {"bundled": {"enabled": False}, **values}})
        assert "redis" not in workloads(chart)


# Observability.


def test_scrape_annotations_point_at_each_metrics_port(defaults: Rendered) -> None:
    metrics_ports = {"gateway": 9101, "dialogue": 9102, "safety": 9103, "cache": 9104}
    data = settings_data(defaults)
    for process in CORE:
        deployment = deployments(defaults)[process]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == port_of(deployment, "metrics") == metrics_ports[process]
        # The process serves /metrics on the port the pod declares.
        assert int(data[f"CHATMESH_{process.upper()}_METRICS_PORT"]) == metrics_ports[process]


def test_service_monitor_names_jobs_as_the_rules_and_dashboard_expect(full: Rendered) -> None:
    """deploy/prometheus/prometheus.yml names the jobs chatmesh-<process>; the alerts and dashboard select on them."""
    scrape_config = yaml.safe_load((CHART.parents[2] / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in scrape_config["scrape_configs"]}
    (monitor,) = full.of_kind("ServiceMonitor")
    (relabel,) = monitor["spec"]["endpoints"][0]["relabelings"]
    assert relabel["sourceLabels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
    assert relabel["targetLabel"] == "job"
    assert {relabel["replacement"].replace("$1", process) for process in CORE} == jobs


def test_tracing_endpoint_is_a_value(defaults: Rendered, full: Rendered) -> None:
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in settings_data(defaults)
    assert settings_data(full)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4317"
    assert settings_data(full)["OTEL_TRACES_SAMPLER_ARG"] == "0.1"


def test_prometheus_rules_and_dashboards_come_from_the_chart_files(tmp_path: Path) -> None:
    """The PrometheusRule holds the groups of every rule file, the dashboard ConfigMap every dashboard, unchanged
    (on a copy of the chart with example files, so that this holds whatever deploy/ has today)."""
    chart_dir = tmp_path / "chatmesh"
    shutil.copytree(CHART, chart_dir)
    for folder in ("prometheus", "grafana"):
        shutil.rmtree(chart_dir / "files" / folder, ignore_errors=True)
        (chart_dir / "files" / folder).mkdir()
    recording = {"groups": [{"name": "chatmesh-recording", "rules": [{"record": "x:rate5m", "expr": "rate(x[5m])"}]}]}
    alerting = {
        "groups": [
            {
                "name": "chatmesh-alerts",
                "rules": [
                    {
                        "alert": "ChatmeshDown",
                        "expr": 'up{job="gateway"} == 0',
                        "for": "5m",
                        "annotations": {"summary": "{{ $labels.instance }} is down"},
                    }
                ],
            }
        ]
    }
    (chart_dir / "files" / "prometheus" / "recording.yml").write_text(yaml.safe_dump(recording))
    (chart_dir / "files" / "prometheus" / "alerts.yaml").write_text(yaml.safe_dump(alerting))
    dashboard = '{"title": "chatmesh", "panels": [{"targets": [{"legendFormat": "{{model}}"}]}]}'
    (chart_dir / "files" / "grafana" / "chatmesh.json").write_text(dashboard)
    values = values_file("all-features.yaml")
    chart = render(values, chart_dir=chart_dir)
    (rule,) = chart.of_kind("PrometheusRule")
    assert rule["spec"]["groups"] == alerting["groups"] + recording["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    dashboards = chart.get("ConfigMap", f"{RELEASE}-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboards["metadata"]["annotations"] == {"grafana_folder": "chatmesh"}
    assert dashboards["data"] == {"chatmesh.json": dashboard}
    assert lint_findings(values, chart_dir=chart_dir) == []
    # Switched off, neither is rendered.
    off = render(None, chart_dir=chart_dir)
    assert off.of_kind("PrometheusRule") == [] and off.find("ConfigMap", f"{RELEASE}-dashboards") is None


# Values checking and NOTES.


@pytest.mark.parametrize(
    ("values_name", "message"),
    [
        ("bad-type.yaml", "at '/gateway/replicas': got string, want integer"),
        ("bad-negative-replicas.yaml", "at '/dialogue/replicas': minimum: got -1, want 0"),
    ],
)
def test_bad_values_are_rejected_with_a_clear_message(values_name: str, message: str) -> None:
    values = values_file(values_name)
    with pytest.raises(helm.HelmValuesError) as rejected:
        render(values)
    assert message in str(rejected.value)
    assert any(message in finding for finding in lint_findings(values))


def test_unknown_keys_and_inverted_bounds_are_rejected() -> None:
    with pytest.raises(helm.HelmValuesError, match="additional properties 'replica' not allowed"):
        render({"gateway": {"replica": 3}})
    with pytest.raises(helm.HelmValuesError, match="invalid propertyName 'context_window'"):
        render({"config": {"context_window": "3"}})
    bounds = {"cache": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}
    with pytest.raises(helm.HelmError, match=r"cache.autoscaling: minReplicas \(5\) is more than maxReplicas \(2\)"):
        render(bounds)


def test_notes_say_how_to_reach_the_gateway(defaults: Rendered, full: Rendered, per_process: Rendered) -> None:
    gateway = f"{name('gateway')}.{NAMESPACE}.svc.cluster.local:50051"
    assert gateway in defaults.notes
    assert f"kubectl -n {NAMESPACE} port-forward service/{name('gateway')} 50051:50051" in defaults.notes
    assert (
        f"grpcurl -cacert ca.crt -servername {name('gateway')}.{NAMESPACE}.svc.cluster.local 127.0.0.1:50051 list"
        in defaults.notes
    )
    assert "grpcurl -plaintext 127.0.0.1:50051 list" in render({"tls": {"enabled": False}}).notes
    assert "no model is configured" in defaults.notes and "bundled Redis is a single replica" in defaults.notes
    assert "load balancer" in full.notes and "no model is configured" not in full.notes
    assert "WARNING" not in per_process.notes


def test_notes_say_how_to_get_the_admin_token_and_make_a_tenant_and_a_key(defaults: Rendered) -> None:
    assert (
        f"kubectl -n {NAMESPACE} get secret {RELEASE}-auth -o jsonpath='{{.data.CHATMESH_ADMIN_TOKEN}}' | base64 -d"
        in defaults.notes
    )
    assert (
        'chatmesh tenants create NAME --target 127.0.0.1:50051 --admin-token "$CHATMESH_ADMIN_TOKEN"' in defaults.notes
    )
    assert "chatmesh keys create --tenant NAME --target 127.0.0.1:50051" in defaults.notes
    # A generated pepper goes with the release: the notes say so.
    assert "a new one invalidates every API key" in defaults.notes
    # A key with dots is escaped in the JSONPath.
    chart = render({"auth": {"existingSecret": "ours", "existingSecretAdminTokenKey": "admin.token"}})
    assert "get secret ours -o jsonpath='{.data.admin\\.token}'" in chart.notes
    assert "invalidates every API key" not in chart.notes


def test_conversation_image_and_tls_values_reach_the_processes_as_they_parse_them(
    defaults: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    built_in = DialogueSettings.model_fields
    parsed = _process_settings(defaults, monkeypatch, "dialogue")
    for field in ("conversation_max_messages", "window_max_messages", "window_reply_tokens", "summary_trigger_tokens"):
        assert getattr(parsed, field) == built_in[field].default
    assert parsed.model_context_tokens == built_in["model_context_tokens"].default
    gateway = _process_settings(defaults, monkeypatch, "gateway")
    assert (gateway.max_images_per_message, gateway.max_image_bytes) == (4, 5 * 1024 * 1024)
    for process in CORE:
        parsed = _process_settings(defaults, monkeypatch, process)
        assert parsed.tls_reload_seconds == 5 and parsed.internal_tls, process

    chart = render(
        {
            "conversations": {
                "retentionSeconds": 3600,
                "contextTokens": {"llama-3": 32768},
                "modelEncodings": {"llama-3": "cl100k_base"},
                "summary": {"model": "gpt-4o-mini", "triggerTokens": 500},
            },
            "images": {"maxPerMessage": 2},
        }
    )
    parsed = _process_settings(chart, monkeypatch, "dialogue")
    assert parsed.conversation_retention_seconds == 3600
    assert parsed.model_context_tokens == {"llama-3": 32768}
    assert parsed.model_encodings == {"llama-3": "cl100k_base"}
    assert (parsed.summary_model, parsed.summary_trigger_tokens) == ("gpt-4o-mini", 500)
    assert _process_settings(chart, monkeypatch, "gateway").max_images_per_message == 2


MODEL_DEPLOYMENTS = {
    "models": {
        "gpt-4o-mini": {
            "deployments": [
                {"name": "openai", "base_url": "https://api.openai.com/v1", "keys": [{"env": "OPENAI_KEY_1"}]},
                {"name": "vllm", "base_url": "http://vllm.models.svc:8000/v1", "keys": [{"env": "VLLM_KEY"}]},
            ]
        }
    }
}


def test_a_model_deployments_file_reaches_dialogue_and_safety_with_its_keys_from_a_secret() -> None:
    chart = render({"model": {"deployments": MODEL_DEPLOYMENTS, "deploymentKeysSecret": "model-keys"}})

    rendered = yaml.safe_load(chart.get("ConfigMap", f"{RELEASE}-model-deployments")["data"]["deployments.yaml"])
    assert rendered == MODEL_DEPLOYMENTS
    # What dialogue will read at start: the file as chatmesh parses it, its keys from the Secret's variables.
    parsed = parse_deployments(rendered, DialogueSettings(), {"OPENAI_KEY_1": "sk-1", "VLLM_KEY": "sk-2"})
    assert [deployment.name for deployment in parsed.models["gpt-4o-mini"].deployments] == ["openai", "vllm"]
    path = settings_data(chart)["CHATMESH_MODEL_DEPLOYMENTS_FILE"]
    assert path == "/etc/chatmesh/model-deployments/deployments.yaml"
    for process in CORE:
        d = deployments(chart)[process]
        mounts = {mount["name"]: mount["mountPath"] for mount in container(d)["volumeMounts"]}
        secrets = [source["secretRef"]["name"] for source in container(d)["envFrom"] if "secretRef" in source]
        if process in ("dialogue", "safety"):
            volume = {"name": "model-deployments", "configMap": {"name": f"{RELEASE}-model-deployments"}}
            assert mounts["model-deployments"] == str(Path(path).parent)
            assert volume in pod_spec(d)["volumes"]
            assert secrets == ["model-keys"]
            assert "checksum/model-deployments" in d["spec"]["template"]["metadata"]["annotations"]
        else:
            assert "model-deployments" not in mounts and secrets == []


def test_without_a_deployments_file_nothing_of_it_is_rendered(defaults: Rendered) -> None:
    assert defaults.find("ConfigMap", f"{RELEASE}-model-deployments") is None
    assert "CHATMESH_MODEL_DEPLOYMENTS_FILE" not in settings_data(defaults)


# Server-side tools (tools.*).

SERVER_TOOLS = [
    {
        "name": "order_status",
        "description": "Looks up an order's status by its number.",
        "url": "http://orders.orders.svc:8080/v1/status",
        "allowed_hosts": ["orders.orders.svc"],
        "timeout_seconds": 3,
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
        "headers_from_env": {"Authorization": "ORDERS_API_AUTHORIZATION"},
    },
    {
        "name": "weather",
        "description": "Today's weather.",
        "url": "https://weather.example.com/v1",
        "allowed_hosts": ["weather.example.com"],
    },
]


def _by_component(chart: Rendered, kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["labels"]["app.kubernetes.io/component"]: obj for obj in chart.of_kind(kind)}


def test_without_server_tools_no_tools_file_is_rendered_mounted_or_set(defaults: Rendered) -> None:
    assert defaults.find("ConfigMap", f"{RELEASE}-tools") is None
    assert "CHATMESH_TOOLS_FILE" not in settings_data(defaults)
    for process in CORE:
        d = deployments(defaults)[process]
        assert "tools" not in {volume["name"] for volume in pod_spec(d)["volumes"]}, process
        assert "checksum/tools" not in d["spec"]["template"]["metadata"]["annotations"], process
    # Dialogue reaches no tool endpoint (80 is the tools' default port, 443 the model's).
    assert 80 not in _egress_ports(_by_component(defaults, "NetworkPolicy")["dialogue"])


def test_server_tools_are_mounted_in_dialogue_only_and_load_as_dialogue_loads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {"tools": {"server": SERVER_TOOLS, "headersSecret": "orders-api", "timeoutSeconds": 4}}
    assert lint_findings(values) == []
    chart = render(values)
    assert [error for obj in chart.objects for error in schema_errors(obj)] == []

    settings = _process_settings(chart, monkeypatch, "dialogue")
    assert settings.tools_file == "/etc/chatmesh/tools/tools.yaml"
    # What dialogue reads at start: the ConfigMap's file, its header values from the Secret's variables.
    copy = tmp_path / "tools.yaml"
    copy.write_text(chart.get("ConfigMap", f"{RELEASE}-tools")["data"]["tools.yaml"])
    tools = ServerTools.load(
        settings.model_copy(update={"tools_file": str(copy)}), {"ORDERS_API_AUTHORIZATION": "Bearer x"}
    )
    assert tools.names() == [CURRENT_TIME, KNOWLEDGE_SEARCH, "order_status", "weather"]
    order_status, weather = tools.get("order_status"), tools.get("weather")
    assert order_status is not None and weather is not None
    assert (order_status.timeout_seconds, weather.timeout_seconds) == (3, 4)

    for process in CORE:
        d = deployments(chart)[process]
        mounts = {mount["name"]: mount for mount in container(d)["volumeMounts"]}
        secrets = [source["secretRef"]["name"] for source in container(d)["envFrom"] if "secretRef" in source]
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        if process == "dialogue":
            # A folder, not a subPath, like every mount of the chart.
            assert mounts["tools"] == {
                "name": "tools",
                "mountPath": str(Path(settings.tools_file).parent),
                "readOnly": True,
            }
            assert {"name": "tools", "configMap": {"name": f"{RELEASE}-tools"}} in pod_spec(d)["volumes"]
            assert secrets == ["orders-api"]
            assert "checksum/tools" in annotations
        else:
            assert "tools" not in mounts and secrets == [] and "checksum/tools" not in annotations, process

    # Only dialogue may reach the tools' endpoints.
    policies = _by_component(chart, "NetworkPolicy")
    assert _egress_ports(policies["dialogue"])[80] == []
    for process in ("gateway", "safety", "cache"):
        assert 80 not in _egress_ports(policies[process]), process


def test_dialogue_rolls_when_the_server_tools_change() -> None:
    def checksum(tools: list[dict[str, Any]]) -> str:
        dialogue = deployments(render({"tools": {"server": tools}}))["dialogue"]
        return dialogue["spec"]["template"]["metadata"]["annotations"]["checksum/tools"]

    assert checksum(SERVER_TOOLS) != checksum(SERVER_TOOLS[:1])


def test_the_tools_egress_is_a_value() -> None:
    chart = render(
        {
            "tools": {"server": SERVER_TOOLS},
            "networkPolicy": {
                "toolsEgress": {"ports": [8080], "to": [{"namespaceSelector": {"matchLabels": {"team": "orders"}}}]}
            },
        }
    )

    ports = _egress_ports(_by_component(chart, "NetworkPolicy")["dialogue"])
    assert ports[8080] == [{"namespaceSelector": {"matchLabels": {"team": "orders"}}}] and 80 not in ports


def test_tool_settings_reach_the_processes_as_they_parse_them(
    defaults: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults_of = {
        "tool_max_tools": 128,
        "tool_max_steps": 8,
        "tool_max_result_chars": 32_000,
        "tool_timeout_seconds": 10,
    }
    read = set()
    for process in ("gateway", "dialogue"):
        read |= _assert_read_as(_process_settings(defaults, monkeypatch, process), defaults_of)
    assert read == set(defaults_of)

    chart = render({"tools": {"maxTools": 16, "maxSteps": 3, "maxResultChars": 1000000, "timeoutSeconds": 2.5}})
    # A large integer stays an integer (Helm reads numbers as floats: 1000000 would otherwise be "1e+06").
    assert settings_data(chart)["CHATMESH_TOOL_MAX_RESULT_CHARS"] == "1000000"
    for process in ("gateway", "dialogue"):
        _assert_read_as(
            _process_settings(chart, monkeypatch, process),
            dict(zip(defaults_of, [16, 3, 1_000_000, 2.5], strict=True)),
        )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tools": {"maxTools": 129}}, "at '/tools/maxTools': maximum: got 129, want 128"),
        ({"tools": {"maxSteps": 1}}, "at '/tools/maxSteps': minimum: got 1, want 2"),
        ({"tools": {"timeoutSeconds": 0}}, "at '/tools/timeoutSeconds': exclusiveMinimum: got 0, want 0"),
        ({"tools": {"server": [{**SERVER_TOOLS[1], "method": "GET"}]}}, "additional properties 'method' not allowed"),
        ({"tools": {"server": [{**SERVER_TOOLS[1], "name": "a tool"}]}}, "at '/tools/server/0/name'"),
        ({"tools": {"server": [{"name": "weather", "url": "https://weather.example.com/v1"}]}}, "missing properties"),
        ({"networkPolicy": {"toolsEgress": {"ports": [0], "to": []}}}, "at '/networkPolicy/toolsEgress/ports/0'"),
    ],
)
def test_bad_tools_values_are_rejected(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as rejected:
        render(values)
    assert message in str(rejected.value)


def test_review_and_moderation_settings_reach_safety_as_it_parses_them(
    defaults: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = _process_settings(defaults, monkeypatch, "safety")
    assert (parsed.review_policy, parsed.safety_moderation_thresholds) == ({}, {})
    assert (parsed.safety_moderate_output, parsed.safety_output_moderation_window_chars) == (True, 1000)

    chart = render(
        {
            "safety": {
                "reviewPolicy": {"fraud": "block_and_review", "*": "allow_and_review"},
                "moderation": {"thresholds": {"violence": 0.4}, "output": False, "outputWindowChars": 2000},
            }
        }
    )
    parsed = _process_settings(chart, monkeypatch, "safety")
    assert parsed.review_policy == {"fraud": "block_and_review", "*": "allow_and_review"}
    assert parsed.safety_moderation_thresholds == {"violence": 0.4}
    assert (parsed.safety_moderate_output, parsed.safety_output_moderation_window_chars) == (False, 2000)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"safety": {"reviewPolicy": {"fraud": "review"}}}, "at '/safety/reviewPolicy/fraud'"),
        ({"safety": {"reviewPolicy": {"a category": "block"}}}, "invalid propertyName 'a category'"),
        ({"safety": {"moderation": {"thresholds": {"violence": 1.5}}}}, "at '/safety/moderation/thresholds/violence'"),
        ({"safety": {"moderation": {"outputWindowChars": 0}}}, "at '/safety/moderation/outputWindowChars'"),
    ],
)
def test_bad_review_and_moderation_values_are_rejected(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as rejected:
        render(values)
    assert message in str(rejected.value)


def test_review_queue_settings_reach_the_gateway_and_safety_as_they_parse_them(
    defaults: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    for process in ("gateway", "safety"):
        parsed = _process_settings(defaults, monkeypatch, process)
        assert (parsed.review_lease_seconds, parsed.review_retention_seconds) == (600, 604800)
    assert _process_settings(defaults, monkeypatch, "gateway").review_sweep_seconds == 30
    chart = render({"review": {"leaseSeconds": 300, "retentionSeconds": 86400, "sweepSeconds": 10}})
    parsed = _process_settings(chart, monkeypatch, "gateway")
    assert (parsed.review_lease_seconds, parsed.review_retention_seconds, parsed.review_sweep_seconds) == (
        300,
        86400,
        10,
    )


def test_review_cases_are_kept_no_longer_than_conversations(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(helm.HelmError, match=r"review.retentionSeconds \(700000\) must be at most conversations"):
        render({"review": {"retentionSeconds": 700000}})
    # Unset, it follows the conversations' retention (a week when they are kept until deleted).
    chart = render({"conversations": {"retentionSeconds": 3600}})
    assert _process_settings(chart, monkeypatch, "safety").review_retention_seconds == 3600
    chart = render({"conversations": {"retentionSeconds": 0}})
    assert _process_settings(chart, monkeypatch, "safety").review_retention_seconds == 604800
    chart = render({"review": {"retentionSeconds": 700000}, "conversations": {"retentionSeconds": 0}})
    assert _process_settings(chart, monkeypatch, "safety").review_retention_seconds == 700000


def test_the_review_backlog_alert_threshold_is_a_value(full: Rendered) -> None:
    def thresholds(chart: Rendered) -> list[str]:
        (rule,) = chart.of_kind("PrometheusRule")
        return [
            entry["expr"]
            for group in rule["spec"]["groups"]
            for entry in group["rules"]
            if entry.get("record") == "chatmesh:review_oldest_open_alert_seconds"
        ]

    assert thresholds(full) == ["vector(3600)"]
    values = values_file("all-features.yaml")
    values["review"] = {"oldestOpenAlertSeconds": 900}
    assert thresholds(render(values)) == ["vector(900)"]


def test_the_pii_policy_reaches_safety_and_dialogue_as_they_parse_it(
    defaults: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = {"email": "storage", "phone": "storage", "cn_id": "storage", "payment_card": "storage"}
    for process in ("safety", "dialogue"):
        assert _process_settings(defaults, monkeypatch, process).pii_policy == {**default, "ip_address": "leave"}

    chart = render({"pii": {"policy": {"email": "leave", "payment_card": "model", "ip_address": "storage"}}})
    parsed = _process_settings(chart, monkeypatch, "safety")
    assert parsed.pii_policy == {**default, "email": "leave", "payment_card": "model", "ip_address": "storage"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"pii": {"policy": {"phone": "redact"}}}, "at '/pii/policy/phone'"),
        ({"pii": {"policy": {"passport": "storage"}}}, "additional properties 'passport' not allowed"),
    ],
)
def test_bad_pii_policy_values_are_rejected(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as rejected:
        render(values)
    assert message in str(rejected.value)


def test_the_answer_cache_is_on_by_default_and_turned_off_for_dialogue_by_cache_answers(
    defaults: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _process_settings(defaults, monkeypatch, "dialogue").cache_answers is True
    assert _process_settings(render({"cache": {"answers": False}}), monkeypatch, "dialogue").cache_answers is False


# The semantic cache and embeddings (cache.semantic.*, embeddings.*).

SEMANTIC_FIELDS = (
    "semantic_cache",
    "semantic_cache_threshold",
    "semantic_cache_max_entries",
    "semantic_cache_memory_max_bytes",
    "semantic_cache_follow_ups",
    "embedding_model",
    "embedding_dimensions",
    "embedding_timeout_seconds",
)
SEMANTIC_ON = {"cache": {"semantic": {"enabled": True}}}


def test_semantic_cache_and_embedding_settings_reach_the_processes_as_they_parse_them(
    defaults: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The settings ConfigMap is every process's: the cache runs the semantic cache, and dialogue embeds too (the
    # knowledge base) with the same embedding model.
    read = set()
    for process in ("cache", "dialogue"):
        read |= _assert_read_as(
            _process_settings(defaults, monkeypatch, process),
            {field: CacheSettings.model_fields[field].default for field in SEMANTIC_FIELDS},
        )
    assert read == set(SEMANTIC_FIELDS)

    chart = render(
        {
            "cache": {
                "semantic": {
                    "enabled": True,
                    "threshold": 0.97,
                    "maxEntries": 2000,
                    "memoryMaxBytes": 4294967296,
                    "followUps": True,
                }
            },
            "embeddings": {"model": "bge-m3", "dimensions": 0, "timeoutSeconds": 1.5},
        }
    )
    # A large integer stays an integer (Helm reads numbers as floats: it would otherwise be "4.294967296e+09").
    assert settings_data(chart)["CHATMESH_SEMANTIC_CACHE_MEMORY_MAX_BYTES"] == "4294967296"
    for process in ("cache", "dialogue"):
        _assert_read_as(
            _process_settings(chart, monkeypatch, process),
            dict(zip(SEMANTIC_FIELDS, [True, 0.97, 2000, 4294967296, True, "bge-m3", 0, 1.5], strict=True)),
        )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"cache": {"semantic": {"threshold": 0}}}, "at '/cache/semantic/threshold': exclusiveMinimum: got 0, want 0"),
        ({"cache": {"semantic": {"threshold": 1.5}}}, "at '/cache/semantic/threshold': maximum: got 1.5, want 1"),
        ({"cache": {"semantic": {"maxEntries": 0}}}, "at '/cache/semantic/maxEntries': minimum: got 0, want 1"),
        (
            {"cache": {"semantic": {"memoryMaxBytes": -1}}},
            "at '/cache/semantic/memoryMaxBytes': minimum: got -1, want 0",
        ),
        ({"cache": {"semantic": {"enabled": "yes"}}}, "at '/cache/semantic/enabled': got string, want boolean"),
        (
            {"cache": {"semantic": {"followUp": True}}},
            "at '/cache/semantic': additional properties 'followUp' not allowed",
        ),
        ({"embeddings": {"dimensions": 8193}}, "at '/embeddings/dimensions': maximum: got 8,193, want 8,192"),
        ({"embeddings": {"dimensions": -1}}, "at '/embeddings/dimensions': minimum: got -1, want 0"),
        ({"embeddings": {"timeoutSeconds": 0}}, "at '/embeddings/timeoutSeconds': exclusiveMinimum: got 0, want 0"),
        ({"embeddings": {"model": ""}}, "at '/embeddings/model'"),
    ],
)
def test_bad_semantic_cache_and_embeddings_values_are_rejected(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as rejected:
        render(values)
    assert message in str(rejected.value)


def test_the_cache_gets_the_model_key_and_egress_only_with_the_semantic_cache_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = {"model": {"apiKey": "sk-test-not-a-real-key", "baseUrl": "https://llm.internal.example/v1"}}
    off = render(values)
    assert "OPENAI_API_KEY" not in env_of(deployments(off)["cache"])
    assert set(_egress_ports(_by_component(off, "NetworkPolicy")["cache"])) == {53, 6379}

    on = render({**values, **SEMANTIC_ON})
    assert env_of(deployments(on)["cache"])["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": RELEASE,
        "key": "OPENAI_API_KEY",
    }
    assert "OPENAI_API_KEY" not in env_of(deployments(on)["gateway"])
    # The cache embeds at the provider dialogue calls, with the same key.
    cache = _process_settings(on, monkeypatch, "cache")
    assert cache.semantic_cache
    assert cache.model_endpoint() == ("https://llm.internal.example/v1", "sk-test-not-a-real-key")
    assert cache.model_endpoint() == _process_settings(on, monkeypatch, "dialogue").model_endpoint()
    # It may reach the model endpoint as dialogue does (networkPolicy.modelEgress), and nothing more.
    policies = _by_component(on, "NetworkPolicy")
    egress = _egress_ports(policies["cache"])
    assert set(egress) == {53, 6379, 443}
    assert egress[443] == _egress_ports(policies["dialogue"])[443]

    # A key from an existing Secret is referenced the same way.
    existing = render({"model": {"existingSecret": "openai", "existingSecretKey": "api-key"}, **SEMANTIC_ON})
    assert env_of(deployments(existing)["cache"])["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "openai",
        "key": "api-key",
    }


def test_with_the_semantic_cache_the_cache_reads_the_model_deployments_file_with_its_keys() -> None:
    chart = render({"model": {"deployments": MODEL_DEPLOYMENTS, "deploymentKeysSecret": "model-keys"}, **SEMANTIC_ON})

    path = settings_data(chart)["CHATMESH_MODEL_DEPLOYMENTS_FILE"]
    for process in ("dialogue", "safety", "cache"):
        d = deployments(chart)[process]
        mounts = {mount["name"]: mount["mountPath"] for mount in container(d)["volumeMounts"]}
        secrets = [source["secretRef"]["name"] for source in container(d)["envFrom"] if "secretRef" in source]
        assert mounts["model-deployments"] == str(Path(path).parent), process
        assert {"name": "model-deployments", "configMap": {"name": f"{RELEASE}-model-deployments"}} in pod_spec(d)[
            "volumes"
        ]
        assert secrets == ["model-keys"], process
        assert "checksum/model-deployments" in d["spec"]["template"]["metadata"]["annotations"], process


def test_with_modelsim_the_cache_embeds_at_modelsim(full: Rendered, monkeypatch: pytest.MonkeyPatch) -> None:
    """all-features runs modelsim and turns the semantic cache on."""
    cache = _process_settings(full, monkeypatch, "cache")
    assert cache.semantic_cache
    assert cache.model_endpoint()[0] == f"http://{name('modelsim')}.{NAMESPACE}.svc.cluster.local:8089/v1"
    egress = _egress_ports(_by_component(full, "NetworkPolicy")["cache"])
    assert {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in egress[8089]} == {"modelsim"}
    assert 443 not in egress


# Knowledge bases (knowledge.*).

KNOWLEDGE_FIELDS = (
    "knowledge_chunk_tokens",
    "knowledge_chunk_overlap_tokens",
    "knowledge_top_k",
    "knowledge_context_max_tokens",
    "knowledge_vector_weight",
    "knowledge_min_similarity",
    "knowledge_version_check_seconds",
    "knowledge_memory_max_bytes",
    "knowledge_embedding_timeout_seconds",
    "knowledge_max_documents_per_request",
    "knowledge_max_document_bytes",
)


def test_knowledge_settings_reach_the_processes_as_they_parse_them(
    defaults: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dialogue ingests and retrieves; the gateway checks ingestion requests against the same limits.
    read = set()
    for process in ("dialogue", "gateway"):
        settings = PROCESS_SETTINGS[process]
        read |= _assert_read_as(
            _process_settings(defaults, monkeypatch, process),
            {
                field: settings.model_fields[field].default
                for field in KNOWLEDGE_FIELDS
                if field in settings.model_fields
            },
        )
    assert read == set(KNOWLEDGE_FIELDS)

    chart = render(
        {
            "knowledge": {
                "chunkTokens": 800,
                "chunkOverlapTokens": 200,
                "topK": 8,
                "contextMaxTokens": 3000,
                "vectorWeight": 0.7,
                "minSimilarity": 0.2,
                "versionCheckSeconds": 5,
                "memoryMaxBytes": 4294967296,
                "embeddingTimeoutSeconds": 60,
                "maxDocumentsPerRequest": 1000,
                "maxDocumentBytes": 20971520,
            }
        }
    )
    # Large integers stay integers (Helm reads numbers as floats).
    assert settings_data(chart)["CHATMESH_KNOWLEDGE_MEMORY_MAX_BYTES"] == "4294967296"
    assert settings_data(chart)["CHATMESH_KNOWLEDGE_MAX_DOCUMENT_BYTES"] == "20971520"
    for process in ("dialogue", "gateway"):
        _assert_read_as(
            _process_settings(chart, monkeypatch, process),
            dict(
                zip(
                    KNOWLEDGE_FIELDS,
                    [800, 200, 8, 3000, 0.7, 0.2, 5, 4294967296, 60, 1000, 20971520],
                    strict=True,
                )
            ),
        )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"knowledge": {"chunkTokens": 16}}, "at '/knowledge/chunkTokens': minimum: got 16, want 32"),
        ({"knowledge": {"topK": 0}}, "at '/knowledge/topK': minimum: got 0, want 1"),
        ({"knowledge": {"vectorWeight": 1.5}}, "at '/knowledge/vectorWeight': maximum: got 1.5, want 1"),
        ({"knowledge": {"minSimilarity": 1}}, "at '/knowledge/minSimilarity': exclusiveMaximum: got 1, want 1"),
        (
            {"knowledge": {"versionCheckSeconds": 0}},
            "at '/knowledge/versionCheckSeconds': exclusiveMinimum: got 0, want 0",
        ),
        ({"knowledge": {"memoryMaxBytes": -1}}, "at '/knowledge/memoryMaxBytes': minimum: got -1, want 0"),
        ({"knowledge": {"maxDocumentBytes": 25165824}}, "at '/knowledge/maxDocumentBytes': maximum"),
        ({"knowledge": {"topk": 3}}, "at '/knowledge': additional properties 'topk' not allowed"),
    ],
)
def test_bad_knowledge_values_are_rejected(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as rejected:
        render(values)
    assert message in str(rejected.value)


def test_a_chunk_overlap_of_half_a_chunk_or_more_is_rejected() -> None:
    with pytest.raises(helm.HelmError, match=r"knowledge.chunkOverlapTokens \(50\) must be less than half of"):
        render({"knowledge": {"chunkTokens": 100, "chunkOverlapTokens": 50}})
