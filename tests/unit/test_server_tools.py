"""Server-side tools (chatmesh.dialogue.server_tools): the tools file checked at start, and calls run against a real
HTTP endpoint on loopback, every failure an error result that tells the model what went wrong."""

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from prometheus_client import REGISTRY
from support.ports import free_port

from chatmesh.dialogue.server_tools import (
    CURRENT_TIME,
    KNOWLEDGE_SEARCH,
    NO_KNOWLEDGE_BASES,
    ServerTool,
    ServerTools,
    ToolOutcome,
    ToolsFileError,
    _redirect_problem,
    parse_tools,
)
from chatmesh.runtime.settings import DialogueSettings
from chatmesh.v1 import chat_pb2

SETTINGS = DialogueSettings(tool_max_result_chars=100, tool_timeout_seconds=5)
ENV = {"ORDERS_API_AUTHORIZATION": "Bearer s3cret"}
ORDER_PARAMETERS = {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}
# The timeout of the tools that are meant to time out: short, so that the tests stay fast.
SHORT_TIMEOUT = 0.2


@dataclass
class Received:
    path: str
    method: str
    headers: dict[str, str]
    body: bytes
    started: float
    ended: float | None = None


@dataclass
class ToolEndpoint:
    """An HTTP server on loopback that plays the operator's tool endpoints, and records every request."""

    port: int
    requests: list[Received] = field(default_factory=list)
    # Set when the test ends, so that a handler still sleeping lets the server stop at once.
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [request.path for request in self.requests]

    async def record(self, request: web.Request) -> Received:
        received = Received(
            request.path, request.method, dict(request.headers), await request.read(), asyncio.get_running_loop().time()
        )
        self.requests.append(received)
        return received

    async def echo(self, request: web.Request) -> web.Response:
        received = await self.record(request)
        return web.json_response({"method": request.method, "arguments": json.loads(received.body or b"null")})

    async def status(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.Response(status=int(request.match_info["code"]), text=request.query.get("body", ""))

    async def slow(self, request: web.Request) -> web.Response:
        received = await self.record(request)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), float(request.query["seconds"]))
        received.ended = asyncio.get_running_loop().time()
        return web.Response(text="slept")

    async def redirect(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.Response(status=int(request.query.get("status", "307")), headers={"Location": request.query["to"]})

    async def loop(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.Response(status=307, headers={"Location": "/loop"})

    async def text(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.Response(text=request.query.get("char", "x") * int(request.query["n"]))

    async def endless(self, request: web.Request) -> web.StreamResponse:
        """A body far too long to be read in a call's timeout (6.4 GB), written until the client goes away."""
        await self.record(request)
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            for _ in range(100_000):
                await response.write(chunk)
        except ConnectionError:
            pass
        return response


@pytest.fixture
async def endpoint() -> AsyncIterator[ToolEndpoint]:
    server = ToolEndpoint(free_port())
    app = web.Application()
    app.router.add_route("*", "/echo", server.echo)
    app.router.add_post("/status/{code}", server.status)
    app.router.add_post("/slow", server.slow)
    app.router.add_route("*", "/redirect", server.redirect)
    app.router.add_post("/loop", server.loop)
    app.router.add_post("/text", server.text)
    app.router.add_post("/endless", server.endless)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", server.port).start()
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()


def declaration(name: str, url: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "description": f"The {name} tool.", "url": url, "allowed_hosts": ["127.0.0.1"], **fields}


def http_tool(name: str, url: str, **fields: Any) -> ServerTool:
    (tool,) = parse_tools({"tools": [declaration(name, url, **fields)]}, SETTINGS, ENV)
    return tool


@pytest.fixture
async def make_tools() -> AsyncIterator[Callable[..., ServerTools]]:
    """ServerTools with these operator's tools beside the built-in ones; each closed when the test ends."""
    made: list[ServerTools] = []

    def make(*tools: ServerTool) -> ServerTools:
        made.append(ServerTools(SETTINGS, tools))
        return made[-1]

    yield make
    for tools in made:
        await tools.close()


def deadline(seconds: float = 30) -> float:
    return asyncio.get_running_loop().time() + seconds


def error(content_part: str) -> Callable[[ToolOutcome], bool]:
    return lambda outcome: outcome.is_error and content_part in outcome.content


# A successful call.


async def test_a_call_posts_its_arguments_as_json_with_the_declared_headers_and_the_body_is_the_result(
    endpoint: ToolEndpoint, make_tools: Callable[..., ServerTools]
) -> None:
    tools = make_tools(
        http_tool(
            "order_status",
            endpoint.url("/echo"),
            parameters=ORDER_PARAMETERS,
            headers_from_env={"Authorization": "ORDERS_API_AUTHORIZATION"},
        )
    )

    outcome = await tools.run("call_1", "order_status", '{"order_id": "A-17"}', deadline())

    assert outcome == ToolOutcome(json.dumps({"method": "POST", "arguments": {"order_id": "A-17"}}), False)
    (received,) = endpoint.requests
    assert received.headers["Authorization"] == "Bearer s3cret"
    assert received.headers["Content-Type"] == "application/json"
    assert json.loads(received.body) == {"order_id": "A-17"}


async def test_the_result_is_utf8_text_limited_in_characters_not_bytes(
    endpoint: ToolEndpoint, make_tools: Callable[..., ServerTools]
) -> None:
    tools = make_tools(http_tool("accents", endpoint.url("/text?n=100&char=é")))

    outcome = await tools.run("call_1", "accents", "{}", deadline())

    assert outcome == ToolOutcome("é" * 100, False)


# Arguments refused before the tool runs.


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ('{"order_id": 5}', "arguments.order_id: 5 is not of type 'string'"),
        ("{}", "arguments: 'order_id' is a required property"),
        ("", "arguments: 'order_id' is a required property"),
        ("{not json", "the arguments are not valid JSON"),
        ('["A-17"]', "the arguments must be a JSON object"),
    ],
    ids=["wrong-type", "missing", "empty", "not-json", "not-an-object"],
)
async def test_arguments_that_are_not_a_json_object_of_the_schema_are_an_error_and_the_endpoint_is_not_called(
    endpoint: ToolEndpoint, make_tools: Callable[..., ServerTools], arguments: str, message: str
) -> None:
    tools = make_tools(http_tool("order_status", endpoint.url("/echo"), parameters=ORDER_PARAMETERS))

    outcome = await tools.run("call_1", "order_status", arguments, deadline())

    assert outcome.is_error and message in outcome.content, outcome
    assert endpoint.requests == []


# Failures of the endpoint.


async def test_a_status_other_than_2xx_is_an_error_quoting_the_start_of_the_body(
    endpoint: ToolEndpoint, make_tools: Callable[..., ServerTools]
) -> None:
    tools = make_tools(
        http_tool("busy", endpoint.url(f"/status/503?body={'b' * 300}")),
        http_tool("silent", endpoint.url("/status/404")),
    )

    assert await tools.run("call_1", "busy", "{}", deadline()) == ToolOutcome("HTTP 503: " + "b" * 200, True)
    assert await tools.run("call_2", "silent", "{}", deadline()) == ToolOutcome("HTTP 404", True)


async def test_an_endpoint_slower_than_the_tools_timeout_is_an_error_saying_so(
    endpoint: ToolEndpoint, make_tools: Callable[..., ServerTools]
) -> None:
    tools = make_tools(http_tool("slow", endpoint.url("/slow?seconds=5"), timeout_seconds=SHORT_TIMEOUT))
    started = time.perf_counter()

    outcome = await tools.run("call_1", "slow", "{}", deadline())

    assert outcome == ToolOutcome("the tool did not answer within 0.2 s", True)
    assert time.perf_counter() - started < 2


async def test_the_turns_deadline_cuts_a_call_short_and_a_passed_one_runs_nothing(
    endpoint: ToolEndpoint, make_tools: Callable[..., ServerTools]
) -> None:
    tools = make_tools(http_tool("slow", endpoint.url("/slow?seconds=5")))

    outcome = await tools.run("call_1", "slow", "{}", deadline(SHORT_TIMEOUT))
    assert outcome.is_error and outcome.content.startswith("the tool did not answer within 0.")

    outcome = await tools.run("call_2", "slow", "{}", deadline(-1))
    assert outcome == ToolOutcome("the turn's deadline passed before the tool could run", True)
    assert len(endpoint.requests) == 1


async def test_an_endpoint_that_refuses_connections_is_an_error(make_tools: Callable[..., ServerTools]) -> None:
    port = free_port()
    tools = make_tools(http_tool("down", f"http://127.0.0.1:{port}/v1"))

    outcome = await tools.run("call_1", "down", "{}", deadline())

    assert outcome.is_error and outcome.content.startswith(
        f"the tool could not be reached (cannot connect to 127.0.0.1:{port}"
    )


async def test_a_result_longer_than_the_limit_is_an_error_and_an_endless_body_is_not_read_to_its_end(
    endpoint: ToolEndpoint, make_tools: Callable[..., ServerTools]
) -> None:
    tools = make_tools(
        http_tool("exact", endpoint.url("/text?n=100")),
        http_tool("long", endpoint.url("/text?n=101")),
        # Reading 6.4 GB would take longer than the timeout: "too long", not a timeout, proves the read stopped.
        http_tool("endless", endpoint.url("/endless"), timeout_seconds=3),
    )
    too_long = ToolOutcome("the tool's result was too long (more than 100 characters)", True)

    assert await tools.run("call_1", "exact", "{}", deadline()) == ToolOutcome("x" * 100, False)
    assert await tools.run("call_2", "long", "{}", deadline()) == too_long
    assert await tools.run("call_3", "endless", "{}", deadline()) == too_long


# Redirects.


async def test_a_redirect_to_an_allowed_host_is_followed_as_browsers_do(
    endpoint: ToolEndpoint, make_tools: Callable[..., ServerTools]
) -> None:
    tools = make_tools(
        http_tool("moved", endpoint.url("/redirect?status=307&to=/echo"), parameters=ORDER_PARAMETERS),
        http_tool("see_other", endpoint.url(f"/redirect?status=302&to={endpoint.url('/echo')}")),
    )

    # 307 repeats the POST with its body; 302 goes on with a GET, as after any POST.
    outcome = await tools.run("call_1", "moved", '{"order_id": "A-17"}', deadline())
    assert outcome == ToolOutcome(json.dumps({"method": "POST", "arguments": {"order_id": "A-17"}}), False)
    outcome = await tools.run("call_2", "see_other", "{}", deadline())
    assert outcome == ToolOutcome(json.dumps({"method": "GET", "arguments": None}), False)
    assert endpoint.paths() == ["/redirect", "/echo", "/redirect", "/echo"]


async def test_a_redirect_to_a_host_not_on_the_allow_list_is_an_error_and_is_not_followed(
    endpoint: ToolEndpoint, make_tools: Callable[..., ServerTools]
) -> None:
    elsewhere = endpoint.url("/echo", host="localhost")
    tools = make_tools(http_tool("leaky", endpoint.url(f"/redirect?to={elsewhere}")))

    outcome = await tools.run("call_1", "leaky", "{}", deadline())

    assert outcome == ToolOutcome(
        "the tool's endpoint redirected to localhost, which is not on the tool's allowed_hosts", True
    )
    assert endpoint.paths() == ["/redirect"]


async def test_at_most_three_redirects_are_followed(
    endpoint: ToolEndpoint, make_tools: Callable[..., ServerTools]
) -> None:
    tools = make_tools(http_tool("loop", endpoint.url("/loop")))

    outcome = await tools.run("call_1", "loop", "{}", deadline())

    assert outcome == ToolOutcome("the tool's endpoint redirected more than 3 times", True)
    assert endpoint.paths() == ["/loop"] * 4


# Several calls at once.


async def test_run_all_runs_the_calls_concurrently_and_answers_in_the_calls_order(
    endpoint: ToolEndpoint, make_tools: Callable[..., ServerTools]
) -> None:
    tools = make_tools(http_tool("slow", endpoint.url("/slow?seconds=0.3")), http_tool("echo", endpoint.url("/echo")))
    calls = [
        chat_pb2.ToolCall(id="call_1", name="slow", arguments="{}"),
        chat_pb2.ToolCall(id="call_2", name="echo", arguments='{"n": 2}'),
        chat_pb2.ToolCall(id="call_3", name="slow", arguments="{}"),
        chat_pb2.ToolCall(id="call_4", name=CURRENT_TIME, arguments='{"timezone": "Nowhere/Atlantis"}'),
    ]

    outcomes = await tools.run_all(calls, deadline())

    assert [outcome.content for outcome in outcomes[:3]] == [
        "slept",
        json.dumps({"method": "POST", "arguments": {"n": 2}}),
        "slept",
    ]
    assert outcomes[3].is_error and "Nowhere/Atlantis" in outcomes[3].content
    # Both slow calls were in the endpoint at the same time.
    first, second = (request for request in endpoint.requests if request.path == "/slow")
    assert first.ended is not None and second.ended is not None
    assert max(first.started, second.started) < min(first.ended, second.ended)


# The built-in current_time.


async def test_current_time_answers_the_time_of_a_zone_to_the_second(make_tools: Callable[..., ServerTools]) -> None:
    tools = make_tools()

    outcome = await tools.run("call_1", CURRENT_TIME, '{"timezone": "Asia/Shanghai"}', deadline())

    assert not outcome.is_error
    result = json.loads(outcome.content)
    assert set(result) == {"timezone", "time", "weekday", "unix"} and result["timezone"] == "Asia/Shanghai"
    moment = datetime.fromisoformat(result["time"])
    assert moment.utcoffset() == timedelta(hours=8) and moment.microsecond == 0
    assert result["weekday"] == moment.strftime("%A") and result["unix"] == int(moment.timestamp())
    assert abs(result["unix"] - time.time()) < 5


async def test_current_time_is_utc_without_a_zone(make_tools: Callable[..., ServerTools]) -> None:
    outcome = await make_tools().run("call_1", CURRENT_TIME, "{}", deadline())

    result = json.loads(outcome.content)
    assert result["timezone"] == "UTC" and result["time"].endswith("+00:00")


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", "Europe"])
async def test_current_time_in_an_unknown_zone_is_an_error(make_tools: Callable[..., ServerTools], zone: str) -> None:
    outcome = await make_tools().run("call_1", CURRENT_TIME, json.dumps({"timezone": zone}), deadline())

    assert outcome == ToolOutcome(f"unknown time zone {zone!r}: use an IANA name such as Europe/Paris", True)


async def test_current_time_refuses_arguments_it_does_not_take(make_tools: Callable[..., ServerTools]) -> None:
    outcome = await make_tools().run("call_1", CURRENT_TIME, '{"zone": "UTC"}', deadline())

    assert outcome.is_error and "Additional properties are not allowed ('zone' was unexpected)" in outcome.content


# The built-in knowledge_search: the search is the turn's, handed in by dialogue.


@dataclass
class TurnSearch:
    """A turn's knowledge_search that records what it was asked and answers `outcome` after `seconds`."""

    outcome: ToolOutcome = field(default_factory=lambda: ToolOutcome("[1] Refunds (billing.md)\nFive days.", False))
    seconds: float = 0.0
    asked: list[tuple[str, int]] = field(default_factory=list)

    async def __call__(self, query: str, k: int) -> ToolOutcome:
        self.asked.append((query, k))
        await asyncio.sleep(self.seconds)
        return self.outcome


async def test_knowledge_search_asks_the_turns_search_and_its_answer_is_the_result(
    make_tools: Callable[..., ServerTools],
) -> None:
    search = TurnSearch()
    tools = make_tools()

    outcome = await tools.run("call_1", KNOWLEDGE_SEARCH, '{"query": "refund", "k": 2}', deadline(), knowledge=search)
    default_k = await tools.run("call_2", KNOWLEDGE_SEARCH, '{"query": "refund"}', deadline(), knowledge=search)

    assert outcome == default_k == search.outcome
    # Without k, as many passages as a turn's window takes (CHATMESH_KNOWLEDGE_TOP_K).
    assert search.asked == [("refund", 2), ("refund", SETTINGS.knowledge_top_k)]


async def test_knowledge_search_in_a_turn_without_knowledge_bases_is_an_error_saying_so(
    make_tools: Callable[..., ServerTools],
) -> None:
    before = calls_counted(KNOWLEDGE_SEARCH, "error")

    outcome = await make_tools().run("call_1", KNOWLEDGE_SEARCH, '{"query": "refund"}', deadline())

    assert outcome == ToolOutcome(NO_KNOWLEDGE_BASES, True)
    assert calls_counted(KNOWLEDGE_SEARCH, "error") == before + 1


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ("{}", "arguments: 'query' is a required property"),
        ('{"query": ""}', "arguments.query: '' should be non-empty"),
        ('{"query": "refund", "k": 0}', "arguments.k: 0 is less than the minimum of 1"),
        ('{"query": "refund", "k": 51}', "arguments.k: 51 is greater than the maximum of 50"),
        ('{"query": "refund", "kb": "secrets"}', "('kb' was unexpected)"),
    ],
)
async def test_knowledge_search_with_arguments_that_do_not_fit_does_not_search(
    make_tools: Callable[..., ServerTools], arguments: str, problem: str
) -> None:
    search = TurnSearch()

    outcome = await make_tools().run("call_1", KNOWLEDGE_SEARCH, arguments, deadline(), knowledge=search)

    assert error(problem)(outcome), outcome
    assert search.asked == []


