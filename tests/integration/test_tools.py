"""Function calling over real processes (gateway → dialogue → safety → modelsim, conversations in Redis): tools the
caller runs, with their results in the next request; server-side tools that dialogue runs itself against a real
local HTTP endpoint; the step bound; screening of tool texts; history replayed into later windows.

modelsim calls a tool when the user's message says `call <name> <JSON arguments>`, echoes the results it gets
(`tool results: <call id>=<content>; …`), and with `[keep-calling]` calls again instead.
"""

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from support.cluster import Cluster
from support.redis_server import RedisServer

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

KEYWORDS = "fruit\tforbidden fruit\n"
MAX_STEPS = 3
SLOW_TOOL_SECONDS = 0.3
WEATHER = chat_pb2.Tool(
    name="get_weather",
    description="The weather in a city now.",
    parameters=json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
)
CALL_TIMEOUT = 20


class ToolEndpoint:
    """A local HTTP API for the server-side tools: /weather answers with the city it was asked about (and a
    listed term for "Eden"), /slow answers after a while, /moved redirects to a host not on the allow-list."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict]] = []
        self.slow_seconds = 0.0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.received.append((self.path, body))
                if self.path == "/moved":
                    self.send_response(302)
                    self.send_header("Location", f"http://localhost:{self.server.server_port}/weather")
                    self.end_headers()
                    return
                if self.path == "/slow":
                    time.sleep(endpoint.slow_seconds)
                forecast = "forbidden fruit" if body.get("city") == "Eden" else "12 °C and clear"
                payload = json.dumps({"city": body.get("city"), "forecast": forecast}, ensure_ascii=False).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "ToolEndpoint":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[ToolEndpoint]:
    with ToolEndpoint() as running:
        yield running


@pytest.fixture(scope="module")
def cluster(
    module_redis: RedisServer, endpoint: ToolEndpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("tools")
    keywords = directory / "keywords.txt"
    keywords.write_text(KEYWORDS, encoding="utf-8")
    tools_file = directory / "tools.yaml"
    base = f"http://127.0.0.1:{endpoint.port}"
    tools_file.write_text(
        json.dumps(
            {
                "tools": [
                    {
                        "name": "weather",
                        "description": "The weather in a city now.",
                        "url": f"{base}/weather",
                        "allowed_hosts": ["127.0.0.1"],
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                            "required": ["city"],
                        },
                    },
                    {
                        "name": "slow",
                        "description": "Answers after a while.",
                        "url": f"{base}/slow",
                        "allowed_hosts": ["127.0.0.1"],
                        "timeout_seconds": 0.5,
                    },
                    {
                        "name": "moved",
                        "description": "Redirects elsewhere.",
                        "url": f"{base}/moved",
                        "allowed_hosts": ["127.0.0.1"],
                    },
                ]
            }
        ),
        encoding="utf-8",
    )
    with Cluster(
        redis_url=module_redis.url,
        env={
            "CHATMESH_SAFETY_KEYWORDS": str(keywords),
            "CHATMESH_TOOLS_FILE": str(tools_file),
            "CHATMESH_TOOL_MAX_STEPS": str(MAX_STEPS),
        },
    ) as running:
        yield running


@pytest.fixture
def tools_endpoint(endpoint: ToolEndpoint) -> Iterator[ToolEndpoint]:
    endpoint.received.clear()
    endpoint.slow_seconds = 0.0
    yield endpoint


def request(
    message: str = "", conversation_id: str = "", results: list[chat_pb2.ToolResult] | None = None, **options
) -> chat_pb2.ChatRequest:
    options.setdefault("tools", [WEATHER])
    return chat_pb2.ChatRequest(
        user_id="alice",
        conversation_id=conversation_id,
        message=message,
        tool_results=results or [],
        options=chat_pb2.ChatOptions(**options),
    )


def weather_call(city: str) -> str:
    return "call get_weather " + json.dumps({"city": city})


async def events_of(
    chat: chat_pb2_grpc.ChatServiceStub, chat_request: chat_pb2.ChatRequest
) -> list[chat_pb2.ChatEvent]:
    return [event async for event in chat.StreamChat(chat_request, timeout=CALL_TIMEOUT)]


def kinds(events: list[chat_pb2.ChatEvent]) -> list[str]:
    """The events' kinds, a run of deltas as one."""
    names: list[str] = []
    for event in events:
        kind = event.WhichOneof("event")
        if not (kind == "delta" and names and names[-1] == "delta"):
            names.append(kind)
    return names


