"""The SSE parser on the streaming path, and what the model client makes of provider errors."""

from collections.abc import AsyncIterator

import httpx2
import openai
import pytest

from chatmesh.runtime.model_client import ModelError, ModelErrorKind, ModelOutcome, _classify, _parse_sse

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
