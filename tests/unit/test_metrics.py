"""chatmesh.runtime.metrics: the grpc_server_* metrics of the call observer and the grpc_client_* ones of a metered
channel, on a real in-process server and channel, and capped labels;
chatmesh.model.metrics: the model's closed label sets."""

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from chatmesh.model.client import ModelClient
from chatmesh.model.metrics import ModelMetrics
from chatmesh.model.pricing import cost_usd, price_family
from chatmesh.runtime import metrics
from chatmesh.runtime.call_observer import CallObserver
from chatmesh.runtime.interceptors import observed
from chatmesh.runtime.settings import ModelSettings, ProcessSettings
from chatmesh.v1 import cache_pb2, chat_pb2, dialogue_pb2, dialogue_pb2_grpc, safety_pb2, safety_pb2_grpc

PRICES = {"gpt-4o-mini": (0.15, 0.60), "gpt-4o": (2.50, 10.00)}


class Safety(safety_pb2_grpc.SafetyServiceServicer):
    async def ScreenInput(self, request, context):
        if request.text == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        if request.text == "bug":
            raise ValueError("a bug")
        return safety_pb2.ScreenInputResponse(verdict=safety_pb2.Verdict(blocked=False))

    async def ScreenOutput(self, request_iterator, context):
        async for message in request_iterator:
            yield safety_pb2.ScreenOutputResponse(cleared_chars=len(message.text))
            yield safety_pb2.ScreenOutputResponse(cleared_chars=len(message.text))


class Dialogue(dialogue_pb2_grpc.DialogueServiceServicer):
    async def RunTurn(self, request, context):
        for _ in range(int(request.request.message or "0")):
            yield dialogue_pb2.TurnEvents(events=[chat_pb2.ChatEvent(delta=chat_pb2.Delta(text="x"))])


def sample(name: str, side: str, method: str, **labels: str) -> float:
    service, _, method_name = method.rpartition("/")
    value = REGISTRY.get_sample_value(
        f"grpc_{side}_{name}", {"grpc_service": service, "grpc_method": method_name, **labels}
    )
    return value or 0.0


