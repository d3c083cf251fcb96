"""The one way chatmesh calls a model: the official `openai` SDK against any OpenAI-compatible API.

The SDK builds and sends the request (base URL, auth, error types). On the streaming path its
typed per-chunk parsing costs about 130 µs a chunk, more than both gRPC hops together, so the raw
streaming response is read and its SSE lines parsed here. Retries are ours rather than the SDK's
because they must stop at the caller's deadline and never repeat a stream that has started.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import httpx2
import openai

from chatmesh.model import metrics
from chatmesh.model.deployments import ANY_MODEL, Deployment, Deployments, ModelRoute, load_deployments
from chatmesh.model.errors import ModelError, ModelErrorKind
from chatmesh.model.pricing import cost_usd, price_family, priced_usd
from chatmesh.model.router import Router, parse_reset
from chatmesh.runtime import tracing
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import ModelSettings

if TYPE_CHECKING:
    import numpy as np

log = get_logger(__name__)

# The SDK's own marker (what `with_streaming_response` sets) for "hand back the response unread", so that
# the body can be read as it streams. The request goes through `client.post` rather than
# `chat.completions.create`, whose typed transform of the request walks every message: 0.2 ms of CPU
# for one message, 2 ms for eleven, for a body that is already plain JSON.
_STREAM_HEADERS = {"X-Stainless-Raw-Response": "stream"}

_DATA_PREFIX = b"data:"
_DONE = b"[DONE]"


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
    # OpenAI's `tools` entries ({"type": "function", "function": {...}}), `tool_choice` ("auto", "none",
    # "required" or {"type": "function", "function": {"name": ...}}) and `parallel_tool_calls`.
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
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
            "tools": self.tools or None,
            "tool_choice": self.tool_choice,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        params.update((name, value) for name, value in optional.items() if value is not None)
        return params


@dataclass(frozen=True, slots=True)
class ModelToolCall:
    """A tool call of the model's answer, whole: its id, the function's name, and the arguments' JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class ModelOutcome:
    """How a streamed reply ended, as the provider reported it, with the tool calls it made (if any)."""

    finish_reason: str = "stop"
    input_tokens: int = 0
    output_tokens: int = 0
    tool_calls: list[ModelToolCall] = field(default_factory=list)
    # Who answered: the model entry, by the name callers use (a fallback model's when it answered; the
    # caller's own name for the "*" entry), and the deployment's name ("default" without a deployments file).
    model: str = ""
    deployment: str = ""


@dataclass(frozen=True, slots=True)
class ModerationResult:
    """The moderation endpoint's judgement of one input: whether it flagged it, the categories it flagged (by
    OpenAI's names, e.g. "self-harm/intent"), sorted, and its score for each category it reported (0 to 1)."""

    flagged: bool
    categories: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class StreamProgress:
    """How far a streamed call got, for accounting when it does not finish: the text chunks received (the
    provider streams about one token per chunk), and its outcome once reported."""

    chunks: int = 0
    text: list[str] = field(default_factory=list)
    outcome: ModelOutcome | None = None
    # Who is answering (see ModelOutcome), set when the first item arrives.
    model: str = ""
    deployment: str = ""


