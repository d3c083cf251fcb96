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
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx2
import openai

from chatmesh.runtime import metrics, tracing
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import Settings

log = get_logger(__name__)

# The SDK's own marker (what `with_streaming_response` sets) for "hand back the response unread", so that
# the body can be read as it streams. The request goes through `client.post` rather than
# `chat.completions.create`, whose typed transform of the request walks every message: 0.2 ms of CPU
# for one message, 2 ms for eleven, for a body that is already plain JSON.
_STREAM_HEADERS = {"X-Stainless-Raw-Response": "stream"}

_DATA_PREFIX = b"data:"
_DONE = b"[DONE]"


class ModelErrorKind(Enum):
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    REJECTED = "rejected"  # the provider refused the request itself (4xx other than 429)


class ModelError(Exception):
    """The model call failed for good; `kind` says how, `retry_after` (seconds) when the provider said,
    `http_status` when the provider answered with an error status."""

    def __init__(
        self, kind: ModelErrorKind, detail: str, retry_after: float | None = None, http_status: int | None = None
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.retry_after = retry_after
        self.http_status = http_status


@dataclass(slots=True)
class ModelRequest:
    """A chat completion request. A message's `content` is a string, or a list of OpenAI content parts (text
    and image_url). Options left None (or empty) are not sent, so the provider's defaults apply."""

    model: str
    messages: list[dict[str, Any]]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # Token id to a bias from -100 to 100.
    logit_bias: dict[int, int] = field(default_factory=dict)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # OpenAI's `response_format` object: {"type": "json_object"}, or {"type": "json_schema", "json_schema": {...}}.
    response_format: dict[str, Any] | None = None
    # A stable, opaque id of the end user, for the provider's abuse monitoring (never the caller's own id).
    user: str | None = None
    # The prompt's tokens as chatmesh counted them (not sent): what a call that ends without the provider's
    # usage is accounted with, and the worst case reserved against a tenant's limits.
    prompt_tokens: int | None = None

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, "messages": self.messages}
        optional = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stop": self.stop or None,
            # JSON object keys are strings: the API takes token ids as "50256".
            "logit_bias": {str(token): bias for token, bias in self.logit_bias.items()} or None,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "response_format": self.response_format,
            "user": self.user,
        }
        params.update((name, value) for name, value in optional.items() if value is not None)
        return params


