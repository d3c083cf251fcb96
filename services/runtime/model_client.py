"""The one way chatmesh calls a model: the official `openai` SDK against any OpenAI-compatible API.

The SDK builds and sends the request (base URL, auth, error types). On the streaming path its
typed per-chunk parsing costs about 130 µs a chunk, more than both gRPC hops together, so the raw
streaming response is read and its SSE lines parsed here. Retries are ours rather than the SDK's
because they must stop at the caller's deadline and never repeat a stream that has started.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import aiohttp
import httpx2
import openai

from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import Settings

log = get_logger(__name__)

_DATA_PREFIX = b"data:"
_DONE = b"[DONE]"


class ModelErrorKind(Enum):
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    REJECTED = "rejected"  # the provider refused the request itself (4xx other than 429)


class ModelError(Exception):
    """The model call failed for good; `kind` says how, `retry_after` (seconds) when the provider said."""

    def __init__(self, kind: ModelErrorKind, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.retry_after = retry_after


@dataclass(slots=True)
class ModelRequest:
    model: str
    messages: list[dict[str, str]]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, "messages": self.messages}
        optional = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop": self.stop or None,
        }
        params.update((name, value) for name, value in optional.items() if value is not None)
        return params


@dataclass(slots=True)
class ModelOutcome:
    """How a streamed reply ended, as the provider reported it."""

    finish_reason: str = "stop"
    input_tokens: int = 0
    output_tokens: int = 0


class ModelClient:
    """One per process: one SDK client, one connection pool."""

    def __init__(self, settings: Settings) -> None:
        base_url, api_key = settings.model_endpoint()
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=0,
            http_client=openai.DefaultAioHttpClient(),
        )
        self._max_attempts = settings.model_max_attempts
        self._backoff_initial = settings.model_backoff_initial_seconds
        self._backoff_max = settings.model_backoff_max_seconds
        self._moderation_model = settings.safety_moderation_model
        self._default_deadline_seconds = settings.default_deadline_seconds

    async def close(self) -> None:
        await self._client.close()

    async def stream_chat(self, request: ModelRequest, deadline: float) -> AsyncIterator[str | ModelOutcome]:
        """Yields the reply's text deltas as they arrive, then one ModelOutcome.

        `deadline` is in `loop.time()` terms. Failures before the first delta are retried with
        exponential backoff and jitter, honouring Retry-After, while the deadline allows; once text
        has been yielded nothing is retried. Closing the iterator closes the HTTP stream.
        """
        loop = asyncio.get_running_loop()
        params = request.params()
        attempt = 0
        text_sent = False
        while True:
            attempt += 1
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ModelError(ModelErrorKind.TIMEOUT, "the deadline passed before the model answered")
            try:
                async with self._client.chat.completions.with_streaming_response.create(
                    **params,
                    stream=True,
                    stream_options={"include_usage": True},
                    timeout=remaining,
                ) as response:
                    async for item in _parse_sse(response.http_response.aiter_bytes()):
                        text_sent = True
                        yield item
                    return
            except openai.APIError as error:
                failure = _classify(error)
            except (httpx2.HTTPError, aiohttp.ClientError):
                failure = ModelError(ModelErrorKind.UNAVAILABLE, "the model stream broke off")
            if text_sent:
                raise failure
            await self._wait_to_retry(failure, attempt, deadline, "chat")

    async def moderate(self, text: str, *, deadline: float | None = None) -> tuple[bool, list[str]]:
        """Asks the provider's /v1/moderations whether `text` is flagged, and for which categories.

        Retried like `stream_chat` (429, 5xx and connection errors, with backoff, within `deadline`
        in `loop.time()` terms, default `default_deadline_seconds` from now); raises ModelError.
        """
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self._default_deadline_seconds
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ModelError(ModelErrorKind.TIMEOUT, "the deadline passed before the moderation endpoint answered")
            try:
                response = await self._client.moderations.create(
                    input=text, model=self._moderation_model, timeout=remaining
                )
                return _moderation_verdict(response)
            except openai.APIError as error:
                failure = _classify(error)
            except (httpx2.HTTPError, aiohttp.ClientError):
                failure = ModelError(ModelErrorKind.UNAVAILABLE, "the moderation request broke off")
            await self._wait_to_retry(failure, attempt, deadline, "moderation")

    async def _wait_to_retry(self, failure: ModelError, attempt: int, deadline: float, operation: str) -> None:
        """Sleeps before the next attempt: Retry-After when the provider gave one, else exponential backoff
        with jitter. Raises `failure` instead when the provider rejected the request itself, the attempts
        are used up, or the wait would pass the deadline."""
        if failure.retry_after is not None:
            delay = failure.retry_after
        else:
            ceiling = min(self._backoff_max, self._backoff_initial * 2 ** (attempt - 1))
            delay = random.uniform(ceiling / 2, ceiling)
        if (
            failure.kind is ModelErrorKind.REJECTED
            or attempt >= self._max_attempts
            or asyncio.get_running_loop().time() + delay >= deadline
        ):
            raise failure
        log.warning(
            "model_retry",
            extra={"operation": operation, "attempt": attempt, "kind": failure.kind.value, "delay_s": delay},
        )
        await asyncio.sleep(delay)


def _classify(error: openai.APIError) -> ModelError:
    if isinstance(error, openai.APITimeoutError):
        return ModelError(ModelErrorKind.TIMEOUT, "the model provider did not answer in time")
    if isinstance(error, openai.APIConnectionError):
        return ModelError(ModelErrorKind.UNAVAILABLE, "the model provider cannot be reached")
    if isinstance(error, openai.RateLimitError):
        return ModelError(
            ModelErrorKind.RATE_LIMITED, "the model provider is rate limiting", _retry_after(error.response)
        )
    if isinstance(error, openai.APIStatusError):
        if error.status_code >= 500:
            return ModelError(
                ModelErrorKind.UNAVAILABLE,
                f"the model provider failed with HTTP {error.status_code}",
                _retry_after(error.response),
            )
        return ModelError(
            ModelErrorKind.REJECTED, f"the model provider rejected the request with HTTP {error.status_code}"
        )
    return ModelError(ModelErrorKind.UNAVAILABLE, "the model stream failed")


def _moderation_verdict(response: Any) -> tuple[bool, list[str]]:
    """(flagged, the flagged categories by OpenAI's names, e.g. "self-harm/intent") of the first result."""
    try:
        result = response.results[0]
        categories = result.categories.model_dump(by_alias=True)
        flagged = sorted(name for name, value in categories.items() if value is True)
        return bool(result.flagged) or bool(flagged), flagged
    except (AttributeError, IndexError, TypeError, ValueError):
        raise ModelError(ModelErrorKind.UNAVAILABLE, "the moderation endpoint sent a malformed response") from None


def _retry_after(response: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds form only), when present and sane."""
    headers = response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if 0 <= seconds <= 600:
            return seconds
    return None


async def _parse_sse(chunks: AsyncIterator[bytes]) -> AsyncIterator[str | ModelOutcome]:
    """Parses OpenAI's chat-completion SSE stream: `data: {json}` lines, ended by `data: [DONE]`."""
    outcome = ModelOutcome()
    pending = b""
    async for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if not line.startswith(_DATA_PREFIX):
                continue
            payload = line[len(_DATA_PREFIX) :].strip()
            if payload == _DONE:
                yield outcome
                return
            try:
                event = json.loads(payload)
            except ValueError:
                raise ModelError(ModelErrorKind.UNAVAILABLE, "the model stream sent malformed data") from None
            if "error" in event:
                raise ModelError(ModelErrorKind.UNAVAILABLE, "the model provider reported an error mid-stream")
            usage = event.get("usage")
            if usage:
                outcome.input_tokens = usage.get("prompt_tokens", 0)
                outcome.output_tokens = usage.get("completion_tokens", 0)
            for choice in event.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text
                if choice.get("finish_reason"):
                    outcome.finish_reason = choice["finish_reason"]
    raise ModelError(ModelErrorKind.UNAVAILABLE, "the model stream ended before [DONE]")