async def test_knowledge_search_is_bounded_by_the_tool_timeout_and_the_turns_deadline(
    make_tools: Callable[..., ServerTools],
) -> None:
    tools = ServerTools(DialogueSettings(tool_timeout_seconds=SHORT_TIMEOUT))
    try:
        slow = TurnSearch(seconds=5)
        timed_out = await tools.run("call_1", KNOWLEDGE_SEARCH, '{"query": "refund"}', deadline(), knowledge=slow)
        passed = await tools.run("call_2", KNOWLEDGE_SEARCH, '{"query": "refund"}', deadline(-1), knowledge=slow)
    finally:
        await tools.close()

    assert timed_out == ToolOutcome(f"the tool did not answer within {SHORT_TIMEOUT:g} s", True)
    assert passed == ToolOutcome("the turn's deadline passed before the tool could run", True)
    assert slow.asked == [("refund", DialogueSettings().knowledge_top_k)]


async def test_a_knowledge_search_that_fails_is_an_error_result_and_counted_as_one(
    make_tools: Callable[..., ServerTools],
) -> None:
    unreadable = TurnSearch(outcome=ToolOutcome("the knowledge bases cannot be read now", True))

    async def broken(query: str, k: int) -> ToolOutcome:
        raise RuntimeError("surprise")

    before = calls_counted(KNOWLEDGE_SEARCH, "error")
    tools = make_tools()

    failed = await tools.run("call_1", KNOWLEDGE_SEARCH, '{"query": "refund"}', deadline(), knowledge=unreadable)
    raised = await tools.run("call_2", KNOWLEDGE_SEARCH, '{"query": "refund"}', deadline(), knowledge=broken)

    assert failed == unreadable.outcome
    assert raised == ToolOutcome("the tool failed", True)
    assert calls_counted(KNOWLEDGE_SEARCH, "error") == before + 2