@dataclass(slots=True)
class ModelOutcome:
    """How a streamed reply ended, as the provider reported it."""

    finish_reason: str = "stop"
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(slots=True)
class StreamProgress:
    """How far a streamed call got, for accounting when it does not finish: the text chunks received (the
    provider streams about one token per chunk), and its outcome once reported."""

    chunks: int = 0
    text: list[str] = field(default_factory=list)
    outcome: ModelOutcome | None = None


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
        self._prices = settings.model_prices_usd_per_million
        self._metrics = metrics.ModelMetrics(self._prices)
        endpoint = urlsplit(base_url)
        self._server_attributes: dict[str, Any] = {"server.address": endpoint.hostname or ""}
        if endpoint.port is not None:
            self._server_attributes["server.port"] = endpoint.port

    async def close(self) -> None:
        await self._client.close()

    async def stream_chat(
        self, request: ModelRequest, deadline: float, progress: StreamProgress | None = None
    ) -> AsyncIterator[str | ModelOutcome]:
        """Yields the reply's text deltas as they arrive, then one ModelOutcome; `progress` follows along.

        `deadline` is in `loop.time()` terms. Failures before the first delta are retried with
        exponential backoff and jitter, honouring Retry-After, while the deadline allows; once text
        has been yielded nothing is retried. Closing the iterator closes the HTTP stream.

        With tracing on, the whole call (every attempt, and the waits between them) is one CLIENT span
        `chat {model}` under the GenAI semantic conventions; retries are its events, and each attempt's
        HTTP request carries the span's `traceparent`. Nothing is done per delta.
        """
        loop = asyncio.get_running_loop()
        body = {**request.params(), "stream": True, "stream_options": {"include_usage": True}}
        attempt = 0
        text_sent = False
        family = price_family(self._prices, request.model)
        metered = self._metrics.call("chat", family)
        span = self._start_chat_span(request)
        headers = _STREAM_HEADERS if span is None else {**_STREAM_HEADERS, **tracing.inject_headers(span)}
        item: str | ModelOutcome | None = None
        error_type = "cancelled"
        try:
            while True:
                attempt += 1
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ModelError(ModelErrorKind.TIMEOUT, "the deadline passed before the model answered")
                try:
                    response = await self._client.post(
                        "/chat/completions",
                        cast_to=httpx2.Response,
                        body=body,
                        options={"timeout": remaining, "headers": headers},
                    )
                    try:
                        async for item in _parse_sse(response.aiter_bytes()):
                            if progress is not None:
                                if item.__class__ is str:
                                    progress.chunks += 1
                                    progress.text.append(item)
                                else:
                                    progress.outcome = item
                            if not text_sent:
                                text_sent = True
                                if item.__class__ is str:
                                    metered.first_token()
                                if span is not None:
                                    span.add_event("gen_ai.first_chunk")
                            yield item
                        return
                    finally:
                        await response.aclose()
                except openai.APIError as error:
                    failure = _classify(error)
                except (httpx2.HTTPError, aiohttp.ClientError):
                    failure = ModelError(ModelErrorKind.UNAVAILABLE, "the model stream broke off")
                except ModelError as error:  # the stream's own data: malformed, or an error event
                    metrics.model_attempt_failed("chat", error.kind.value, retried=False)
                    raise
                if text_sent:
                    metrics.model_attempt_failed("chat", failure.kind.value, retried=False)
                    raise failure
                await self._wait_to_retry(failure, attempt, deadline, "chat", span)
        except ModelError as error:
            error_type = error.kind.value
            raise
        except Exception as error:
            error_type = type(error).__qualname__
            raise
        finally:
            if isinstance(item, ModelOutcome):
                metered.completed(item.input_tokens, item.output_tokens, _cost_usd(self._prices, family, item))
            else:
                metered.failed(error_type)
            if span is not None:
                _end_chat_span(span, item, error_type)

    def record_unfinished(self, model: str, input_tokens: int, output_tokens: int) -> None:
        """Counts the tokens and cost of a chat call that ended without the provider's usage (cancelled by the
        caller, cut by its deadline, or blocked by the output screen), as its caller counted them."""
        family = price_family(self._prices, model)
        self._metrics.call("chat", family).tokens(
            input_tokens, output_tokens, cost_usd(self._prices, model, input_tokens, output_tokens)
        )

    def _start_chat_span(self, request: ModelRequest) -> Any:
        """The GenAI CLIENT span of a chat call, or None when tracing is off."""
        if not tracing.tracing_enabled():
            return None
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": request.model,
            **self._server_attributes,
        }
        for name, value in (
            ("gen_ai.request.temperature", request.temperature),
            ("gen_ai.request.top_p", request.top_p),
            ("gen_ai.request.max_tokens", request.max_tokens),
            ("gen_ai.request.seed", request.seed),
            ("gen_ai.request.presence_penalty", request.presence_penalty),
            ("gen_ai.request.frequency_penalty", request.frequency_penalty),
        ):
            if value is not None:
                attributes[name] = value
        return tracing.start_client_span(f"chat {request.model}", attributes)

    async def moderate(
        self, text: str, *, deadline: float | None = None, image_urls: Sequence[str] = ()
    ) -> tuple[bool, list[str]]:
        """Asks the provider's /v1/moderations whether `text` is flagged, and for which categories. With
        `image_urls` (https or `data:` URLs), the text and the images are judged together, as one multi-modal
        input of text and image_url parts (omni-moderation reads both).

        Retried like `stream_chat` (429, 5xx and connection errors, with backoff, within `deadline`
        in `loop.time()` terms, default `default_deadline_seconds` from now); raises ModelError.
        """
        metered = self._metrics.call("moderation", price_family(self._prices, self._moderation_model))
        try:
            verdict = await self._moderate(moderation_input(text, image_urls), deadline)
        except ModelError as error:
            metered.failed(error.kind.value)
            raise
        except BaseException as error:
            metered.failed("cancelled" if isinstance(error, asyncio.CancelledError) else type(error).__qualname__)
            raise
        metered.completed()
        return verdict

    async def _moderate(self, moderation: str | list[dict[str, Any]], deadline: float | None) -> tuple[bool, list[str]]:
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
                    input=moderation, model=self._moderation_model, timeout=remaining
                )
                return _moderation_verdict(response)
            except openai.APIError as error:
                failure = _classify(error)
            except (httpx2.HTTPError, aiohttp.ClientError):
                failure = ModelError(ModelErrorKind.UNAVAILABLE, "the moderation request broke off")
            await self._wait_to_retry(failure, attempt, deadline, "moderation")

    async def _wait_to_retry(
        self, failure: ModelError, attempt: int, deadline: float, operation: str, span: Any = None
    ) -> None:
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
            metrics.model_attempt_failed(operation, failure.kind.value, retried=False)
            raise failure
        log.warning(
            "model_retry",
            extra={"operation": operation, "attempt": attempt, "kind": failure.kind.value, "delay_s": delay},
        )
        metrics.model_attempt_failed(operation, failure.kind.value, retried=True)
        if span is not None:
            span.add_event("gen_ai.retry", {"attempt": attempt, "error.type": failure.kind.value, "delay_s": delay})
        await asyncio.sleep(delay)