def text_of(events: list[chat_pb2.ChatEvent]) -> str:
    return "".join(event.delta.text for event in events if event.HasField("delta"))


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    bad_request = error_details_pb2.BadRequest()
    assert rpc_status.from_call(error).details[0].Unpack(bad_request)
    return [violation.field for violation in bad_request.field_violations]


async def history(chat: chat_pb2_grpc.ChatServiceStub, conversation_id: str) -> list[chat_pb2.Message]:
    response = await chat.GetConversation(
        chat_pb2.GetConversationRequest(conversation_id=conversation_id, user_id="alice"), timeout=CALL_TIMEOUT
    )
    return list(response.conversation.messages)


async def pending_calls(chat: chat_pb2_grpc.ChatServiceStub, message: str, **options) -> chat_pb2.ChatResponse:
    response = await chat.Chat(request(message, **options), timeout=CALL_TIMEOUT)
    assert response.finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
    return response


# The caller's tools.


async def test_a_tool_round_trip(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    first = await events_of(chat, request(f"what is it like in Paris? {weather_call('Paris')}"))

    assert kinds(first) == ["started", "tool_calls", "completed"]
    (call,) = first[1].tool_calls.calls
    assert (call.name, json.loads(call.arguments), call.server_side) == ("get_weather", {"city": "Paris"}, False)
    assert call.id
    assert first[-1].completed.finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
    assert first[-1].completed.usage.output_tokens > 0
    conversation_id = first[0].started.conversation_id

    second = await events_of(
        chat, request(conversation_id=conversation_id, results=[chat_pb2.ToolResult(call_id=call.id, content="12 °C")])
    )

    assert kinds(second) == ["started", "delta", "completed"]
    assert text_of(second) == f"tool results: {call.id}=12 °C"
    assert second[-1].completed.finish_reason == chat_pb2.FINISH_REASON_STOP
    # The model got the call and its result in the form the chat API expects.
    sent = sim.sim_requests(limit=1)[-1]["messages"]
    assert [message["role"] for message in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"] == [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}
    ]
    assert (sent[2]["tool_call_id"], sent[2]["content"]) == (call.id, "12 °C")
    stored = await history(chat, conversation_id)
    assert [message.role for message in stored] == [
        chat_pb2.ROLE_USER,
        chat_pb2.ROLE_ASSISTANT,
        chat_pb2.ROLE_TOOL,
        chat_pb2.ROLE_ASSISTANT,
    ]
    assert list(stored[1].tool_calls) == [call]
    assert (stored[2].tool_call_id, stored[2].content, stored[2].tool_error) == (call.id, "12 °C", False)
    assert stored[3].content == text_of(second)


async def test_a_finished_tool_turn_is_replayed_into_the_next_window(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    response = await pending_calls(chat, weather_call("Paris"))
    (call,) = response.tool_calls
    answered = await chat.Chat(
        request(
            conversation_id=response.conversation_id, results=[chat_pb2.ToolResult(call_id=call.id, content="12 °C")]
        ),
        timeout=CALL_TIMEOUT,
    )

    await chat.Chat(request("and tomorrow?", conversation_id=response.conversation_id), timeout=CALL_TIMEOUT)

    sent = sim.sim_requests(limit=1)[-1]["messages"]
    assert [message["role"] for message in sent] == ["user", "assistant", "tool", "assistant", "user"]
    assert sent[1]["tool_calls"] == [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}
    ]
    assert (sent[2]["tool_call_id"], sent[2]["content"]) == (call.id, "12 °C")
    assert (sent[3]["content"], sent[4]["content"]) == (answered.text, "and tomorrow?")


async def test_unary_chat_returns_the_calls_and_takes_results_with_a_new_message(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    response = await pending_calls(chat, weather_call("Oslo"))
    (call,) = response.tool_calls

    answer = await chat.Chat(
        request(
            "and is that warm?",
            conversation_id=response.conversation_id,
            results=[chat_pb2.ToolResult(call_id=call.id, content="city not found", is_error=True)],
        ),
        timeout=CALL_TIMEOUT,
    )

    assert answer.finish_reason == chat_pb2.FINISH_REASON_STOP and answer.text
    sent = sim.sim_requests(limit=1)[-1]["messages"]
    assert [message["role"] for message in sent] == ["user", "assistant", "tool", "user"]
    assert sent[2]["content"] == "Error: city not found"
    stored = await history(chat, response.conversation_id)
    assert stored[2].tool_error and stored[3].content == "and is that warm?"


async def test_parallel_calls_are_answered_in_any_order(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    response = await pending_calls(chat, f"{weather_call('Paris')} and {weather_call('Oslo')}")
    paris, oslo = response.tool_calls
    assert [json.loads(call.arguments)["city"] for call in (paris, oslo)] == ["Paris", "Oslo"]

    answer = await chat.Chat(
        request(
            conversation_id=response.conversation_id,
            results=[
                chat_pb2.ToolResult(call_id=oslo.id, content="-3 °C"),
                chat_pb2.ToolResult(call_id=paris.id, content="12 °C"),
            ],
        ),
        timeout=CALL_TIMEOUT,
    )

    # The model sees the results in the order of its calls.
    assert answer.text == f"tool results: {paris.id}=12 °C; {oslo.id}=-3 °C"


async def test_parallel_calls_can_be_turned_off(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    response = await pending_calls(
        chat, f"{weather_call('Paris')} and {weather_call('Oslo')}", parallel_tool_calls=False
    )

    assert len(response.tool_calls) == 1
    assert sim.sim_requests(limit=1)[-1]["parallel_tool_calls"] is False


async def test_results_must_answer_exactly_the_pending_calls(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    response = await pending_calls(chat, f"{weather_call('Paris')} and {weather_call('Oslo')}")
    paris, oslo = response.tool_calls
    conversation_id = response.conversation_id

    def results(*call_ids: str) -> list[chat_pb2.ToolResult]:
        return [chat_pb2.ToolResult(call_id=call_id, content="12 °C") for call_id in call_ids]

    refusals = {}
    for name, attempt in {
        "missing": request(conversation_id=conversation_id, results=results(paris.id)),
        "unknown": request(conversation_id=conversation_id, results=results(paris.id, oslo.id, "call_nope")),
        "none": request("what now?", conversation_id=conversation_id),
        "duplicated": request(conversation_id=conversation_id, results=results(paris.id, oslo.id, paris.id)),
    }.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await chat.Chat(attempt, timeout=CALL_TIMEOUT)
        refusals[name] = refused.value

    for name in ("missing", "unknown", "none", "duplicated"):
        assert refusals[name].code() == grpc.StatusCode.INVALID_ARGUMENT, name
    assert oslo.id in refusals["missing"].details() and paris.id not in refusals["missing"].details().split(":")[-1]
    assert "call_nope" in refusals["unknown"].details()
    assert oslo.id in refusals["none"].details() and paris.id in refusals["none"].details()
    assert violations(refusals["duplicated"]) == ["tool_results[2].call_id"]
    # None of them touched the conversation: the right results are still taken.
    answer = await chat.Chat(request(conversation_id=conversation_id, results=results(oslo.id, paris.id)))
    assert answer.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert len(await history(chat, conversation_id)) == 5


async def test_results_without_pending_calls_are_a_failed_precondition(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    result = [chat_pb2.ToolResult(call_id="call_1", content="12 °C")]
    answered = await chat.Chat(request("hello there"), timeout=CALL_TIMEOUT)

    for attempt in (request(results=result), request(conversation_id=answered.conversation_id, results=result)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await chat.Chat(attempt, timeout=CALL_TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no pending tool calls" in refused.value.details()


async def test_an_unknown_server_side_tool_is_an_invalid_argument(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await chat.Chat(request("hi", server_tools=["weather", "stock_price"]), timeout=CALL_TIMEOUT)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(refused.value) == ["options.server_tools[1]"]
    assert "current_time" in refused.value.details()


async def test_turns_that_offer_tools_are_never_answered_from_the_cache(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    message = f"a question asked twice {uuid.uuid4().hex}"
    for _ in range(2):
        response = await chat.Chat(request(message), timeout=CALL_TIMEOUT)
        assert not response.cached

    assert sim.sim_stats()["requests"] == 2


async def test_a_retry_of_a_tool_call_turn_replays_its_calls(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    attempt = request(weather_call("Lima"))
    attempt.idempotency_key = f"tool-turn-{uuid.uuid4().hex}"
    first = await events_of(chat, attempt)
    again = await events_of(chat, attempt)

    assert kinds(again) == ["started", "tool_calls", "completed"]
    assert again[1].tool_calls == first[1].tool_calls and again[-1].completed.replayed
    assert sim.sim_stats()["requests"] == 1


# Tools chatmesh runs itself.


async def test_a_server_side_tool_runs_against_its_endpoint(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, tools_endpoint: ToolEndpoint
):
    events = await events_of(chat, request('call weather {"city": "Paris"}', tools=[], server_tools=["weather"]))

    assert kinds(events) == ["started", "tool_calls", "tool_results", "delta", "completed"]
    (call,) = events[1].tool_calls.calls
    assert (call.name, call.server_side) == ("weather", True)
    (result,) = events[2].tool_results.results
    assert result.call_id == call.id and not result.is_error
    assert json.loads(result.content) == {"city": "Paris", "forecast": "12 °C and clear"}
    assert tools_endpoint.received == [("/weather", {"city": "Paris"})]
    assert text_of(events) == f"tool results: {call.id}={result.content}"
    assert events[-1].completed.finish_reason == chat_pb2.FINISH_REASON_STOP
    # Two model calls: the second with the call and its result.
    assert sim.sim_stats()["requests"] == 2
    assert [message["role"] for message in sim.sim_requests(limit=1)[-1]["messages"]] == ["user", "assistant", "tool"]
    stored = await history(chat, events[0].started.conversation_id)
    assert [message.role for message in stored] == [
        chat_pb2.ROLE_USER,
        chat_pb2.ROLE_ASSISTANT,
        chat_pb2.ROLE_TOOL,
        chat_pb2.ROLE_ASSISTANT,
    ]
    assert stored[1].tool_calls[0].server_side


@pytest.mark.parametrize(
    ("message", "error", "endpoint_calls"),
    [
        ('call weather {"city": 5}', "5 is not of type 'string'", []),
        ("call weather {not json", "JSON", []),
        ("call slow {}", "did not answer within", [("/slow", {})]),
        ("call moved {}", "localhost", [("/moved", {})]),
    ],
)
async def test_a_failing_server_side_tool_is_an_error_result_the_model_sees(
    sim: Cluster,
    chat: chat_pb2_grpc.ChatServiceStub,
    tools_endpoint: ToolEndpoint,
    message: str,
    error: str,
    endpoint_calls: list,
):
    tools_endpoint.slow_seconds = 2.0
    events = await events_of(chat, request(message, tools=[], server_tools=["weather", "slow", "moved"]))

    (result,) = events[kinds(events).index("tool_results")].tool_results.results
    assert result.is_error and error in result.content
    assert tools_endpoint.received == endpoint_calls
    assert events[-1].completed.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert sim.sim_requests(limit=1)[-1]["messages"][-1]["content"].startswith("Error: ")


async def test_the_built_in_current_time(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    events = await events_of(
        chat, request('call current_time {"timezone": "Asia/Shanghai"}', tools=[], server_tools=["current_time"])
    )

    (result,) = events[2].tool_results.results
    now = json.loads(result.content)
    assert now["timezone"] == "Asia/Shanghai" and now["time"].endswith("+08:00")


async def test_caller_and_server_side_calls_in_one_answer(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, tools_endpoint: ToolEndpoint
):
    """The server-side call is run and stored; the caller's stays pending, and its result completes the turn."""
    response = await pending_calls(
        chat, f'call weather {{"city": "Rome"}} and {weather_call("Rome")}', server_tools=["weather"]
    )
    server, caller = response.tool_calls
    assert (server.server_side, caller.server_side) == (True, False)
    assert [result.call_id for result in response.tool_results] == [server.id]

    answer = await chat.Chat(
        request(
            conversation_id=response.conversation_id, results=[chat_pb2.ToolResult(call_id=caller.id, content="8")]
        ),
        timeout=CALL_TIMEOUT,
    )

    assert answer.text.startswith(f"tool results: {server.id}=") and answer.text.endswith(f"{caller.id}=8")


async def test_the_step_bound_ends_the_turn_with_an_answer(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    events = await events_of(
        chat, request("call current_time {} [keep-calling]", tools=[], server_tools=["current_time"])
    )

    assert kinds(events) == ["started", *(["tool_calls", "tool_results"] * (MAX_STEPS - 1)), "delta", "completed"]
    sent = sim.sim_requests(limit=MAX_STEPS)
    assert [request.get("tool_choice") for request in sent] == [None] * (MAX_STEPS - 1) + ["none"]
    assert events[-1].completed.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert sim.sim_stats()["requests"] == MAX_STEPS


async def test_a_tool_turn_cancelled_mid_way_leaves_the_conversation_as_it_was(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, tools_endpoint: ToolEndpoint
):
    first = await chat.Chat(request("hello", tools=[]), timeout=CALL_TIMEOUT)
    tools_endpoint.slow_seconds = 0.4
    call = chat.StreamChat(
        request("call slow {}", conversation_id=first.conversation_id, tools=[], server_tools=["slow"]),
        timeout=CALL_TIMEOUT,
    )
    async for event in call:
        if event.HasField("tool_calls"):
            call.cancel()
            break

    # The cancelled turn releases the conversation (at once, in the background): the next one runs, on the
    # history as it was.
    second = await chat_when_free(chat, request("again", conversation_id=first.conversation_id, tools=[]))
    assert second.finish_reason == chat_pb2.FINISH_REASON_STOP
    stored = await history(chat, first.conversation_id)
    assert [message.content for message in stored if message.role == chat_pb2.ROLE_USER] == ["hello", "again"]
    assert not any(message.role == chat_pb2.ROLE_TOOL for message in stored)


async def chat_when_free(
    chat: chat_pb2_grpc.ChatServiceStub, chat_request: chat_pb2.ChatRequest
) -> chat_pb2.ChatResponse:
    """The reply, retried while another turn still holds the conversation (ABORTED), for at most 5 s."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return await chat.Chat(chat_request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


# Screening.


async def test_a_listed_term_in_a_calls_arguments_is_refused_before_the_caller_sees_the_call(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    # The message holds the term only as a JSON escape, so the input screen passes it; the arguments hold it.
    events = await events_of(chat, request('call get_weather {"city": "forbidden \\u0066ruit"}'))

    assert kinds(events) == ["started", "completed"]
    completed = events[-1].completed
    assert completed.finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
    assert completed.content_filter.stage == chat_pb2.ContentFilter.STAGE_TOOL
    assert list(completed.content_filter.categories) == ["fruit"]
    stored = await history(chat, events[0].started.conversation_id)
    assert stored[-1].refused and not stored[-1].tool_calls


async def test_a_listed_term_in_a_server_side_result_is_refused_before_the_model_sees_it(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, tools_endpoint: ToolEndpoint
):
    events = await events_of(chat, request('call weather {"city": "Eden"}', tools=[], server_tools=["weather"]))

    assert kinds(events) == ["started", "tool_calls", "completed"]
    assert events[-1].completed.content_filter.stage == chat_pb2.ContentFilter.STAGE_TOOL
    assert sim.sim_stats()["requests"] == 1


async def test_a_listed_term_in_a_callers_result_is_refused_and_still_answers_the_call(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    response = await pending_calls(chat, weather_call("Paris"))
    (call,) = response.tool_calls

    refused = await chat.Chat(
        request(
            conversation_id=response.conversation_id,
            results=[chat_pb2.ToolResult(call_id=call.id, content="the forbidden fruit is ripe")],
        ),
        timeout=CALL_TIMEOUT,
    )

    assert refused.finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
    assert refused.content_filter.stage == chat_pb2.ContentFilter.STAGE_TOOL
    assert sim.sim_stats()["requests"] == 1
    # No call is pending any more: the conversation goes on, and the model never sees the refused text.
    answer = await chat.Chat(request("what now?", conversation_id=response.conversation_id), timeout=CALL_TIMEOUT)
    assert answer.finish_reason == chat_pb2.FINISH_REASON_STOP
    sent = sim.sim_requests(limit=1)[-1]["messages"]
    assert [message["role"] for message in sent] == ["user", "assistant", "tool", "user"]
    assert "forbidden" not in json.dumps(sent)