async def test_run_all_hands_the_turns_search_to_each_knowledge_search_call(
    make_tools: Callable[..., ServerTools],
) -> None:
    search = TurnSearch()
    calls = [
        chat_pb2.ToolCall(id="call_1", name=KNOWLEDGE_SEARCH, arguments='{"query": "refund"}'),
        chat_pb2.ToolCall(id="call_2", name=CURRENT_TIME, arguments="{}"),
        chat_pb2.ToolCall(id="call_3", name=KNOWLEDGE_SEARCH, arguments='{"query": "password", "k": 1}'),
    ]

    outcomes = await make_tools().run_all(calls, deadline(), knowledge=search)

    assert outcomes[0] == outcomes[2] == search.outcome and not outcomes[1].is_error
    assert sorted(search.asked) == [("password", 1), ("refund", SETTINGS.knowledge_top_k)]


async def test_a_name_that_is_no_server_side_tool_is_an_error(make_tools: Callable[..., ServerTools]) -> None:
    outcome = await make_tools().run("call_1", "delete_everything", "{}", deadline())

    assert outcome == ToolOutcome("there is no server-side tool named 'delete_everything'", True)


# What the model is offered.


async def test_definitions_are_openai_tools_entries_in_the_order_asked(make_tools: Callable[..., ServerTools]) -> None:
    tools = make_tools(http_tool("order_status", "http://127.0.0.1/status", parameters=ORDER_PARAMETERS))

    assert tools.names() == [CURRENT_TIME, KNOWLEDGE_SEARCH, "order_status"]
    assert "order_status" in tools and "other" not in tools and tools.get("other") is None
    order_status, current_time, knowledge_search = tools.definitions(["order_status", CURRENT_TIME, KNOWLEDGE_SEARCH])
    assert order_status == {
        "type": "function",
        "function": {"name": "order_status", "description": "The order_status tool.", "parameters": ORDER_PARAMETERS},
    }
    assert current_time["function"]["parameters"]["properties"]["timezone"]["type"] == "string"
    assert current_time["function"]["parameters"]["additionalProperties"] is False
    search_parameters = knowledge_search["function"]["parameters"]
    assert search_parameters["required"] == ["query"] and search_parameters["additionalProperties"] is False
    assert set(search_parameters["properties"]) == {"query", "k"}
    assert f"{SETTINGS.knowledge_top_k} when omitted" in search_parameters["properties"]["k"]["description"]
    with pytest.raises(KeyError):
        tools.definitions(["other"])


