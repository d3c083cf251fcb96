"""Logs: one JSON line per request in every process, tied together by request id and trace id, and never
the message, the reply, the user id or a key.

Traffic with a canary message and a canary API key (modelsim takes any key) runs through the real
processes, errors included; then every process's log is searched for the canaries, and each request's
lines are checked process by process against the trace the OTLP receiver got.
"""

import asyncio
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from support.bad_settings import bad_settings_of_others
from support.cli import chatmesh_cli
from support.cluster import Cluster, ServiceProcess
from support.otlp import OtlpTraceReceiver
from support.ports import free_port

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

CANARY_TEXT = f"canary-text-{uuid.uuid4().hex}"
CANARY_KEY = f"sk-canary-{uuid.uuid4().hex}"
CANARY_USER = f"canary-user-{uuid.uuid4().hex}"
SALT = "test-salt-for-user-ids"
BLOCKED_TERM = "forbidden-demo-term"  # in the keyword list that ships with safety

FIELDS = {
    "timestamp",
    "level",
    "service",
    "event",
    "method",
    "request_id",
    "trace_id",
    "span_id",
    "user_id",
    "model",
    "input_tokens",
    "output_tokens",
    "latency_ms",
    "grpc_code",
    "error",
}
STREAM_CHAT = "chatmesh.v1.ChatService/StreamChat"
CHAT = "chatmesh.v1.ChatService/Chat"
GET = "chatmesh.v1.ChatService/GetConversation"
TURN = "chatmesh.v1.DialogueService/RunTurn"
DIALOGUE_GET = "chatmesh.v1.DialogueService/GetConversation"
SCREEN_INPUT = "chatmesh.v1.SafetyService/ScreenInput"
SCREEN_OUTPUT = "chatmesh.v1.SafetyService/ScreenOutput"
LOOKUP = "chatmesh.v1.CacheService/Lookup"
STORE = "chatmesh.v1.CacheService/Store"


def hashed(user_id: str) -> str:
    return hmac.new(SALT.encode(), user_id.encode(), hashlib.sha256).hexdigest()[:16]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpTraceReceiver]:
    running = OtlpTraceReceiver().start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def logged_cluster(receiver: OtlpTraceReceiver) -> Iterator[Cluster]:
    env = {
        "OPENAI_API_KEY": CANARY_KEY,
        "CHATMESH_LOG_USER_ID_SALT": SALT,
        "CHATMESH_MODEL_MAX_ATTEMPTS": "2",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    with Cluster(env=env) as running:
        yield running


@pytest.fixture
async def logged_chat(logged_cluster: Cluster) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    logged_cluster.sim_reset()
    logged_cluster.sim_config(first_token_latency_seconds=0, token_delay_seconds=0, reply_tokens=12)
    async with grpc.aio.insecure_channel(logged_cluster.gateway_target) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)
    logged_cluster.sim_reset()


def request_lines(cluster: Cluster, process: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in cluster.processes[process].log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "request"]


def lines_of(cluster: Cluster, request_id: str) -> dict[str, list[dict[str, Any]]]:
    return {
        process: [line for line in request_lines(cluster, process) if line["request_id"] == request_id]
        for process in ("gateway", "dialogue", "safety", "cache")
    }


def wait_for_lines(cluster: Cluster, request_id: str, process: str, method: str, timeout: float = 10.0) -> None:
    """Some calls (the cache Store) run after the caller has its reply: wait, bounded, for their lines."""
    deadline = time.monotonic() + timeout
    while not [line for line in lines_of(cluster, request_id)[process] if line["method"] == method]:
        assert time.monotonic() < deadline, f"no {method} line for {request_id} in {process}"
        time.sleep(0.05)


def request(message: str = CANARY_TEXT, **options: Any) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(user_id=CANARY_USER, message=message, options=chat_pb2.ChatOptions(**options))


