"""Traces: one request through the real processes is one trace, exported over OTLP to a receiver in the test.

The cluster runs with OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP/gRPC TraceService implemented here
(tests/support/otlp.py). One StreamChat must give one trace with spans from gateway, dialogue, safety and
cache, linked parent to child across the processes, and a GenAI `chat {model}` span for the model call
whose context reached the model in the HTTP request's `traceparent`.
"""

from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest
from support.cluster import Cluster
from support.otlp import OtlpTraceReceiver, ReceivedSpan

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

MODEL = "gpt-4o-mini"
CHAT_SPAN = f"chat {MODEL}"
GATEWAY_STREAM = "/chatmesh.v1.ChatService/StreamChat"
TURN = "/chatmesh.v1.DialogueService/RunTurn"
SCREEN_INPUT = "/chatmesh.v1.SafetyService/ScreenInput"
SCREEN_OUTPUT = "/chatmesh.v1.SafetyService/ScreenOutput"
LOOKUP = "/chatmesh.v1.CacheService/Lookup"
STORE = "/chatmesh.v1.CacheService/Store"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpTraceReceiver]:
    running = OtlpTraceReceiver().start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def traced_cluster(receiver: OtlpTraceReceiver) -> Iterator[Cluster]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "CHATMESH_MODEL_MAX_ATTEMPTS": "3",
    }
    with Cluster(env=env) as running:
        yield running


@pytest.fixture
def traced(traced_cluster: Cluster, receiver: OtlpTraceReceiver) -> Iterator[Cluster]:
    traced_cluster.sim_reset()
    traced_cluster.sim_config(first_token_latency_seconds=0, token_delay_seconds=0, reply_tokens=12)
    receiver.clear()
    yield traced_cluster
    traced_cluster.sim_reset()


@pytest.fixture
async def traced_chat(traced_cluster: Cluster) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with grpc.aio.insecure_channel(traced_cluster.gateway_target) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def _one(spans: list[ReceivedSpan], service: str, kind: str, name: str) -> ReceivedSpan:
    found = [span for span in spans if (span.service, span.kind, span.name) == (service, kind, name)]
    assert len(found) == 1, f"{service} {kind} {name}: {len(found)} spans"
    return found[0]


