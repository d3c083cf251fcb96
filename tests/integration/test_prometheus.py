"""A real Prometheus scrapes every chatmesh process while known traffic runs through the cluster; what it
computes (success ratio, P90 of StreamChat's time to first token and of Chat's whole call, tokens, cost) must
match that traffic, and every expression of the rules
(deploy/prometheus) and of the dashboard (deploy/grafana) must evaluate and return data.

Prometheus scrapes and evaluates every second. The served methods' series exist at 0 from the start,
and the traffic starts only after a first scrape of every process, so rates see every call.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from support.cluster import Cluster
from support.prometheus_server import PrometheusServer

from chatmesh.runtime.metrics import GO_CODE_NAMES, LATENCY_BUCKETS
from chatmesh.v1 import chat_pb2, chat_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = (
    ROOT / "deploy" / "prometheus" / "chatmesh.rules.yml",
    ROOT / "deploy" / "prometheus" / "chatmesh.alerts.yml",
)
DASHBOARD = ROOT / "deploy" / "grafana" / "chatmesh.json"
# The codes that are failures of ours, as chatmesh.rules.yml defines them.
OUR_FAILURES = {
    "Unknown",
    "DeadlineExceeded",
    "ResourceExhausted",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
}
CHAT_SERVICE = 'grpc_service="chatmesh.v1.ChatService"'
# The slow calls' time to first token: well inside the (1, 1.5] bucket, which is then the P90's, with room
# for a busy machine's delays.
SLOW_SECONDS = 1.2
# How much longer a call may take as the client times it than as the gateway does (the hop, and a busy
# machine's scheduling): a bucket bound within this of a call's time makes two buckets acceptable.
CLIENT_SLACK_SECONDS = 0.1
# Dashboard queries range over the whole test (Prometheus starts with the module's cluster).
RATE_INTERVAL = "2m"


@dataclass(frozen=True, slots=True)
class Sent:
    """One call the test made, and what came back."""

    method: str
    code: str  # Go's name of the status code, as in grpc_code
    seconds: float
    # StreamChat: when its first Delta came, if one did.
    first_token_seconds: float | None = None
    model: str = ""  # the model label its tokens count under
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as running:
        yield running


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster) -> Iterator[PrometheusServer]:
    targets = {f"chatmesh-{name}": f"127.0.0.1:{port}" for name, port in cluster.metrics_ports.items()}
    server = PrometheusServer.start(targets, RULE_FILES)
    try:
        up = server.wait_for(
            lambda: server.values('up{job=~"chatmesh-.*"}', "job"), lambda up: up == dict.fromkeys(targets, 1.0)
        )
        assert up == dict.fromkeys(targets, 1.0), f"not every process was scraped: {up}\n{server.log()}"
        yield server
    finally:
        server.stop()


def request(message: str = "", user_id: str = "metrics", conversation_id: str = "", **options) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(
        conversation_id=conversation_id,
        user_id=user_id,
        message=message or f"question {uuid.uuid4().hex}",
        options=chat_pb2.ChatOptions(**options),
    )


async def call(stub: chat_pb2_grpc.ChatServiceStub, method: str, message: chat_pb2.ChatRequest) -> Sent:
    """Makes one call and times it; the model label is the price table's name of the request's model."""
    requested = message.options.model or "gpt-4o-mini"
    model = requested if requested in ("gpt-4o-mini", "gpt-4o") else "other"
    started = time.perf_counter()
    first_token = None
    try:
        if method == "Chat":
            response = await stub.Chat(message)
            usage, cost, cached = response.usage, response.cost_usd, response.cached
        else:
            events = []
            async for event in stub.StreamChat(message):
                if first_token is None and event.HasField("delta"):
                    first_token = time.perf_counter() - started
                events.append(event)
            completed = events[-1].completed
            usage, cost, cached = completed.usage, completed.cost_usd, completed.cached
    except grpc.aio.AioRpcError as error:
        return Sent(method, GO_CODE_NAMES[error.code()], time.perf_counter() - started, first_token_seconds=first_token)
    return Sent(
        method,
        "OK",
        time.perf_counter() - started,
        first_token,
        model,
        usage.input_tokens,
        usage.output_tokens,
        cost,
        cached,
    )


async def send_traffic(cluster: Cluster) -> list[Sent]:
    cluster.sim_reset()
    cluster.sim_config(first_token_latency_seconds=0, token_delay_seconds=0, reply_tokens=12)
    sent: list[Sent] = []
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        # Fast answers of three models, a few at a time.
        fast = [("StreamChat", {})] * 14 + [("Chat", {})] * 6 + [("StreamChat", {"model": "gpt-4o"})] * 4
        fast += [("Chat", {"model": "modelsim-1"})] * 2
        for start in range(0, len(fast), 6):
            sent += await asyncio.gather(
                *(call(stub, method, request(**options)) for method, options in fast[start : start + 6])
            )
        # A refusal is an answer (OK); the caller's mistakes are answered too.
        sent.append(await call(stub, "Chat", request("tell me about the forbidden-demo-term")))
        sent.append(await call(stub, "Chat", request(user_id="")))
        sent.append(await call(stub, "StreamChat", request(temperature=5.0)))
        sent.append(await call(stub, "StreamChat", request(conversation_id=uuid.uuid4().hex)))
        started = time.perf_counter()
        try:
            await stub.GetConversation(chat_pb2.GetConversationRequest(conversation_id=uuid.uuid4().hex, user_id="x"))
            code = "OK"
        except grpc.aio.AioRpcError as error:
            code = GO_CODE_NAMES[error.code()]
        sent.append(Sent("GetConversation", code, time.perf_counter() - started))
        # A model failure that outlives the retries (4 attempts): ours.
        cluster.sim_faults(500, count=4)
        sent.append(await call(stub, "StreamChat", request()))
        # Slow answers, all at once: they make the P90.
        cluster.sim_config(first_token_latency_seconds=SLOW_SECONDS)
        sent += await asyncio.gather(*(call(stub, method, request()) for method in ["StreamChat", "Chat"] * 4))
        cluster.sim_config(first_token_latency_seconds=0)
        # A question already answered comes from the cache (stored just after its answer: ask until it does).
        question = "what is the capital of France?"
        for _ in range(20):
            sent.append(await call(stub, "Chat", request(question)))
            if sent[-1].cached:
                break
            await asyncio.sleep(0.1)
    cluster.sim_reset()
    return sent


@pytest.fixture(scope="module")
async def traffic(cluster: Cluster, prometheus: PrometheusServer) -> AsyncIterator[list[Sent]]:
    """The calls sent, once Prometheus has scraped all of them and evaluated its rules after that."""
    sent = await send_traffic(cluster)
    ended = time.time()
    assert {s.code for s in sent} >= {"OK", "InvalidArgument", "NotFound", "Unavailable"}, sent
    assert any(s.cached for s in sent), "no answer came from the cache"
    handled = f"sum(grpc_server_handled_total{{{CHAT_SERVICE}}})"
    tokens = "sum(chatmesh_model_tokens_total)"
    expected = (float(len(sent)), float(sum(s.input_tokens + s.output_tokens for s in sent)))
    seen = prometheus.wait_for(
        lambda: (prometheus.value(handled), prometheus.value(tokens)), lambda seen: seen == expected
    )
    assert seen == expected, "Prometheus did not scrape every call (calls, tokens)"
    # Every process scraped since the last call ended: its counters are all in.
    last_scrapes = 'min(timestamp(up{job=~"chatmesh-.*"}))'
    scraped = prometheus.wait_for(lambda: prometheus.value(last_scrapes), lambda at: at is not None and at > ended)
    assert scraped is not None and scraped > ended, "not every process was scraped after the traffic"
    # Rules evaluate every second: wait until one has run on the last scrape.
    ratio = success_ratio(sent)
    prometheus.wait_for(
        lambda: prometheus.value("chatmesh:chat_success:ratio_rate5m"),
        lambda value: value is not None and math.isclose(value, ratio, rel_tol=1e-9),
        timeout=10,
    )
    yield sent


def success_ratio(sent: list[Sent]) -> float:
    return 1 - sum(s.code in OUR_FAILURES for s in sent) / len(sent)


def test_every_chat_service_call_is_counted_by_method_and_code(traffic: list[Sent], prometheus: PrometheusServer):
    counted = {
        (sample["metric"]["grpc_method"], sample["metric"]["grpc_code"]): float(sample["value"][1])
        for sample in prometheus.query(f"sum by (grpc_method, grpc_code) (grpc_server_handled_total{{{CHAT_SERVICE}}})")
    }
    assert {key: value for key, value in counted.items() if value} == {
        key: float(count) for key, count in Counter((s.method, s.code) for s in traffic).items()
    }
    started = prometheus.values(f"sum by (grpc_method) (grpc_server_started_total{{{CHAT_SERVICE}}})", "grpc_method")
    assert {method: value for method, value in started.items() if value} == {
        method: float(count) for method, count in Counter(s.method for s in traffic).items()
    }


def test_the_success_ratio_counts_only_our_failures(traffic: list[Sent], prometheus: PrometheusServer):
    expected = success_ratio(traffic)
    assert expected < 1
    for window in ("5m", "30m", "1h", "6h"):
        assert prometheus.value(f"chatmesh:chat_success:ratio_rate{window}") == pytest.approx(expected, rel=1e-9)
    # One failure in a few dozen calls is far above the 0.1% budget: the page-level burn alert fires.
    assert prometheus.values('ALERTS{alertname="ChatmeshErrorBudgetFastBurn"}', "alertstate") == {"firing": 1.0}


def p90_bucket(seconds: list[float]) -> tuple[float, float]:
    """The histogram bucket (lower, upper] that holds the P90 of `seconds`, as histogram_quantile finds it:
    the first whose cumulative count reaches 0.9 of the total."""
    rank = 0.9 * len(seconds)
    bounds = [0.0, *LATENCY_BUCKETS]
    index = next(i for i in range(1, len(bounds)) if sum(t <= bounds[i] for t in seconds) >= rank)
    return bounds[index - 1], bounds[index]


def test_every_stream_that_sent_a_delta_counts_its_time_to_first_token(
    traffic: list[Sent], prometheus: PrometheusServer
):
    streams = [s for s in traffic if s.method == "StreamChat"]
    # Refused and failed streams sent no Delta: they count in the success ratio, not here.
    assert any(s.first_token_seconds is None for s in streams)
    timed = [s.first_token_seconds for s in streams if s.first_token_seconds is not None]
    counted = prometheus.values("sum by (grpc_method) (chatmesh_time_to_first_token_seconds_count)", "grpc_method")
    assert counted == {"StreamChat": float(len(timed))}
    # The gateway's clock starts after the client's and stops before the Delta reaches it.
    total = prometheus.value("sum(chatmesh_time_to_first_token_seconds_sum)")
    assert total is not None and 0 < total <= sum(timed)


def test_the_p90_of_each_method_is_in_the_bucket_of_its_true_p90(traffic: list[Sent], prometheus: PrometheusServer):
    """StreamChat's objective is its time to first token; Chat's, its whole call."""
    waited = {
        "StreamChat": [s.first_token_seconds for s in traffic if s.method == "StreamChat" and s.first_token_seconds],
        "Chat": [s.seconds for s in traffic if s.method == "Chat"],
    }
    p90 = prometheus.values("chatmesh:chat_latency_seconds:p90_rate5m", "grpc_method")
    assert set(p90) == set(waited)
    for method, seconds in waited.items():
        # The gateway times a call a little shorter than the client does: its bucket is one of these.
        lower, _ = p90_bucket([max(0.0, t - CLIENT_SLACK_SECONDS) for t in seconds])
        _, upper = p90_bucket(seconds)
        assert lower >= 1.0, f"the slow calls did not make {method}'s P90: {sorted(seconds)}"
        assert lower < p90[method] <= upper, (method, p90[method], sorted(seconds))


def test_tokens_and_cost_match_the_usage_the_calls_returned(traffic: list[Sent], prometheus: PrometheusServer):
    answered = [s for s in traffic if s.code == "OK"]
    expected_tokens: Counter[tuple[str, str]] = Counter()
    expected_cost: Counter[str] = Counter()
    for s in answered:
        expected_tokens[s.model, "input"] += s.input_tokens
        expected_tokens[s.model, "output"] += s.output_tokens
        expected_cost[s.model] += s.cost_usd
    assert set(expected_cost) == {"gpt-4o-mini", "gpt-4o", "other"}
    tokens = {
        (sample["metric"]["model"], sample["metric"]["kind"]): float(sample["value"][1])
        for sample in prometheus.query("sum by (model, kind) (chatmesh_model_tokens_total)")
    }
    assert {key: value for key, value in tokens.items() if value} == {
        key: float(value) for key, value in expected_tokens.items() if value
    }
    cost = prometheus.values("sum by (model) (chatmesh_model_cost_usd_total)", "model")
    assert expected_cost["other"] == 0 and expected_cost["gpt-4o"] > 0
    for model, usd in expected_cost.items():
        assert cost.get(model, 0.0) == pytest.approx(usd, rel=1e-9, abs=1e-12), model
    # The failed call: three retries, four failed attempts, one failed call.
    assert prometheus.value('sum(chatmesh_model_retries_total{operation="chat",kind="unavailable"})') == 3
    assert prometheus.value('sum(chatmesh_model_upstream_errors_total{operation="chat",kind="unavailable"})') == 4
    assert prometheus.value('sum(chatmesh_model_requests_total{operation="chat",outcome="unavailable"})') == 1


def test_cache_and_safety_are_counted(traffic: list[Sent], prometheus: PrometheusServer):
    lookups = prometheus.values("sum by (tier) (chatmesh_cache_lookups_total)", "tier")
    assert lookups["memory"] == sum(s.cached for s in traffic)
    blocked = prometheus.values('sum by (category) (chatmesh_safety_blocked_total{stage="input"})', "category")
    assert blocked == {"demo": 1.0}
    screened = prometheus.values('sum by (verdict) (chatmesh_safety_screens_total{stage="input"})', "verdict")
    # Every turn past validation and the conversation's lookup is screened: the answered ones and the model failure.
    screened_turns = sum(s.code in ("OK", "Unavailable") for s in traffic if s.method != "GetConversation")
    assert screened == {"blocked": 1.0, "allowed": float(screened_turns - 1)}


def has_data(samples: list[dict]) -> bool:
    """At least one sample with a number (not NaN)."""
    return any(not math.isnan(float(sample["value"][1])) for sample in samples)


def test_every_rule_is_healthy_and_returns_data(traffic: list[Sent], prometheus: PrometheusServer):
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    in_files = sum(
        line.strip().startswith(("- record:", "- alert:"))
        for path in RULE_FILES
        for line in path.read_text().splitlines()
    )
    assert len(rules) == in_files
    for rule in rules:
        assert rule["health"] == "ok", rule
        if rule["type"] == "recording":
            assert has_data(prometheus.query(rule["query"])), rule["name"]
            continue
        prometheus.query(rule["query"])  # evaluates without error
        # An alert returns data only when it fires; what it compares must return data now.
        ingredients = re.findall(r"chatmesh:[a-z0-9_:]+|\bup\{[^}]*\}", rule["query"])
        assert ingredients, rule["name"]
        for selector in ingredients:
            assert has_data(prometheus.query(selector)), (rule["name"], selector)


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        if target.get("expr")
    ]


def test_the_dashboard_has_its_datasource_variable_and_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "chatmesh"
    (variable,) = dashboard["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert all(panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for panel in panels)
    titles = " | ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for wanted in (
        "success",
        "p50, p90, p99",
        "time to first token",
        "method and code",
        "tokens per second",
        "cost per hour",
        "cache hit rate",
        "safety blocks",
        "calls per second by tenant",
        "cost per hour by tenant",
        "limit rejections",
        "review cases waiting",
        "oldest review case",
        "tokens saved by the cache",
        "usd saved by the cache",
        "turns answered from the cache, by kind",
        "semantic lookups by outcome, guard refusals",
        "similarity of the nearest question",
    ):
        assert wanted in titles, wanted
    for process in ("gateway", "dialogue", "safety", "cache"):
        assert f"process: {process}" in titles


def test_every_dashboard_expression_evaluates_and_returns_data(traffic: list[Sent], prometheus: PrometheusServer):
    expressions = dashboard_expressions()
    assert len(expressions) > 20
    for title, expr in expressions:
        query = expr.replace("$__rate_interval", RATE_INTERVAL)
        assert "$" not in query, (title, expr)
        assert has_data(prometheus.query(query)), (title, query)