async def test_every_process_logs_one_line_per_request_tied_by_request_and_trace_id_and_no_canary(
    logged_cluster: Cluster, receiver: OtlpTraceReceiver, logged_chat: chat_pb2_grpc.ChatServiceStub
):
    cluster = logged_cluster
    ids = {name: f"logs-{name}-{uuid.uuid4().hex[:8]}" for name in ("ok", "chat", "invalid", "failed", "blocked")}
    ids |= {name: f"logs-{name}-{uuid.uuid4().hex[:8]}" for name in ("limited", "missing", "cancelled")}

    def md(name: str) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", ids[name]),)

    # A streamed reply, then a second turn of the same conversation as a whole reply.
    events = [event async for event in logged_chat.StreamChat(request(), metadata=md("ok"))]
    usage = events[-1].completed.usage
    conversation_id = events[0].started.conversation_id
    second = await logged_chat.Chat(
        chat_pb2.ChatRequest(user_id=CANARY_USER, conversation_id=conversation_id, message=CANARY_TEXT + " again"),
        metadata=md("chat"),
    )
    # Refused by the gateway; failed by the model (500 on both attempts); blocked by safety; rate limited.
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await logged_chat.Chat(request(temperature=9.0), metadata=md("invalid"))
    assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    cluster.sim_faults(500, 2)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await logged_chat.Chat(request(CANARY_TEXT + " fails"), metadata=md("failed"))
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
    blocked = await logged_chat.Chat(request(f"{CANARY_TEXT} {BLOCKED_TERM}"), metadata=md("blocked"))
    assert blocked.finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
    cluster.sim_faults(429, 2, retry_after=0)
    with pytest.raises(grpc.aio.AioRpcError) as limited:
        await logged_chat.Chat(request(CANARY_TEXT + " limited", temperature=0.9), metadata=md("limited"))
    assert limited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await logged_chat.GetConversation(
            chat_pb2.GetConversationRequest(user_id=CANARY_USER, conversation_id="no-such-conversation"),
            metadata=md("missing"),
        )
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    # A caller that goes away after the first delta.
    cluster.sim_config(token_delay_seconds=0.05, reply_tokens=40)
    call = logged_chat.StreamChat(request(CANARY_TEXT + " cancelled", temperature=0.9), metadata=md("cancelled"))
    async for event in call:
        if event.HasField("delta"):
            break
    call.cancel()
    await asyncio.sleep(0.5)

    # Lines that come after the reply (the cache's Store) or after a cancel, then every process's whole log.
    wait_for_lines(cluster, ids["ok"], "cache", STORE)
    wait_for_lines(cluster, ids["cancelled"], "dialogue", TURN)
    for name, process in cluster.processes.items():
        text = process.log()
        assert CANARY_TEXT not in text, f"{name}'s log holds the message text"
        assert CANARY_KEY not in text and CANARY_KEY[len("sk-canary-") :] not in text, f"{name}'s log holds the key"
        assert CANARY_USER not in text, f"{name}'s log holds the raw user id"
        assert "Traceback" not in text, f"{name}'s log holds a stack trace"

    # Which calls each request made, process by process, and how each ended.
    expected = {
        "ok": {
            "gateway": {STREAM_CHAT: "OK"},
            "dialogue": {TURN: "OK"},
            "safety": {SCREEN_INPUT: "OK", SCREEN_OUTPUT: "OK"},
            "cache": {LOOKUP: "OK", STORE: "OK"},
        },
        # A follow-up: not looked up nor stored (CHATMESH_CACHE_FOLLOW_UPS is off).
        "chat": {
            "gateway": {CHAT: "OK"},
            "dialogue": {TURN: "OK"},
            "safety": {SCREEN_INPUT: "OK", SCREEN_OUTPUT: "OK"},
            "cache": {},
        },
        "invalid": {"gateway": {CHAT: "INVALID_ARGUMENT"}, "dialogue": {}, "safety": {}, "cache": {}},
        "failed": {
            "gateway": {CHAT: "UNAVAILABLE"},
            "dialogue": {TURN: "UNAVAILABLE"},
            "safety": {SCREEN_INPUT: "OK", SCREEN_OUTPUT: None},  # None: however the aborted screen ended
            "cache": {LOOKUP: "OK"},
        },
        "blocked": {
            "gateway": {CHAT: "OK"},
            "dialogue": {TURN: "OK"},
            "safety": {SCREEN_INPUT: "OK"},
            "cache": {LOOKUP: "OK"},
        },
        "limited": {
            "gateway": {CHAT: "RESOURCE_EXHAUSTED"},
            "dialogue": {TURN: "RESOURCE_EXHAUSTED"},
            "safety": {SCREEN_INPUT: "OK", SCREEN_OUTPUT: None},
            "cache": {},  # a temperature above the cache's bound: not looked up
        },
        "missing": {"gateway": {GET: "NOT_FOUND"}, "dialogue": {DIALOGUE_GET: "NOT_FOUND"}, "safety": {}, "cache": {}},
        "cancelled": {
            "gateway": {STREAM_CHAT: "CANCELLED"},
            "dialogue": {TURN: "CANCELLED"},
            "safety": {SCREEN_INPUT: "OK", SCREEN_OUTPUT: None},
            "cache": {},
        },
    }
    for name, processes in expected.items():
        found = lines_of(cluster, ids[name])
        for process, methods in processes.items():
            lines = found[process]
            assert sorted(line["method"] for line in lines) == sorted(methods), (name, process, lines)
            for line in lines:
                assert set(line) >= FIELDS, (name, process, FIELDS - set(line))
                assert line["service"] == process
                if methods[line["method"]] is not None:
                    assert line["grpc_code"] == methods[line["method"]], (name, process, line)
                assert line["error"] is None if line["grpc_code"] == "OK" else isinstance(line["error"], str)
                assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
        # The gateway's request id and trace id are on every process's lines of the request.
        all_lines = [line for lines in found.values() for line in lines]
        assert len({line["trace_id"] for line in all_lines}) == 1, name
        assert len(all_lines[0]["trace_id"]) == 32 and len(all_lines[0]["span_id"]) == 16

    ok = lines_of(cluster, ids["ok"])
    for process in ("gateway", "dialogue"):
        (line,) = ok[process]
        assert line["user_id"] == hashed(CANARY_USER)
        assert line["model"] == "gpt-4o-mini"
        assert (line["input_tokens"], line["output_tokens"]) == (usage.input_tokens, usage.output_tokens)
    chat_line = lines_of(cluster, ids["chat"])["gateway"][0]
    assert (chat_line["input_tokens"], chat_line["output_tokens"]) == (
        second.usage.input_tokens,
        second.usage.output_tokens,
    )
    for name, process, error in (
        ("failed", "dialogue", "model_unavailable"),
        ("limited", "dialogue", "model_rate_limited"),
        ("invalid", "gateway", "invalid_argument"),
        ("missing", "dialogue", "not_found"),
        ("cancelled", "gateway", "cancelled"),
    ):
        (line,) = [line for line in lines_of(cluster, ids[name])[process] if line["method"] in (TURN, CHAT, GET)] or [
            line for line in lines_of(cluster, ids[name])[process]
        ]
        assert line["error"] == error, (name, process, line)
    assert ok["cache"][0]["user_id"] is None  # safety and cache are not told who asked

    # From a log line to its trace: each line's trace and span are the server span of that call.
    spans = receiver.wait_for(lambda spans: {line["span_id"] for line in ok["cache"]} <= {s.span_id for s in spans})
    by_id = {span.span_id: span for span in spans}
    for process, lines in ok.items():
        for line in lines:
            span = by_id[line["span_id"]]
            assert (span.trace_id, span.service, span.kind) == (line["trace_id"], process, "SERVER")
            assert span.name == "/" + line["method"]