def _parent_of(traceparent: str) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C `traceparent` header of a sampled span."""
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00" and int(flags, 16) & 1, traceparent
    return trace_id, span_id


def _has(service: str, kind: str, name: str) -> Callable[[list[ReceivedSpan]], bool]:
    return lambda spans: any((s.service, s.kind, s.name) == (service, kind, name) for s in spans)


async def test_one_stream_is_one_trace_across_every_process_with_a_genai_model_span(
    traced: Cluster, receiver: OtlpTraceReceiver, traced_chat: chat_pb2_grpc.ChatServiceStub
):
    request = chat_pb2.ChatRequest(
        user_id="tracer",
        message="How are traces propagated?",
        options=chat_pb2.ChatOptions(model=MODEL, temperature=0.25, top_p=0.5, max_tokens=64),
    )
    events = [event async for event in traced_chat.StreamChat(request)]
    usage = events[-1].completed.usage
    assert usage.output_tokens == 12 and usage.input_tokens > 0

    # The cache Store runs after the reply, so its spans are the last to come.
    expected = [
        ("gateway", "SERVER", GATEWAY_STREAM),
        ("gateway", "CLIENT", TURN),
        ("dialogue", "SERVER", TURN),
        ("dialogue", "CLIENT", CHAT_SPAN),
        *(
            (process, kind, name)
            for name in (SCREEN_INPUT, SCREEN_OUTPUT)
            for process, kind in (("dialogue", "CLIENT"), ("safety", "SERVER"))
        ),
        *(
            (process, kind, name)
            for name in (LOOKUP, STORE)
            for process, kind in (("dialogue", "CLIENT"), ("cache", "SERVER"))
        ),
    ]
    spans = receiver.wait_for(lambda spans: all(_has(*key)(spans) for key in expected))

    assert len({span.trace_id for span in spans}) == 1, "every span of the request is in one trace"
    gateway_server = _one(spans, "gateway", "SERVER", GATEWAY_STREAM)
    gateway_client = _one(spans, "gateway", "CLIENT", TURN)
    dialogue_server = _one(spans, "dialogue", "SERVER", TURN)
    assert gateway_server.parent_span_id == ""  # the test's own client sends no traceparent
    assert gateway_client.parent_span_id == gateway_server.span_id
    assert dialogue_server.parent_span_id == gateway_client.span_id
    for name, process in ((SCREEN_INPUT, "safety"), (SCREEN_OUTPUT, "safety"), (LOOKUP, "cache"), (STORE, "cache")):
        client = _one(spans, "dialogue", "CLIENT", name)
        server = _one(spans, process, "SERVER", name)
        assert client.parent_span_id == dialogue_server.span_id, name
        assert server.parent_span_id == client.span_id, name
        assert server.attributes["rpc.system"] == "grpc"
    for span in spans:
        assert span.start_ns <= span.end_ns
    # Health checks (the cluster's readiness probes) are not traced.
    assert not [span for span in spans if "grpc.health" in span.name]

    model = _one(spans, "dialogue", "CLIENT", CHAT_SPAN)
    assert model.parent_span_id == dialogue_server.span_id
    assert model.status != "ERROR"
    attributes = model.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.request.temperature"] == pytest.approx(0.25)
    assert attributes["gen_ai.request.top_p"] == pytest.approx(0.5)
    assert attributes["gen_ai.request.max_tokens"] == 64
    assert attributes["gen_ai.usage.input_tokens"] == usage.input_tokens
    assert attributes["gen_ai.usage.output_tokens"] == usage.output_tokens
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert attributes["server.address"] == "127.0.0.1"
    assert "error.type" not in attributes
    # One span for the whole call: nothing per delta but the first chunk's event.
    assert [name for name, _ in model.events] == ["gen_ai.first_chunk"]
    assert not [span for span in spans if span.service == "dialogue" and span.name.startswith("chat ")][1:]

    # The model's HTTP request carried the chat span's context.
    traceparents = traced.sim("GET", "/sim/traceparents")["traceparents"]
    assert [_parent_of(header) for header in traceparents] == [(model.trace_id, model.span_id)]


async def test_a_failed_model_call_is_one_span_with_its_retries_as_events_and_an_error_type(
    traced: Cluster, receiver: OtlpTraceReceiver, traced_chat: chat_pb2_grpc.ChatServiceStub
):
    traced.sim_faults(500, 3)
    request = chat_pb2.ChatRequest(
        user_id="tracer", message="Will this fail?", options=chat_pb2.ChatOptions(model=MODEL)
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        _ = [event async for event in traced_chat.StreamChat(request)]
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE

    spans = receiver.wait_for(
        lambda spans: _has("dialogue", "CLIENT", CHAT_SPAN)(spans) and _has("gateway", "SERVER", GATEWAY_STREAM)(spans)
    )
    model = _one(spans, "dialogue", "CLIENT", CHAT_SPAN)
    assert model.status == "ERROR"
    assert model.attributes["error.type"] == "unavailable"
    assert "gen_ai.usage.output_tokens" not in model.attributes
    retries = [attributes for name, attributes in model.events if name == "gen_ai.retry"]
    assert [retry["attempt"] for retry in retries] == [1, 2]
    assert {retry["error.type"] for retry in retries} == {"unavailable"}
    # Each of the three attempts carried the same span's context to the model.
    traceparents = traced.sim("GET", "/sim/traceparents")["traceparents"]
    assert [_parent_of(header) for header in traceparents] == [(model.trace_id, model.span_id)] * 3

    gateway_server = _one(spans, "gateway", "SERVER", GATEWAY_STREAM)
    assert gateway_server.trace_id == model.trace_id
    assert gateway_server.status == "ERROR"
    assert gateway_server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
