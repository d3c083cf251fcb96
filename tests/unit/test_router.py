"""The model router over real HTTP: several modelsim deployments on loopback, key pools, breakers, fallback."""

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from chatmesh.model.client import ModelClient, ModelOutcome, ModelRequest, StreamProgress
from chatmesh.model.deployments import BreakerSpec, parse_deployments
from chatmesh.model.errors import ModelError, ModelErrorKind
from chatmesh.model.router import BreakerState, CircuitBreaker, KeyState, parse_reset
from chatmesh.modelsim.server import SimConfig, build_app
from chatmesh.runtime.settings import ModelSettings


@dataclass
class Upstream:
    """A modelsim deployment, with per-key faults that modelsim itself does not have: keys refused with 401,
    keys rate limited (429 with OpenAI's x-ratelimit-reset-requests), and every bearer key seen."""

    name: str
    config: SimConfig
    base_url: str = ""
    unauthorized: set[str] = field(default_factory=set)
    rate_limited: set[str] = field(default_factory=set)
    keys_seen: list[str] = field(default_factory=list)
    models_seen: list[str] = field(default_factory=list)


def _middleware(upstream: Upstream) -> Any:
    @web.middleware
    async def per_key(request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.path.endswith("/chat/completions"):
            key = request.headers.get("Authorization", "").removeprefix("Bearer ")
            upstream.keys_seen.append(key)
            upstream.models_seen.append((await request.json())["model"])
            if key in upstream.unauthorized:
                return web.json_response({"error": {"message": "bad key", "code": "invalid_api_key"}}, status=401)
            if key in upstream.rate_limited:
                return web.json_response(
                    {"error": {"message": "slow down", "type": "rate_limit_error"}},
                    status=429,
                    headers={"x-ratelimit-reset-requests": "6m0s"},
                )
        return await handler(request)

    return per_key


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def start(name: str, **config: Any) -> Upstream:
        upstream = Upstream(name, SimConfig(reply_tokens=5, **config))
        app = build_app(upstream.config)
        app.middlewares.append(_middleware(upstream))
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        upstream.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        return upstream

    yield start
    for runner in runners:
        await runner.cleanup()


ENV = {f"KEY_{index}": f"key-{index}" for index in range(4)}
SETTINGS = ModelSettings(model_backoff_initial_seconds=0.01, model_backoff_max_seconds=0.05)


def deployment(upstream: Upstream, keys: int = 1, **fields: Any) -> dict[str, Any]:
    return {
        "name": upstream.name,
        "base_url": upstream.base_url,
        "keys": [{"env": f"KEY_{index}"} for index in range(keys)],
        **fields,
    }


def client(models: dict[str, Any], **breaker: Any) -> ModelClient:
    document = {"models": models, "breaker": {**BreakerSpec().model_dump(), **breaker}}
    return ModelClient(SETTINGS, parse_deployments(document, SETTINGS, ENV))


async def chat(model_client: ModelClient, model: str = "gpt-4o-mini", seconds: float = 10, **kw: Any) -> ModelOutcome:
    deadline = asyncio.get_running_loop().time() + seconds
    request = ModelRequest(model=model, messages=[{"role": "user", "content": "hi"}])
    items = [item async for item in model_client.stream_chat(request, deadline, **kw)]
    assert isinstance(items[-1], ModelOutcome) and "".join(items[:-1])
    return items[-1]


async def test_calls_spread_over_a_deployments_keys(upstreams):
    a = await upstreams("a")
    model = client({"gpt-4o-mini": {"deployments": [deployment(a, keys=3)]}})
    try:
        for _ in range(6):
            outcome = await chat(model)
        assert (outcome.model, outcome.deployment) == ("gpt-4o-mini", "a")
        assert sorted(a.keys_seen) == ["key-0", "key-0", "key-1", "key-1", "key-2", "key-2"]
    finally:
        await model.close()


async def test_a_429_cools_only_that_key(upstreams):
    a = await upstreams("a")
    a.rate_limited.add("key-1")
    model = client({"gpt-4o-mini": {"deployments": [deployment(a, keys=3)]}})
    try:
        for _ in range(6):
            await chat(model)
        pool = model.router.pools["a"]
        assert [pool.state(index) for index in range(3)] == [KeyState.USABLE, KeyState.COOLING, KeyState.USABLE]
        # One 429, then key-1 rests for its x-ratelimit-reset-requests (6m0s) while the others carry every call.
        assert a.keys_seen.count("key-1") == 1
        assert a.keys_seen.count("key-0") + a.keys_seen.count("key-2") == 6
    finally:
        await model.close()


async def test_a_401_retires_the_key_and_the_others_carry_on(upstreams, caplog: pytest.LogCaptureFixture):
    a = await upstreams("a")
    a.unauthorized.add("key-0")
    model = client({"gpt-4o-mini": {"deployments": [deployment(a, keys=2)]}})
    try:
        for _ in range(4):
            await chat(model)
        assert model.router.pools["a"].state(0) is KeyState.RETIRED
        assert a.keys_seen.count("key-0") == 1 and a.keys_seen.count("key-1") == 4
        retired = [record for record in caplog.records if record.getMessage() == "model_key_retired"]
        assert len(retired) == 1 and retired[0].key_index == 0 and retired[0].deployment == "a"
        assert "key-0" not in caplog.text
    finally:
        await model.close()


async def test_when_every_key_is_refused_the_call_is_rejected_as_unauthorized(upstreams):
    a = await upstreams("a")
    a.unauthorized.update({"key-0", "key-1"})
    model = client({"gpt-4o-mini": {"deployments": [deployment(a, keys=2)]}})
    try:
        for _ in range(2):  # the second call sends nothing: both keys are retired
            with pytest.raises(ModelError) as failure:
                await chat(model)
            assert failure.value.kind is ModelErrorKind.REJECTED and failure.value.http_status == 401
        assert len(a.keys_seen) == 2
    finally:
        await model.close()


async def test_a_deployment_that_goes_down_opens_its_breaker_and_closes_after_it_recovers(upstreams):
    a = await upstreams("a", error_500_rate=1.0)
    b = await upstreams("b")
    models = {"gpt-4o-mini": {"deployments": [deployment(a, weight=1e9), deployment(b, weight=1e-9)]}}
    model = client(models, window=4, min_calls=3, failure_rate=0.5, open_seconds=0.3)
    try:
        for _ in range(8):
            assert (await chat(model)).deployment == "b"
        # Opened after min_calls failures; the later calls went straight to b.
        assert len(a.keys_seen) == 3 and len(b.keys_seen) == 8
        breaker = model.router.breakers["a"]
        assert breaker.state is BreakerState.OPEN

        a.config.error_500_rate = 0.0
        started = time.monotonic()
        while breaker.state is not BreakerState.HALF_OPEN:  # open_seconds later, a probe is due
            assert time.monotonic() - started < 5
            await asyncio.sleep(0.05)
        assert (await chat(model)).deployment == "a"  # the probe succeeded
        assert breaker.state is BreakerState.CLOSED
    finally:
        await model.close()


async def test_a_hung_deployment_is_abandoned_at_its_first_token_timeout(upstreams):
    a = await upstreams("a", first_token_latency_seconds=30)
    b = await upstreams("b")
    models = {
        "gpt-4o-mini": {
            "deployments": [deployment(a, weight=1e9, first_token_timeout_seconds=0.3), deployment(b, weight=1e-9)]
        }
    }
    model = client(models)
    try:
        started = time.monotonic()
        outcome = await chat(model, seconds=10)
        assert outcome.deployment == "b" and time.monotonic() - started < 5
        assert len(a.keys_seen) == 1
    finally:
        await model.close()


async def test_the_fallback_model_answers_when_every_deployment_failed(upstreams):
    a = await upstreams("a", error_500_rate=1.0)
    b = await upstreams("b")
    models = {
        "gpt-4o-mini": {"fallback_model": "gpt-4o", "deployments": [deployment(a)]},
        "gpt-4o": {"deployments": [deployment(b)]},
    }
    model = client(models)
    progress = StreamProgress()
    try:
        outcome = await chat(model, progress=progress)
        assert (outcome.model, outcome.deployment) == ("gpt-4o", "b")
        assert (progress.model, progress.deployment) == ("gpt-4o", "b")
        assert a.models_seen == ["gpt-4o-mini"] and b.models_seen == ["gpt-4o"]
    finally:
        await model.close()


async def test_once_text_reached_the_caller_a_broken_stream_raises_and_nothing_else_is_tried(upstreams):
    async def breaks_off(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n')
        return response  # ends without [DONE]

    app = web.Application()
    app.router.add_post("/v1/chat/completions", breaks_off)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    broken = Upstream("broken", SimConfig(), base_url=f"http://127.0.0.1:{runner.addresses[0][1]}/v1")
    b = await upstreams("b")
    models = {"gpt-4o-mini": {"deployments": [deployment(broken, weight=1e9), deployment(b, weight=1e-9)]}}
    model = client(models)
    progress = StreamProgress()
    try:
        with pytest.raises(ModelError, match="before \\[DONE\\]"):
            await chat(model, progress=progress)
        assert progress.text == ["Hel"] and progress.deployment == "broken"
        assert b.keys_seen == []
    finally:
        await model.close()
        await runner.cleanup()


async def test_a_model_no_entry_serves_is_rejected_as_unknown(upstreams):
    a = await upstreams("a")
    model = client({"gpt-4o-mini": {"deployments": [deployment(a)]}})
    try:
        with pytest.raises(ModelError) as failure:
            await chat(model, model="gpt-9")
        assert failure.value.kind is ModelErrorKind.REJECTED and failure.value.http_status == 404
    finally:
        await model.close()


async def test_a_star_entry_sends_the_callers_model_name(upstreams):
    a = await upstreams("a")
    model = client({"*": {"deployments": [deployment(a)]}})
    try:
        outcome = await chat(model, model="gpt-4.1-mini")
        assert outcome.model == "gpt-4.1-mini" and a.models_seen == ["gpt-4.1-mini"]
    finally:
        await model.close()


async def test_the_gauges_show_breakers_and_keys(upstreams):
    a = await upstreams("a")
    a.unauthorized.add("key-1")
    model = client({"gpt-4o-mini": {"deployments": [deployment(a, keys=2)]}})
    try:
        for _ in range(2):
            await chat(model)
        assert REGISTRY.get_sample_value("chatmesh_model_key_state", {"deployment": "a", "key": "1"}) == 2
        assert REGISTRY.get_sample_value("chatmesh_model_key_state", {"deployment": "a", "key": "0"}) == 0
        assert REGISTRY.get_sample_value("chatmesh_model_breaker_state", {"deployment": "a"}) == 0
        assert REGISTRY.get_sample_value("chatmesh_model_healthy_deployments", {"model": "gpt-4o-mini"}) == 1
        labels = {"deployment": "a", "outcome": "unauthorized"}
        assert REGISTRY.get_sample_value("chatmesh_model_deployment_attempts_total", labels) >= 1
    finally:
        await model.close()


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("2", 2.0), ("soon", None), ("", None)],
)
def test_rate_limit_reset_headers_are_read(header: str, seconds: float | None):
    assert parse_reset(header) == seconds


def test_a_breaker_opens_at_its_failure_rate_and_lets_one_probe_through():
    now = [0.0]
    breaker = CircuitBreaker("d", BreakerSpec(window=4, min_calls=4, failure_rate=0.5, open_seconds=10), lambda: now[0])
    breaker.failure(False)
    breaker.success(False)
    breaker.success(False)
    assert breaker.state is BreakerState.CLOSED  # fewer than min_calls
    breaker.failure(False)
    assert breaker.state is BreakerState.OPEN and not breaker.allows()
    now[0] = 10.0
    assert breaker.allows() and breaker.begin()  # the probe
    assert not breaker.allows()  # only one at a time
    breaker.failure(True)
    assert breaker.state is BreakerState.OPEN
    now[0] = 20.0
    probe = breaker.begin()
    breaker.success(probe)
    assert breaker.state is BreakerState.CLOSED and breaker.allows()
