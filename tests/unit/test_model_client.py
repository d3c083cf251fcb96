"""The SSE parser on the streaming path, and what the model client makes of provider errors."""

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx2
import openai
import pytest
from support.ports import free_port

from chatmesh.model.client import ModelClient, ModelOutcome, ModelRequest, ModelToolCall, _classify, _parse_sse
from chatmesh.model.errors import ModelError, ModelErrorKind
from chatmesh.runtime.settings import ModelSettings

STREAM = (
    'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    'data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n'
    'data: {"choices":[{"index":0,"delta":{"content":" 世界"}}]}\n\n'
    'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
    'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}\n\n'
    "data: [DONE]\n\n"
).encode()


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("chunk_size", [1, 3, 17, len(STREAM)])
async def test_the_parser_gives_the_same_deltas_and_outcome_whatever_the_chunking(chunk_size: int):
    items = [item async for item in _parse_sse(chunks(STREAM, chunk_size))]

    assert items[:-1] == ["Hello", " 世界"]
    assert items[-1] == ModelOutcome(finish_reason="length", input_tokens=7, output_tokens=2)


# Two parallel calls as OpenAI streams them: each call's id and name first, then its arguments in pieces
# that name the call by index; here the second call's pieces interleave with the first's.
def sse(*events: dict) -> bytes:
    return (
        "".join(f"data: {json.dumps(event, ensure_ascii=False)}\n\n" for event in events).encode() + b"data: [DONE]\n\n"
    )


def tool_piece(index: int, **fields) -> dict:
    return {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": index, **fields}]}}]}


TOOL_STREAM = sse(
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
    tool_piece(0, id="call_a", type="function", function={"name": "get_weather", "arguments": ""}),
    tool_piece(0, function={"arguments": '{"city'}),
    tool_piece(1, id="call_b", type="function", function={"name": "current_time", "arguments": "{}"}),
    tool_piece(0, function={"arguments": '":"巴黎"}'}),
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}},
)


@pytest.mark.parametrize("chunk_size", [1, 5, len(TOOL_STREAM)])
async def test_tool_calls_streamed_in_pieces_come_whole_in_the_outcome(chunk_size: int):
    items = [item async for item in _parse_sse(chunks(TOOL_STREAM, chunk_size))]

    assert items == [
        ModelOutcome(
            finish_reason="tool_calls",
            input_tokens=30,
            output_tokens=12,
            tool_calls=[
                ModelToolCall("call_a", "get_weather", '{"city":"巴黎"}'),
                ModelToolCall("call_b", "current_time", "{}"),
            ],
        )
    ]


async def test_a_tool_call_without_a_name_is_an_error():
    nameless = sse(tool_piece(0, id="call_a"))
    with pytest.raises(ModelError, match="without an id or name"):
        _ = [item async for item in _parse_sse(chunks(nameless, 64))]


def test_tools_are_sent_only_when_offered():
    plain = ModelRequest(model="m", messages=[]).params()
    offered = ModelRequest(
        model="m",
        messages=[],
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice="required",
        parallel_tool_calls=False,
    ).params()

    assert not {"tools", "tool_choice", "parallel_tool_calls"} & plain.keys()
    assert (offered["tool_choice"], offered["parallel_tool_calls"]) == ("required", False)
    assert offered["tools"] == [{"type": "function", "function": {"name": "f"}}]


async def test_a_stream_cut_before_done_is_an_error():
    with pytest.raises(ModelError, match="ended before"):
        _ = [item async for item in _parse_sse(chunks(STREAM[:-16], 50))]


async def test_an_error_event_mid_stream_is_an_error():
    first_event = STREAM.index(b"\n\n") + 2
    broken = STREAM[:first_event] + b'data: {"error":{"message":"overloaded"}}\n\n'
    with pytest.raises(ModelError, match="mid-stream"):
        _ = [item async for item in _parse_sse(chunks(broken, 64))]


async def test_malformed_data_is_an_error():
    with pytest.raises(ModelError, match="malformed"):
        _ = [item async for item in _parse_sse(chunks(b'data: {"choices": [\n\n', 64))]


def _status_error(status: int, headers: dict[str, str]) -> openai.APIStatusError:
    request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx2.Response(status, headers=headers, request=request)
    error_type = {429: openai.RateLimitError, 500: openai.InternalServerError}.get(status, openai.BadRequestError)
    return error_type("failed", response=response, body=None)


@pytest.mark.parametrize(
    ("status", "headers", "kind", "retry_after"),
    [
        (429, {"retry-after-ms": "1500"}, ModelErrorKind.RATE_LIMITED, 1.5),
        (429, {"retry-after": "2"}, ModelErrorKind.RATE_LIMITED, 2.0),
        (429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, ModelErrorKind.RATE_LIMITED, None),
        (500, {}, ModelErrorKind.UNAVAILABLE, None),
        (400, {}, ModelErrorKind.REJECTED, None),
    ],
)
def test_provider_errors_are_classified_with_their_retry_after(status, headers, kind, retry_after):
    failure = _classify(_status_error(status, headers))

    assert failure.kind is kind
    assert failure.retry_after == retry_after


async def _first_error(settings: ModelSettings, deadline_seconds: float) -> ModelError:
    client = ModelClient(settings)
    loop = asyncio.get_running_loop()
    try:
        with pytest.raises(ModelError) as failure:
            async for _ in client.stream_chat(
                ModelRequest(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]),
                loop.time() + deadline_seconds,
            ):
                pass
        return failure.value
    finally:
        await client.close()


async def test_a_provider_that_refuses_connections_is_unavailable_well_before_the_deadline():
    """The SDK's aiohttp transport reports a refused connection as APITimeoutError; it is still unreachable."""
    settings = ModelSettings(
        openai_api_key="key", openai_base_url=f"http://127.0.0.1:{free_port()}/v1", model_backoff_initial_seconds=0.01
    )
    started = time.monotonic()
    error = await _first_error(settings, deadline_seconds=10)
    assert error.kind is ModelErrorKind.UNAVAILABLE and "cannot be reached" in str(error)
    assert time.monotonic() - started < 5


async def test_a_provider_that_accepts_and_never_answers_misses_the_deadline():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = ModelSettings(openai_api_key="key", openai_base_url=f"http://127.0.0.1:{port}/v1")
        error = await _first_error(settings, deadline_seconds=0.5)
    finally:
        server.close()
    assert error.kind is ModelErrorKind.TIMEOUT