async def test_without_tracing_lines_have_no_trace_id_and_still_one_request_id(
    cluster: Cluster, chat: chat_pb2_grpc.ChatServiceStub, sim: Cluster
):
    request_id = f"logs-untraced-{uuid.uuid4().hex[:8]}"
    reply = await chat.Chat(
        chat_pb2.ChatRequest(user_id="someone", message="Hello there"), metadata=(("x-request-id", request_id),)
    )
    assert reply.finish_reason == chat_pb2.FINISH_REASON_STOP
    # Every process writes its line as its call ends, some after the caller has its reply: wait, bounded.
    deadline = time.monotonic() + 10
    while True:
        found = lines_of(cluster, request_id)
        counts = [len(found[process]) for process in ("gateway", "dialogue", "safety", "cache")]
        if counts == [1, 1, 2, 2] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert counts == [1, 1, 2, 2]
    for lines in found.values():
        for line in lines:
            assert set(line) >= FIELDS
            assert (line["trace_id"], line["span_id"]) == ("", "")
    default_salt_hash = hmac.new(b"chatmesh-default-log-salt", b"someone", hashlib.sha256).hexdigest()[:16]
    assert found["gateway"][0]["user_id"] == found["dialogue"][0]["user_id"] == default_salt_hash


@pytest.mark.parametrize(
    ("process", "env", "names"),
    [
        ("dialogue", {"CHATMESH_TOOLS_FILE": "{path}"}, "tools[0] (bad name).name"),
        ("safety", {"CHATMESH_PII_POLICY": '{"passport": "model"}'}, "pii_policy.passport"),
        ("gateway", {"CHATMESH_AUTH_CACHE_SECONDS": "9"}, "auth_cache_seconds"),
        ("cache", {"CHATMESH_CACHE_TTL_SECONDS": str(30 * 24 * 3600)}, "CHATMESH_CACHE_TTL_SECONDS"),
        ("modelsim", {"CHATMESH_MODELSIM_HANG_RATE": "2"}, "modelsim_hang_rate"),
    ],
)
def test_a_process_with_a_bad_setting_or_file_refuses_to_start_in_one_line(
    tmp_path, process: str, env: dict[str, str], names: str
):
    tools_file = tmp_path / "tools.yaml"
    tools_file.write_text("tools:\n  - name: bad name\n", encoding="utf-8")
    ports = {f"CHATMESH_{process.upper()}_PORT": "0", f"CHATMESH_{process.upper()}_METRICS_PORT": "0"}

    result = chatmesh_cli(
        process, env={**ports, **{name: value.replace("{path}", str(tools_file)) for name, value in env.items()}}
    )

    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    record = json.loads(line)
    assert (record["event"], record["level"], record["service"]) == ("configuration_invalid", "error", process)
    assert names in record["detail"] and "Traceback" not in result.stderr


@pytest.mark.parametrize("process", ["gateway", "dialogue", "safety", "cache", "modelsim"])
def test_a_process_serves_despite_bad_settings_of_the_other_processes(tmp_path, process: str):
    port = free_port()
    env = {
        **os.environ,
        **bad_settings_of_others(process),
        f"CHATMESH_{process.upper()}_PORT": str(port),
        f"CHATMESH_{process.upper()}_METRICS_PORT": "0",
    }
    service = ServiceProcess(process, port, env, tmp_path)
    try:
        service.start()  # until it serves (its health check, or modelsim's /sim/stats)
    finally:
        status = service.stop()
    assert status == 0, service.log()
    assert "configuration_invalid" not in service.log()