def moderation_input(text: str, image_urls: Sequence[str] = ()) -> str | list[dict[str, Any]]:
    """The moderation endpoint's `input`: the text alone; with images, a text part (unless the text is empty)
    and an image_url part per image."""
    if not image_urls:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts.extend({"type": "image_url", "image_url": {"url": url}} for url in image_urls)
    return parts


def _end_chat_span(span: Any, last: object, error_type: str) -> None:
    """Ends a chat span with the provider's usage and finish reason when the reply was complete (its last
    item is the outcome), else with `error.type`: a ModelErrorKind value, or "cancelled" when the caller
    went away first."""
    if isinstance(last, ModelOutcome):
        span.set_attributes(
            {
                "gen_ai.usage.input_tokens": last.input_tokens,
                "gen_ai.usage.output_tokens": last.output_tokens,
                "gen_ai.response.finish_reasons": (last.finish_reason,),
            }
        )
    else:
        span.set_attribute("error.type", error_type)
        if error_type != "cancelled":
            tracing.mark_error(span)
    span.end()


def price_family(prices: Mapping[str, tuple[float, float]], model: str) -> str | None:
    """The price table's entry for `model`: the longest name it starts with, so that a dated snapshot
    ("gpt-4o-mini-2024-07-18") takes its family's price ("gpt-4o-mini"); None when there is none."""
    matches = [name for name in prices if model.startswith(name)]
    return max(matches, key=len) if matches else None


def cost_usd(prices: Mapping[str, tuple[float, float]], model: str, input_tokens: int, output_tokens: int) -> float:
    """What the tokens of a call to `model` cost in USD by the price table; 0 for a model it does not list."""
    outcome = ModelOutcome(input_tokens=input_tokens, output_tokens=output_tokens)
    return _cost_usd(prices, price_family(prices, model), outcome)


def _cost_usd(prices: Mapping[str, tuple[float, float]], family: str | None, outcome: ModelOutcome) -> float:
    if family is None:
        return 0.0
    input_price, output_price = prices[family]
    return (outcome.input_tokens * input_price + outcome.output_tokens * output_price) / 1_000_000


def _classify(error: openai.APIError) -> ModelError:
    # The SDK reports a refused or timed-out connection as APITimeoutError too (its aiohttp transport
    # raises httpx2.ConnectTimeout for both): a provider that was never reached is unavailable, not slow.
    if isinstance(error, openai.APIConnectionError) and _never_connected(error):
        return ModelError(ModelErrorKind.UNAVAILABLE, "the model provider cannot be reached")
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
            ModelErrorKind.REJECTED,
            f"the model provider rejected the request with HTTP {error.status_code}",
            http_status=error.status_code,
        )
    return ModelError(ModelErrorKind.UNAVAILABLE, "the model stream failed")


def _never_connected(error: BaseException) -> bool:
    """Whether the error's causes say the connection was never made (refused, unresolvable, or timed out
    while connecting)."""
    cause = error.__cause__ or error.__context__
    for _ in range(_MAX_CAUSES):
        if cause is None:
            return False
        if isinstance(cause, httpx2.ConnectError | httpx2.ConnectTimeout | aiohttp.ClientConnectorError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


_MAX_CAUSES = 8


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