class ModelClient:
    """One per process: the deployments of the model (chatmesh.model.deployments), one SDK client and
    connection pool per deployment, and the router that keeps each deployment's key pool and breaker."""

    def __init__(self, settings: ModelSettings, deployments: Deployments | None = None) -> None:
        self._deployments = deployments or load_deployments(settings)
        self._router = Router(self._deployments)
        self._clients: dict[str, openai.AsyncOpenAI] = {}
        self._attempt_metrics: dict[str, metrics.DeploymentAttempts] = {}
        self._server_attributes: dict[str, dict[str, Any]] = {}
        for deployment in self._deployments.deployments():
            # The key goes in each request's Authorization header (the key pool picks it); the client's own is
            # the deployment's first, used by moderation.
            self._clients[deployment.name] = openai.AsyncOpenAI(
                base_url=deployment.base_url,
                api_key=deployment.keys[0],
                max_retries=0,
                http_client=openai.DefaultAioHttpClient(),
            )
            self._attempt_metrics[deployment.name] = metrics.DeploymentAttempts(deployment.name)
            endpoint = urlsplit(deployment.base_url)
            attributes: dict[str, Any] = {"server.address": endpoint.hostname or ""}
            if endpoint.port is not None:
                attributes["server.port"] = endpoint.port
            self._server_attributes[deployment.name] = attributes
        # Moderation goes to one endpoint, without routing: the default deployment, or with a deployments file
        # the first deployment of its "*" entry (else of its first entry), with that deployment's first key.
        moderation = self._deployments.moderation_deployment()
        self._client = self._clients[moderation.name]
        self._max_attempts = settings.model_max_attempts
        self._backoff_initial = settings.model_backoff_initial_seconds
        self._backoff_max = settings.model_backoff_max_seconds
        self._moderation_model = settings.safety_moderation_model
        self._default_deadline_seconds = settings.default_deadline_seconds
        self._prices = settings.model_prices_usd_per_million
        self._deployment_prices = {
            deployment.name: deployment.price_usd_per_million for deployment in self._deployments.deployments()
        }
        self._metrics = metrics.ModelMetrics(self._prices)

    @property
    def router(self) -> Router:
        return self._router

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    def cost_usd(self, model: str, input_tokens: int, output_tokens: int, deployment: str = "") -> float:
        """What the tokens of a call cost in USD: by the deployment's price when the deployments file gives it
        one, else by the price table for `model`."""
        price = self._deployment_prices.get(deployment)
        if price is not None:
            return priced_usd(price, input_tokens, output_tokens)
        return cost_usd(self._prices, model, input_tokens, output_tokens)

    async def stream_chat(
        self, request: ModelRequest, deadline: float, progress: StreamProgress | None = None
    ) -> AsyncIterator[str | ModelOutcome]:
        """Yields the reply's text deltas as they arrive, then one ModelOutcome; `progress` follows along.

        `deadline` is in `loop.time()` terms. The model's deployments are tried in turn (see `_round`), then its
        fallback models'; when every one was tried and failed, the next round follows exponential backoff with
        jitter (or Retry-After), while the deadline and `model_max_attempts` rounds allow. Once text has been
        yielded nothing is retried or switched: the failure is raised. Closing the iterator closes the HTTP
        stream. A model no entry serves is REJECTED with http_status 404, before any call.

        With tracing on, the whole call (every attempt, and the waits between them) is one CLIENT span
        `chat {model}` under the GenAI semantic conventions; retries are its events, and each attempt's
        HTTP request carries the span's `traceparent`. Nothing is done per delta.
        """
        loop = asyncio.get_running_loop()
        routes = self._router.chain(request.model)
        if routes is None:
            raise ModelError(
                ModelErrorKind.REJECTED,
                f"the model provider has no model {request.model!r}",
                http_status=404,
            )
        params = request.params()
        state = _CallState()
        family = price_family(self._prices, request.model)
        metered = self._metrics.call("chat", family)
        span = self._start_chat_span(request, routes[0].deployments[0].name)
        headers = _STREAM_HEADERS if span is None else {**_STREAM_HEADERS, **tracing.inject_headers(span)}
        error_type = "cancelled"
        rounds = 0
        try:
            while True:
                rounds += 1
                if deadline - loop.time() <= 0:
                    raise state.failure or ModelError(
                        ModelErrorKind.TIMEOUT, "the deadline passed before the model answered"
                    )
                attempted = False
                for route in routes:
                    for deployment in self._router.order(route):
                        attempts = self._deployment_attempts(
                            route, deployment, request, params, headers, deadline, progress, state, metered, span
                        )
                        async with contextlib.aclosing(attempts):
                            async for item in attempts:
                                yield item
                        if state.done:
                            return
                        attempted = attempted or state.attempted
                failure = state.failure
                if not attempted:
                    failure, wait = self._nothing_usable(routes, failure)
                    if not wait:
                        metrics.model_attempt_failed("chat", failure.kind.value, retried=False)
                        raise failure
                assert failure is not None
                await self._wait_to_retry(failure, rounds, deadline, "chat", span)
        except ModelError as error:
            error_type = error.kind.value
            raise
        except Exception as error:
            error_type = type(error).__qualname__
            raise
        finally:
            item = state.last
            if isinstance(item, ModelOutcome):
                cost = self.cost_usd(request.model, item.input_tokens, item.output_tokens, item.deployment)
                metered.completed(item.input_tokens, item.output_tokens, cost)
            else:
                metered.failed(error_type)
            if span is not None:
                _end_chat_span(span, item, error_type)

    async def _deployment_attempts(
        self,
        route: ModelRoute,
        deployment: Deployment,
        request: ModelRequest,
        params: dict[str, Any],
        headers: Mapping[str, str],
        deadline: float,
        progress: StreamProgress | None,
        state: _CallState,
        metered: metrics.ModelCall,
        span: Any,
    ) -> AsyncIterator[str | ModelOutcome]:
        """The attempts of one round at one deployment: with its next usable key, and again with the next one
        after a 429 (the key cools down) or a 401/403 (the key is retired, with a deployments file). Skipped when
        its breaker is open or no key is usable. Sets `state`: done, attempted, and the last failure."""
        loop = asyncio.get_running_loop()
        router = self._router
        breaker = router.breakers[deployment.name]
        pool = router.pools[deployment.name]
        counted = self._attempt_metrics[deployment.name]
        client = self._clients[deployment.name]
        answering = request.model if route.name == ANY_MODEL else route.name
        body = {
            **params,
            "model": deployment.upstream_model or request.model,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        tried_keys: set[int] = set()
        state.attempted = False
        while True:
            if not breaker.allows():
                return
            key_index = pool.pick(tried_keys)
            if key_index is None:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            tried_keys.add(key_index)
            state.attempted = True
            probe = breaker.begin()
            verdict = False
            first_token_timeout = False
            response = None
            limit = deployment.first_token_timeout_seconds
            first_by = None if limit is None or limit >= remaining else loop.time() + limit
            options = {
                "timeout": remaining,
                "headers": {**headers, "Authorization": f"Bearer {pool.key(key_index)}"},
            }
            try:
                try:
                    async with asyncio.timeout_at(first_by):
                        response = await client.post(
                            "/chat/completions", cast_to=httpx2.Response, body=body, options=options
                        )
                        items = _parse_sse(response.aiter_bytes())
                        item = await anext(items)
                    if progress is not None:
                        progress.model = answering
                        progress.deployment = deployment.name
                    while True:
                        if item.__class__ is str:
                            if progress is not None:
                                progress.chunks += 1
                                progress.text.append(item)
                            if not state.text_sent:
                                metered.first_token()
                                if span is not None:
                                    span.add_event("gen_ai.first_chunk", {"deployment": deployment.name})
                        else:
                            item.model = answering
                            item.deployment = deployment.name
                            if progress is not None:
                                progress.outcome = item
                            verdict = True
                            breaker.success(probe)
                            counted.attempt("ok")
                            state.done = True
                        state.text_sent = True
                        state.last = item
                        yield item
                        if state.done:
                            return
                        item = await anext(items)
                except TimeoutError:
                    if first_by is None or loop.time() >= deadline:
                        raise
                    first_token_timeout = True
                    failure = ModelError(
                        ModelErrorKind.TIMEOUT, "the model deployment sent nothing within its first-token timeout"
                    )
                except StopAsyncIteration:  # cannot happen: the parser ends with an outcome or raises
                    failure = ModelError(ModelErrorKind.UNAVAILABLE, "the model stream ended early")
                except openai.APIError as error:
                    failure = _classify(error)
                except (httpx2.HTTPError, aiohttp.ClientError):
                    failure = ModelError(ModelErrorKind.UNAVAILABLE, "the model stream broke off")
                except ModelError as error:  # the stream's own data: malformed, or an error event
                    failure = error
            finally:
                if response is not None:
                    await response.aclose()
                if not verdict and not state.done:
                    breaker.release(probe)  # cancelled, or about to be judged below
            outcome = _attempt_outcome(failure, first_token_timeout)
            counted.attempt(outcome)
            state.failure = failure
            if outcome == "rate_limited":
                pool.cool(key_index, failure.retry_after)
                breaker.release(probe)
            elif outcome == "unauthorized" and self._deployments.from_file:
                router.retire_key(deployment, key_index, failure.http_status)
                breaker.release(probe)
            elif outcome in ("rejected", "unauthorized"):
                breaker.success(probe)  # the deployment answered: the request (or, without a file, the key) is wrong
                metrics.model_attempt_failed("chat", failure.kind.value, retried=False)
                raise failure
            else:
                breaker.failure(probe)
            if state.text_sent:
                metrics.model_attempt_failed("chat", failure.kind.value, retried=False)
                raise failure
            log.warning(
                "model_attempt_failed",
                extra={"deployment": deployment.name, "key_index": key_index, "outcome": outcome},
            )
            if outcome not in ("rate_limited", "unauthorized"):
                return  # a deployment failure: the next deployment, not the next key

    def _nothing_usable(self, routes: list[ModelRoute], failure: ModelError | None) -> tuple[ModelError, bool]:
        """When a round found no deployment it could try: (the failure, whether to wait and try again). Keys that
        cool down are waited for (the wait is the next round's); when every breaker is open or every key retired,
        the call fails at once, with this call's last failure, or else REJECTED (401) when every key was refused,
        or UNAVAILABLE saying when a probe is due."""
        router = self._router
        now = router.now()
        cooling = router.cooling_until(routes)
        if cooling is not None:
            detail = "every key of the model's deployments is cooling down after a rate limit"
            return ModelError(ModelErrorKind.RATE_LIMITED, detail, max(cooling - now, 0.0)), True
        if failure is not None:
            return failure, False
        pools = [router.pools[deployment.name] for route in routes for deployment in route.deployments]
        if all(pool.all_retired() for pool in pools):
            detail = "the model provider refused every API key of the model's deployments"
            return ModelError(ModelErrorKind.REJECTED, detail, http_status=401), False
        probe_at = router.open_until(routes)
        retry_after = None if probe_at is None else max(probe_at - now, 0.0)
        detail = f"no healthy deployment of model {routes[0].name!r} (every circuit breaker is open)"
        return ModelError(ModelErrorKind.UNAVAILABLE, detail, retry_after), False

    def record_unfinished(self, model: str, input_tokens: int, output_tokens: int, deployment: str = "") -> None:
        """Counts the tokens and cost of a chat call that ended without the provider's usage (cancelled by the
        caller, cut by its deadline, or blocked by the output screen), as its caller counted them."""
        family = price_family(self._prices, model)
        self._metrics.call("chat", family).tokens(
            input_tokens, output_tokens, self.cost_usd(model, input_tokens, output_tokens, deployment)
        )

    def _start_chat_span(self, request: ModelRequest, deployment: str) -> Any:
        """The GenAI CLIENT span of a chat call, or None when tracing is off."""
        if not tracing.tracing_enabled():
            return None
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": request.model,
            **self._server_attributes[deployment],
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
    ) -> ModerationResult:
        """Asks the provider's /v1/moderations whether `text` is flagged, for which categories, and with what
        scores. With
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

    async def embed(self, texts: Sequence[str], *, model: str, dimensions: int, deadline: float) -> list[np.ndarray]:
        """The provider's embeddings of `texts` through the SDK's embeddings call, at the endpoint moderation uses:
        one float32 vector each, in order, scaled to unit length. `dimensions` 0 asks for the model's own.

        One attempt before `deadline` (in `loop.time()` terms), never retried: its callers (a cache lookup) would
        rather miss. Raises ModelError.
        """
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise ModelError(ModelErrorKind.TIMEOUT, "the deadline passed before the embedding request was sent")
        metered = self._metrics.call("embedding", price_family(self._prices, model))
        try:
            response = await self._client.embeddings.create(
                input=list(texts),
                model=model,
                dimensions=dimensions or openai.omit,
                # Asked for explicitly, the SDK hands the base64 text over as it came: decoded here by numpy,
                # without a list of Python floats in between.
                encoding_format="base64",
                timeout=remaining,
            )
        except openai.APIError as error:
            failure = _classify(error)
        except (httpx2.HTTPError, aiohttp.ClientError):
            failure = ModelError(ModelErrorKind.UNAVAILABLE, "the embedding request broke off")
        except BaseException as error:
            metered.failed("cancelled" if isinstance(error, asyncio.CancelledError) else type(error).__qualname__)
            raise
        else:
            input_tokens = response.usage.prompt_tokens if response.usage is not None else 0
            metered.completed(input_tokens, 0, self.cost_usd(model, input_tokens, 0))
            return [_unit_vector(item.embedding) for item in sorted(response.data, key=lambda item: item.index)]
        metered.failed(failure.kind.value)
        raise failure

    async def _moderate(self, moderation: str | list[dict[str, Any]], deadline: float | None) -> ModerationResult:
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


def _unit_vector(embedding: str | Sequence[float]) -> np.ndarray:
    """An embedding as the provider sent it (base64 of little-endian float32s, or floats) as a unit float32 vector;
    all zeros stays all zeros."""
    # Imported here: safety and the gateway use this module without embeddings, and numpy costs them 10 MiB.
    import numpy as np

    if isinstance(embedding, str):
        vector = np.frombuffer(base64.b64decode(embedding), dtype="<f4").astype(np.float32)
    else:
        vector = np.asarray(embedding, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


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
            ModelErrorKind.RATE_LIMITED,
            "the model provider is rate limiting",
            _rate_limit_reset(error.response),
            http_status=429,
        )
    if isinstance(error, openai.APIStatusError):
        if error.status_code in (408, 409):  # retried, as the SDK retries them
            return ModelError(
                ModelErrorKind.UNAVAILABLE,
                f"the model provider answered HTTP {error.status_code}",
                _retry_after(error.response),
                http_status=error.status_code,
            )
        if error.status_code >= 500:
            return ModelError(
                ModelErrorKind.UNAVAILABLE,
                f"the model provider failed with HTTP {error.status_code}",
                _retry_after(error.response),
                http_status=error.status_code,
            )
        return ModelError(
            ModelErrorKind.REJECTED,
            f"the model provider rejected the request with HTTP {error.status_code}",
            http_status=error.status_code,
        )
    return ModelError(ModelErrorKind.UNAVAILABLE, "the model stream failed")


@dataclass(slots=True)
class _CallState:
    """What the attempts of one stream_chat call share."""

    done: bool = False
    attempted: bool = False
    text_sent: bool = False
    failure: ModelError | None = None
    last: str | ModelOutcome | None = None


def _attempt_outcome(failure: ModelError, first_token_timeout: bool) -> str:
    """The `outcome` label of a failed attempt (metrics.DEPLOYMENT_ATTEMPT_OUTCOMES)."""
    if first_token_timeout:
        return "first_token_timeout"
    if failure.kind is ModelErrorKind.RATE_LIMITED:
        return "rate_limited"
    if failure.kind is ModelErrorKind.REJECTED:
        return "unauthorized" if failure.http_status in (401, 403) else "rejected"
    if failure.kind is ModelErrorKind.TIMEOUT:
        return "timeout"
    return "server_error" if failure.http_status is not None else "connection_error"


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


def _moderation_verdict(response: Any) -> ModerationResult:
    """The first result (a provider that sends no scores gives none)."""
    try:
        result = response.results[0]
        categories = result.categories.model_dump(by_alias=True)
        flagged = sorted(name for name, value in categories.items() if value is True)
        scores_model = getattr(result, "category_scores", None)
        reported = scores_model.model_dump(by_alias=True) if scores_model is not None else {}
        scores = {name: float(score) for name, score in reported.items() if isinstance(score, int | float)}
        return ModerationResult(bool(result.flagged) or bool(flagged), flagged, scores)
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


def _rate_limit_reset(response: Any) -> float | None:
    """When a rate-limited key may be used again: Retry-After, else the later of OpenAI's
    `x-ratelimit-reset-requests` and `x-ratelimit-reset-tokens` ("1s", "6m0s", "20ms")."""
    seconds = _retry_after(response)
    if seconds is not None:
        return seconds
    resets = [parse_reset(response.headers.get(f"x-ratelimit-reset-{kind}")) for kind in ("requests", "tokens")]
    known = [reset for reset in resets if reset is not None and reset <= 600]
    return max(known) if known else None


async def _parse_sse(chunks: AsyncIterator[bytes]) -> AsyncIterator[str | ModelOutcome]:
    """Parses OpenAI's chat-completion SSE stream: `data: {json}` lines, ended by `data: [DONE]`. Text is
    yielded as it comes; tool calls, which arrive in pieces (the id and name first, then the arguments a few
    characters at a time, each piece naming its call's index), are assembled into the outcome."""
    outcome = ModelOutcome()
    tool_calls: dict[int, _ToolCallParts] = {}
    pending = b""
    async for chunk in chunks:
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if not line.startswith(_DATA_PREFIX):
                continue
            payload = line[len(_DATA_PREFIX) :].strip()
            if payload == _DONE:
                outcome.tool_calls = [parts.call() for _, parts in sorted(tool_calls.items())]
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
                delta = choice.get("delta") or {}
                text = delta.get("content")
                if text:
                    yield text
                for piece in delta.get("tool_calls") or ():
                    _add_tool_call_piece(tool_calls, piece)
                if choice.get("finish_reason"):
                    outcome.finish_reason = choice["finish_reason"]
    raise ModelError(ModelErrorKind.UNAVAILABLE, "the model stream ended before [DONE]")


@dataclass(slots=True)
class _ToolCallParts:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def call(self) -> ModelToolCall:
        if not self.id or not self.name:
            raise ModelError(ModelErrorKind.UNAVAILABLE, "the model stream sent a tool call without an id or name")
        return ModelToolCall(self.id, self.name, "".join(self.arguments))


def _add_tool_call_piece(calls: dict[int, _ToolCallParts], piece: Any) -> None:
    try:
        parts = calls.setdefault(int(piece.get("index", 0)), _ToolCallParts())
        function = piece.get("function") or {}
        parts.id = piece.get("id") or parts.id
        parts.name = function.get("name") or parts.name
        arguments = function.get("arguments")
    except (AttributeError, TypeError, ValueError):
        raise ModelError(ModelErrorKind.UNAVAILABLE, "the model stream sent a malformed tool call") from None
    if arguments:
        parts.arguments.append(str(arguments))