@pytest.fixture
async def stubs() -> AsyncIterator[
    tuple[safety_pb2_grpc.SafetyServiceStub, dialogue_pb2_grpc.DialogueServiceStub, object]
]:
    server = grpc.aio.server(interceptors=[CallObserver(ProcessSettings(), observed, metered=True)])
    safety_pb2_grpc.add_SafetyServiceServicer_to_server(Safety(), server)
    dialogue_pb2_grpc.add_DialogueServiceServicer_to_server(Dialogue(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with metrics.MeteredChannel(grpc.aio.insecure_channel(f"127.0.0.1:{port}"), observed) as channel:
        yield (
            safety_pb2_grpc.SafetyServiceStub(channel),
            dialogue_pb2_grpc.DialogueServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )
    await server.stop(None)


def counts(side: str, method: str, kind: str) -> dict[str, float]:
    labels = {"grpc_type": kind}
    return {
        "started": sample("started_total", side, method, **labels),
        "OK": sample("handled_total", side, method, grpc_code="OK", **labels),
        "NotFound": sample("handled_total", side, method, grpc_code="NotFound", **labels),
        "Unknown": sample("handled_total", side, method, grpc_code="Unknown", **labels),
        "Canceled": sample("handled_total", side, method, grpc_code="Canceled", **labels),
        "received": sample("msg_received_total", side, method, **labels),
        "sent": sample("msg_sent_total", side, method, **labels),
        "timed": sample("handling_seconds_count", side, method, **labels),
    }


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


SCREEN_INPUT = "chatmesh.v1.SafetyService/ScreenInput"
SCREEN_OUTPUT = "chatmesh.v1.SafetyService/ScreenOutput"
TURN = "chatmesh.v1.DialogueService/RunTurn"


async def test_unary_calls_are_counted_by_code_on_both_sides(stubs):
    safety, _, _ = stubs
    before = {side: counts(side, SCREEN_INPUT, "unary") for side in ("server", "client")}
    await safety.ScreenInput(safety_pb2.ScreenInputRequest(text="fine"))
    for text in ("missing", "bug"):
        with pytest.raises(grpc.aio.AioRpcError):
            await safety.ScreenInput(safety_pb2.ScreenInputRequest(text=text))
    for side in ("server", "client"):
        assert delta(before[side], counts(side, SCREEN_INPUT, "unary")) == {
            "started": 3,
            "OK": 1,
            "NotFound": 1,
            "Unknown": 1,
            "received": 3 if side == "server" else 1,
            "sent": 1 if side == "server" else 3,
            "timed": 3,
        }, side


async def test_a_server_stream_counts_each_message_and_its_code_when_it_ends(stubs):
    _, dialogue, _ = stubs
    before = {side: counts(side, TURN, "server_stream") for side in ("server", "client")}
    call = dialogue.RunTurn(dialogue_pb2.TurnRequest(request=chat_pb2.ChatRequest(message="5")))
    assert len([event async for event in call]) == 5
    assert delta(before["server"], counts("server", TURN, "server_stream")) == {
        "started": 1,
        "OK": 1,
        "received": 1,
        "sent": 5,
        "timed": 1,
    }
    assert delta(before["client"], counts("client", TURN, "server_stream")) == {
        "started": 1,
        "OK": 1,
        "received": 5,
        "sent": 1,
        "timed": 1,
    }


async def test_a_bidi_stream_counts_both_directions(stubs):
    safety, _, _ = stubs
    before = {side: counts(side, SCREEN_OUTPUT, "bidi_stream") for side in ("server", "client")}
    call = safety.ScreenOutput()
    for text in ("a", "bb", "ccc"):
        await call.write(safety_pb2.ScreenOutputRequest(text=text))
        await call.read()
        await call.read()
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() is grpc.StatusCode.OK
    server = delta(before["server"], counts("server", SCREEN_OUTPUT, "bidi_stream"))
    assert server == {"started": 1, "OK": 1, "received": 3, "sent": 6, "timed": 1}
    client = delta(before["client"], counts("client", SCREEN_OUTPUT, "bidi_stream"))
    assert client == {"started": 1, "OK": 1, "received": 6, "sent": 3, "timed": 1}


async def test_a_stream_the_caller_cancels_is_canceled_on_the_client(stubs):
    safety, _, _ = stubs
    before = counts("client", SCREEN_OUTPUT, "bidi_stream")
    call = safety.ScreenOutput()
    await call.write(safety_pb2.ScreenOutputRequest(text="a"))
    await call.read()
    call.cancel()
    assert call.cancelled()
    assert delta(before, counts("client", SCREEN_OUTPUT, "bidi_stream"))["Canceled"] == 1


async def test_health_checks_are_not_counted(stubs):
    _, _, health_stub = stubs
    await health_stub.Check(health_pb2.HealthCheckRequest())
    assert sample("started_total", "server", "grpc.health.v1.Health/Check", grpc_type="unary") == 0
    assert sample("started_total", "client", "grpc.health.v1.Health/Check", grpc_type="unary") == 0


def test_served_methods_start_at_zero_for_every_code(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(metrics, "_enabled", True)
    metrics.initialize_server_metrics([cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name])
    for code in metrics.GO_CODE_NAMES.values():
        labels = {"grpc_service": "chatmesh.v1.CacheService", "grpc_method": "Lookup", "grpc_type": "unary"}
        assert REGISTRY.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code}) is not None


def test_model_labels_come_from_the_price_table():
    model_metrics = ModelMetrics(PRICES)
    assert price_family(PRICES, "gpt-4o-mini-2024-07-18") == "gpt-4o-mini"
    assert price_family(PRICES, "gpt-4o-2024-08-06") == "gpt-4o"
    assert price_family(PRICES, "someone's fine-tune") is None
    before = REGISTRY.get_sample_value("chatmesh_model_tokens_total", {"model": "other", "kind": "input"})
    call = model_metrics.call("chat", price_family(PRICES, "someone's fine-tune"))
    call.completed(7, 3, 0.0)
    assert REGISTRY.get_sample_value("chatmesh_model_tokens_total", {"model": "other", "kind": "input"}) == before + 7
    assert cost_usd(PRICES, "gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert cost_usd(PRICES, "unknown", 1_000_000, 1_000_000) == 0


def test_an_unexpected_failure_kind_is_counted_as_error():
    model_metrics = ModelMetrics(PRICES)
    labels = {"operation": "chat", "model": "gpt-4o", "outcome": "error"}
    before = REGISTRY.get_sample_value("chatmesh_model_requests_total", labels)
    model_metrics.call("chat", "gpt-4o").failed("KeyError")
    assert REGISTRY.get_sample_value("chatmesh_model_requests_total", labels) == before + 1


async def test_a_call_that_ended_without_usage_counts_its_tokens_and_cost_but_no_request():
    """A stream blocked at output, cancelled, or cut by its deadline: ModelClient.record_unfinished."""
    client = ModelClient(ModelSettings(model_prices_usd_per_million=PRICES))
    tokens = {"model": "gpt-4o-mini", "kind": "output"}
    ok = {"operation": "chat", "model": "gpt-4o-mini", "outcome": "ok"}
    before = (
        REGISTRY.get_sample_value("chatmesh_model_tokens_total", tokens),
        REGISTRY.get_sample_value("chatmesh_model_cost_usd_total", {"model": "gpt-4o-mini"}),
        REGISTRY.get_sample_value("chatmesh_model_requests_total", ok),
    )

    client.record_unfinished("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000)
    await client.close()

    assert REGISTRY.get_sample_value("chatmesh_model_tokens_total", tokens) == before[0] + 1_000_000
    cost = REGISTRY.get_sample_value("chatmesh_model_cost_usd_total", {"model": "gpt-4o-mini"})
    assert cost == pytest.approx(before[1] + 0.75)
    assert REGISTRY.get_sample_value("chatmesh_model_requests_total", ok) == before[2]


def test_a_capped_label_keeps_its_first_values_and_counts_the_rest_as_other():
    capped = metrics.CappedLabel(2)
    assert [capped(value) for value in ("a", "b", "c", "a", "d")] == ["a", "b", "other", "a", "other"]


@pytest.fixture(autouse=True)
def _no_leaked_enable() -> Iterator[None]:
    enabled = metrics._enabled
    yield
    metrics._enabled = enabled


async def test_a_request_stream_given_as_an_iterator_is_counted(stubs):
    safety, _, _ = stubs
    before = counts("client", SCREEN_OUTPUT, "bidi_stream")

    async def requests() -> AsyncIterator[safety_pb2.ScreenOutputRequest]:
        for text in ("a", "b"):
            yield safety_pb2.ScreenOutputRequest(text=text)

    assert len([response async for response in safety.ScreenOutput(requests())]) == 4
    assert delta(before, counts("client", SCREEN_OUTPUT, "bidi_stream")) == {
        "started": 1,
        "OK": 1,
        "received": 4,
        "sent": 2,
        "timed": 1,
    }