# Metrics and logs.


def calls_counted(tool: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("chatmesh_server_tool_calls_total", {"tool": tool, "outcome": outcome}) or 0.0


async def test_each_call_is_counted_timed_and_logged_by_outcome_without_its_arguments_or_result(
    endpoint: ToolEndpoint, make_tools: Callable[..., ServerTools], caplog: pytest.LogCaptureFixture
) -> None:
    tools = make_tools(
        http_tool("metered", endpoint.url("/echo"), parameters=ORDER_PARAMETERS),
        http_tool("metered_slow", endpoint.url("/slow?seconds=5"), timeout_seconds=SHORT_TIMEOUT),
    )
    outcomes = [("metered", "ok"), ("metered", "invalid_arguments"), ("metered_slow", "timeout")]
    assert all(calls_counted(tool, outcome) == 0 for tool, outcome in outcomes)
    timed = REGISTRY.get_sample_value("chatmesh_server_tool_duration_seconds_count", {"tool": "metered"})

    with caplog.at_level(logging.INFO, logger="chatmesh.dialogue.server_tools"):
        await tools.run("call_1", "metered", '{"order_id": "private-A-17"}', deadline())
        await tools.run("call_2", "metered", '{"order_id": 5}', deadline())
        await tools.run("call_3", "metered_slow", "{}", deadline())

    assert all(calls_counted(tool, outcome) == 1 for tool, outcome in outcomes)
    assert REGISTRY.get_sample_value("chatmesh_server_tool_duration_seconds_count", {"tool": "metered"}) == timed + 2
    lines = [record for record in caplog.records if record.getMessage() == "server_tool_call"]
    assert [(line.tool, line.call_id, line.outcome) for line in lines] == [
        ("metered", "call_1", "ok"),
        ("metered", "call_2", "invalid_arguments"),
        ("metered_slow", "call_3", "timeout"),
    ]
    assert all(isinstance(line.duration_ms, float) for line in lines)
    assert "private-A-17" not in caplog.text and not any("private-A-17" in str(r.__dict__) for r in caplog.records)


# The tools file.


def test_load_without_a_file_has_only_the_built_in_tools() -> None:
    assert ServerTools.load(DialogueSettings(tools_file="")).names() == [CURRENT_TIME, KNOWLEDGE_SEARCH]


def test_load_reads_the_file_and_the_header_values_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "tools.yaml"
    path.write_text(
        """
tools:
  - name: order_status
    description: Looks up an order's status by its number.
    url: http://orders.internal:8080/v1/status
    allowed_hosts: [orders.internal]
    timeout_seconds: 3
    parameters: {type: object, properties: {order_id: {type: string}}, required: [order_id]}
    headers_from_env: {Authorization: ORDERS_API_AUTHORIZATION}
  - name: weather
    description: Today's weather in a city.
    url: https://weather.example.com/today
    allowed_hosts: [weather.example.com, cdn.weather.example.com]
"""
    )

    tools = ServerTools.load(DialogueSettings(tools_file=str(path), tool_timeout_seconds=7), ENV)

    assert tools.names() == [CURRENT_TIME, KNOWLEDGE_SEARCH, "order_status", "weather"]
    order_status, weather = tools.get("order_status"), tools.get("weather")
    assert order_status is not None and weather is not None and order_status.endpoint is not None
    assert order_status.timeout_seconds == 3 and order_status.parameters == ORDER_PARAMETERS
    assert order_status.endpoint.headers == {"Authorization": "Bearer s3cret"}
    assert "s3cret" not in repr(order_status)
    # Defaults: the settings' timeout, and no arguments.
    assert weather.timeout_seconds == 7 and weather.parameters == {"type": "object", "properties": {}}
    assert weather.endpoint is not None and weather.endpoint.allowed_hosts == {
        "weather.example.com",
        "cdn.weather.example.com",
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("tools: [", "tools.yaml: not valid YAML"),
        ("", "tools.yaml: must be a mapping with a `tools:` list"),
        ("- name: order_status", "tools.yaml: must be a mapping with a `tools:` list"),
        ("tool: []", r"tools.yaml: tools: Field required; tool: Extra inputs are not permitted"),
    ],
    ids=["not-yaml", "empty", "a-list", "no-tools"],
)
def test_a_file_that_is_not_a_tools_document_stops_the_process(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "tools.yaml"
    path.write_text(content)

    with pytest.raises(ToolsFileError, match=re.escape(message)):
        ServerTools.load(DialogueSettings(tools_file=str(path)), ENV)


def test_a_missing_file_stops_the_process(tmp_path: Path) -> None:
    with pytest.raises(ToolsFileError, match=r"missing\.yaml: cannot be read \(No such file or directory\)"):
        ServerTools.load(DialogueSettings(tools_file=str(tmp_path / "missing.yaml")), ENV)


GOOD = declaration("order_status", "http://orders.internal:8080/v1/status", allowed_hosts=["orders.internal"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "GET"}, "tools[0] (order_status).method: Extra inputs are not permitted"),
        ({"name": "order status"}, "tools[0] (order status).name: String should match pattern"),
        ({"name": "x" * 65}, f"tools[0] ({'x' * 65}).name: String should match pattern"),
        ({"name": CURRENT_TIME}, "tools[0] (current_time).name: 'current_time' is already the name of a built-in tool"),
        (
            {"name": KNOWLEDGE_SEARCH},
            "tools[0] (knowledge_search).name: 'knowledge_search' is already the name of a built-in tool",
        ),
        ({"description": ""}, "tools[0] (order_status).description: String should have at least 1 character"),
        ({"allowed_hosts": None}, "tools[0] (order_status).allowed_hosts: Input should be a valid list"),
        ({"allowed_hosts": []}, "tools[0] (order_status).allowed_hosts: List should have at least 1 item"),
        (
            {"allowed_hosts": ["orders.example.com"]},
            "tools[0] (order_status).url: its host orders.internal is not on allowed_hosts",
        ),
        (
            {"url": "ftp://orders.internal/status"},
            "tools[0] (order_status).url: must be an http:// or https:// URL with a host",
        ),
        ({"timeout_seconds": 0}, "tools[0] (order_status).timeout_seconds: Input should be greater than 0"),
        (
            {"parameters": {"type": "object", "properties": {"order_id": {"type": "text"}}}},
            "tools[0] (order_status).parameters: is not a valid JSON Schema (Draft 2020-12): "
            "['properties']['order_id']['type']: 'text' is not valid under any of the given schemas",
        ),
        (
            {"parameters": {"type": "string"}},
            'tools[0] (order_status).parameters: must be the schema of an object ("type": "object")',
        ),
        (
            {"headers_from_env": {"Authorization": "MISSING_VARIABLE"}},
            "tools[0] (order_status).headers_from_env.Authorization: environment variable MISSING_VARIABLE is not set",
        ),
        (
            {"headers_from_env": {"Bad Header": "ORDERS_API_AUTHORIZATION"}},
            "tools[0] (order_status).headers_from_env.Bad Header (the name): String should match pattern",
        ),
    ],
    ids=lambda value: None if isinstance(value, str) else "-".join(value),
)
def test_a_bad_tool_stops_the_process_with_the_file_the_tool_and_the_field_named(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = tmp_path / "tools.yaml"
    path.write_text(yaml.safe_dump({"tools": [{**GOOD, **changes}]}))

    with pytest.raises(ToolsFileError) as raised:
        ServerTools.load(DialogueSettings(tools_file=str(path)), ENV)

    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)


def test_every_problem_of_the_file_is_named_at_once() -> None:
    document = {
        "tools": [
            GOOD,
            {**GOOD, "url": "http://elsewhere/v1"},
            {**GOOD, "headers_from_env": {"Authorization": "MISSING_VARIABLE"}},
        ]
    }

    with pytest.raises(ToolsFileError) as raised:
        parse_tools(document, SETTINGS, ENV, source="tools.yaml")

    assert str(raised.value) == (
        "tools.yaml: "
        "tools[1] (order_status).name: 'order_status' is already the name of tools[0]; "
        "tools[1] (order_status).url: its host elsewhere is not on allowed_hosts; "
        "tools[2] (order_status).name: 'order_status' is already the name of tools[0]; "
        "tools[2] (order_status).headers_from_env.Authorization: environment variable MISSING_VARIABLE is not set"
    )


@pytest.mark.parametrize(
    ("source", "target", "problem"),
    [
        ("https://a/x", "https://b/y", None),
        ("http://a/x", "https://b/y", None),
        ("https://a/x", "http://b/y", "the tool's endpoint redirected from https to plain http"),
        ("http://a/x", "ftp://b/y", "the tool's endpoint redirected to a URL that is not http or https"),
        ("http://a/x", "http://c/y", "the tool's endpoint redirected to c, which is not on the tool's allowed_hosts"),
    ],
)
def test_a_redirect_keeps_to_the_allowed_hosts_and_never_leaves_tls(
    source: str, target: str, problem: str | None
) -> None:
    assert _redirect_problem(source, target, frozenset({"a", "b"})) == problem
