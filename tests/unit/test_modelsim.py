"""modelsim, served in-process on a free port and spoken to with the real openai SDK."""

import asyncio
import base64
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion
from pydantic import ValidationError
from support.images import gif, jpeg, png

from chatmesh.dialogue.tokens import TokenCounter
from chatmesh.modelsim.server import HANG, SimConfig, Simulator, _duration, build_app
from chatmesh.runtime.settings import ModelsimSettings

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about the weather today"},
]


@dataclass
class Sim:
    base_url: str
    config: SimConfig
    http: aiohttp.ClientSession
    client: openai.AsyncOpenAI

    async def get(self, path: str) -> dict:
        async with self.http.get(f"{self.base_url}{path}") as response:
            assert response.status == 200
            return await response.json()

    async def post(self, path: str, body: dict) -> dict:
        async with self.http.post(f"{self.base_url}{path}", json=body) as response:
            assert response.status == 200
            return await response.json()


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    config = SimConfig()
    runner = web.AppRunner(build_app(config))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)
    http = aiohttp.ClientSession()
    try:
        yield Sim(base_url, config, http, client)
    finally:
        await client.close()
        await http.close()
        await runner.cleanup()


async def _stats_when(sim: Sim, done: Callable[[dict], bool]) -> dict:
    """Poll /sim/stats, at most 100 times 20 ms, until done(stats)."""
    for _ in range(100):
        stats = await sim.get("/sim/stats")
        if done(stats):
            return stats
        await asyncio.sleep(0.02)
    raise AssertionError(f"stats never got there: {stats}")


async def test_non_stream_reply_and_usage(sim: Sim) -> None:
    completion = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    words = choice.message.content.split(" ")
    assert words[0] == "" and len(words) == 51
    # Counted as chatmesh counts a window: gpt-4o-mini's encoding (o200k_base), by the cookbook's chat rule.
    assert completion.usage.prompt_tokens == TokenCounter().count_messages("gpt-4o-mini", MESSAGES) == 21
    assert completion.usage.completion_tokens == 50
    assert completion.usage.total_tokens == 71


async def test_stream_matches_non_stream_and_ends_with_usage(sim: Sim) -> None:
    request = {"model": "modelsim-1", "messages": MESSAGES, "seed": 7}
    whole = await sim.client.chat.completions.create(**request)

    stream = await sim.client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])


async def test_stream_without_include_usage_has_no_usage_chunk(sim: Sim) -> None:
    stream = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]

    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(chunks) == 52


async def test_stream_with_latency_matches_non_stream(sim: Sim) -> None:
    await sim.post("/sim/config", {"first_token_latency_seconds": 0.01, "token_delay_seconds": 0.001})
    whole = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    stream = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)

    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

    assert text == whole.choices[0].message.content
    assert (await sim.get("/sim/stats"))["streams_completed"] == 1


async def test_reply_is_deterministic(sim: Sim) -> None:
    async def reply(messages: list[dict], seed: int | None = None) -> str:
        completion = await sim.client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, seed=seed, temperature=0.7
        )
        return completion.choices[0].message.content

    first = await reply(MESSAGES)
    assert await reply(MESSAGES) == first
    assert await reply([*MESSAGES[:1], {"role": "user", "content": "Something else"}]) != first
    assert await reply(MESSAGES, seed=1) != first


async def test_max_tokens_truncates_with_finish_reason_length(sim: Sim) -> None:
    whole = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    short = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    newer = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_completion_tokens=60)

    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 5
    assert whole.choices[0].message.content.startswith(short.choices[0].message.content)
    assert newer.choices[0].finish_reason == "stop"
    assert newer.usage.completion_tokens == 50


async def test_stop_sequence_cuts_the_reply(sim: Sim) -> None:
    whole = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    words = whole.choices[0].message.content.split(" ")

    cut = await sim.client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=5, stop=[f" {words[3]}"]
    )

    assert cut.choices[0].finish_reason == "stop"
    assert whole.choices[0].message.content.startswith(cut.choices[0].message.content)
    assert cut.usage.completion_tokens < 5


async def test_queued_429_raises_rate_limit_error_with_retry_after(sim: Sim) -> None:
    assert await sim.post("/sim/faults", {"status": 429, "count": 1, "retry_after": 1.5}) == {"queued": 1}

    with pytest.raises(openai.RateLimitError) as caught:
        await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.response.headers["retry-after-ms"] == "1500"
    assert caught.value.type == "rate_limit_error"
    completion = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.choices[0].finish_reason == "stop"
    stats = await sim.get("/sim/stats")
    assert (stats["requests"], stats["errors_injected"]) == (2, 1)


async def test_queued_500_raises_internal_server_error(sim: Sim) -> None:
    await sim.post("/sim/faults", {"status": 500, "count": 2})

    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as caught:
            await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        assert caught.value.type == "server_error"
    await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def test_error_rate_injects_faults(sim: Sim) -> None:
    config = await sim.post("/sim/config", {"error_500_rate": 1.0})
    assert config["error_500_rate"] == 1.0 and sim.config.error_500_rate == 1.0

    with pytest.raises(openai.InternalServerError):
        await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    sim.config.error_500_rate = 0.0
    sim.config.error_429_rate = 1.0
    with pytest.raises(openai.RateLimitError) as caught:
        await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.response.headers["retry-after"] == "1"


async def test_stream_closed_early_is_counted_and_gauge_returns_to_zero(sim: Sim) -> None:
    sim.config.token_delay_seconds = 0.05
    stream = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    received = [await anext(stream) for _ in range(3)]
    assert received[0].choices[0].delta.role == "assistant"
    assert (await sim.get("/sim/stats"))["streams_open"] == 1

    await stream.close()

    stats = await _stats_when(sim, lambda stats: stats["streams_open"] == 0)
    assert (stats["streams_cancelled"], stats["streams_completed"]) == (1, 0)


async def test_stats_request_log_and_reset(sim: Sim) -> None:
    for content in ("one", "two", "three"):
        await sim.client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": content}])
    stream = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    [chunk async for chunk in stream]

    assert await sim.get("/sim/stats") == {
        "requests": 4,
        "streams_open": 0,
        "streams_completed": 1,
        "streams_cancelled": 0,
        "errors_injected": 0,
        "moderation_requests": 0,
        "embedding_requests": 0,
        "moderation_errors_injected": 0,
        "hangs": 0,
        "hangs_open": 0,
        "requests_by_key": {"x": 4},
    }
    logged = (await sim.get("/sim/requests?limit=2"))["requests"]
    assert [body["messages"][-1]["content"] for body in logged] == ["three", MESSAGES[-1]["content"]]
    assert logged[-1]["stream"] is True

    await sim.post("/sim/faults", {"status": 429, "count": 3})
    await sim.post("/sim/reset", {})

    assert (await sim.get("/sim/stats"))["requests"] == 0
    assert (await sim.get("/sim/requests"))["requests"] == []
    await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def test_models_lists_known_ids(sim: Sim) -> None:
    ids = [model.id async for model in sim.client.models.list()]

    assert {"gpt-4o-mini", "modelsim-1"} <= set(ids)


async def test_missing_auth_is_401_in_openai_shape(sim: Sim) -> None:
    url = f"{sim.base_url}/v1/chat/completions"
    async with sim.http.post(url, json={"model": "gpt-4o-mini", "messages": MESSAGES}) as response:
        assert response.status == 401
        body = await response.json()

    assert body["error"]["code"] == "invalid_api_key"
    assert set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("body", "param"),
    [({"model": "gpt-4o-mini"}, "messages"), ({"messages": MESSAGES}, "model"), ([1], None)],
)
async def test_invalid_body_is_400_in_openai_shape(sim: Sim, body: object, param: str | None) -> None:
    url = f"{sim.base_url}/v1/chat/completions"
    async with sim.http.post(url, json=body, headers={"Authorization": "Bearer x"}) as response:
        assert response.status == 400
        error = (await response.json())["error"]

    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


async def test_sim_config_rejects_unknown_fields(sim: Sim) -> None:
    async with sim.http.post(f"{sim.base_url}/sim/config", json={"reply_tokens": -1}) as response:
        assert response.status == 400
    async with sim.http.post(f"{sim.base_url}/sim/config", json={"nope": 1}) as response:
        assert response.status == 400

    assert (await sim.post("/sim/config", {"reply_tokens": 3}))["reply_tokens"] == 3
    completion = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.usage.completion_tokens == 3


async def test_main_logs_listening_and_exits_0_on_sigterm() -> None:
    env = {**os.environ, "CHATMESH_MODELSIM_PORT": "0"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatmesh.modelsim.server", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        line = await asyncio.wait_for(process.stderr.readline(), timeout=30)
        event = json.loads(line)
        assert (event["service"], event["event"]) == ("modelsim", "listening")
        assert event["port"] > 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0


def data_url(data: bytes, mime_type: str = "image/png") -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode()}"


def image_message(*urls: str, detail: str = "auto") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url, "detail": detail}} for url in urls]
    return [{"role": "user", "content": [{"type": "text", "text": "Tell me about the weather today"}, *parts]}]


async def test_images_are_billed_by_openais_rule(sim: Sim) -> None:
    text_only = await sim.client.chat.completions.create(model="gpt-4o", messages=image_message())
    base = text_only.usage.prompt_tokens

    async def prompt_tokens(*urls: str, detail: str = "auto", model: str = "gpt-4o") -> int:
        reply = await sim.client.chat.completions.create(model=model, messages=image_message(*urls, detail=detail))
        return reply.usage.prompt_tokens

    # 1024 x 1024 at high detail: scaled to 768 x 768, 4 tiles: 85 + 4 x 170.
    assert await prompt_tokens(data_url(png(1024, 1024))) == base + 765
    assert await prompt_tokens(data_url(png(1024, 1024)), detail="low") == base + 85
    assert await prompt_tokens(data_url(gif(2048, 4096), "image/gif")) == base + 1105
    assert await prompt_tokens(data_url(png(10, 10)), data_url(png(10, 10))) == base + 2 * 255
    # gpt-4o-mini's rates; an https image, not fetched, as the most a high-detail image costs (8 tiles).
    assert await prompt_tokens(data_url(png(10, 10)), model="gpt-4o-mini") == base + 2833 + 5667
    assert await prompt_tokens("https://example.com/a.png") == base + 85 + 8 * 170


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([], "messages[0].content"),
        ([{"type": "audio"}], "messages[0].content[0].type"),
        ([{"type": "text"}], "messages[0].content[0].text"),
        ([{"type": "image_url"}], "messages[0].content[0].image_url"),
        (
            [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}],
            "messages[0].content[0].image_url.url",
        ),
        (
            [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}],
            "messages[0].content[0].image_url.url",
        ),
        (
            [{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AAAA"}}],
            "messages[0].content[0].image_url.url",
        ),
        ([{"type": "image_url", "image_url": {"url": data_url(jpeg())}}], "messages[0].content[0].image_url.url"),
        (
            [{"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "max"}}],
            "messages[0].content[0].image_url.detail",
        ),
    ],
)
async def test_a_malformed_content_part_is_400_in_openai_shape(sim: Sim, content: list, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await sim.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": content}])

    assert raised.value.body["param"] == param
    assert raised.value.body["type"] == "invalid_request_error"


async def test_only_a_user_message_may_hold_images(sim: Sim) -> None:
    content = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
    with pytest.raises(openai.BadRequestError) as raised:
        await sim.client.chat.completions.create(model="gpt-4o", messages=[{"role": "system", "content": content}])

    assert raised.value.body["param"] == "messages[0].content[0].type"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_object"}}, "messages"),  # no "json" in the messages
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
            "response_format.json_schema.name",
        ),
        ({"user": 5}, "user"),
    ],
)
async def test_bad_options_are_400(sim: Sim, options: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await sim.client.chat.completions.create(model="gpt-4o", messages=MESSAGES, **options)

    assert raised.value.body["param"] == param


async def test_the_new_options_are_accepted_and_logged_with_long_images_summarized(sim: Sim) -> None:
    big = png(400, 400) + bytes(4000)
    options = {
        "logit_bias": {"50256": -100},
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": True}},
        "user": "0123456789abcdef",
    }
    await sim.client.chat.completions.create(
        model="gpt-4o", messages=image_message(data_url(png()), data_url(big)), **options
    )

    logged = (await sim.get("/sim/requests?limit=1"))["requests"][-1]
    assert {name: logged[name] for name in options} == options
    small, summarized = (part["image_url"]["url"] for part in logged["messages"][0]["content"][1:])
    assert small == data_url(png())
    assert summarized.startswith(data_url(big)[:64]) and f"[{len(data_url(big))} characters, sha256 " in summarized


async def test_moderation_judges_text_and_image_parts_together(sim: Sim) -> None:
    clean = await sim.client.moderations.create(
        input=[
            {"type": "text", "text": "hello"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        ]
    )
    flagged = await sim.client.moderations.create(
        input=[{"type": "image_url", "image_url": {"url": "https://example.com/simflag.png"}}]
    )

    assert len(clean.results) == 1 and not clean.results[0].flagged
    assert clean.results[0].category_applied_input_types.harassment == ["text", "image"]
    assert flagged.results[0].flagged
    logged = (await sim.get("/sim/moderations"))["requests"]
    assert [body["input"][-1]["image_url"]["url"] for body in logged] == [
        "https://example.com/cat.png",
        "https://example.com/simflag.png",
    ]
    async with sim.http.post(
        f"{sim.base_url}/v1/moderations",
        json={"input": [{"type": "image_url", "image_url": {}}]},
        headers={"Authorization": "Bearer x"},
    ) as response:
        assert response.status == 400


# Several deployments, hangs and per-key behaviour (issue 14).


async def _chat(sim: Sim, key: str = "x", **options: object) -> openai.types.chat.ChatCompletion:
    client = sim.client.with_options(api_key=key, **options)
    return await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def test_a_hang_sends_nothing_until_the_client_gives_up(sim: Sim) -> None:
    assert (await sim.post("/sim/config", {"hang_rate": 1.0}))["hang_rate"] == 1.0

    with pytest.raises(openai.APITimeoutError):
        await _chat(sim, timeout=0.5)

    stats = await _stats_when(sim, lambda stats: stats["hangs_open"] == 0)
    assert (stats["requests"], stats["hangs"], stats["errors_injected"]) == (1, 1, 0)
    sim.config.hang_rate = 0.0
    assert (await _chat(sim)).choices[0].finish_reason == "stop"


async def test_a_hang_ends_after_hang_seconds_with_the_connection_closed(sim: Sim) -> None:
    sim.config.hang_seconds = 0.2
    await sim.post("/sim/faults", {"status": "hang", "count": 1})

    with pytest.raises(openai.APIConnectionError):
        await _chat(sim, timeout=5)

    assert (await _chat(sim)).choices[0].finish_reason == "stop"
    assert (await sim.get("/sim/stats"))["hangs"] == 1


async def test_hangs_end_when_modelsim_shuts_down() -> None:
    runner = web.AppRunner(build_app(SimConfig(hang_rate=1.0)))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        call = asyncio.create_task(
            http.post(url, json={"model": "gpt-4o-mini", "messages": MESSAGES}, headers={"Authorization": "Bearer x"})
        )
        await asyncio.sleep(0.2)
        await asyncio.wait_for(runner.cleanup(), timeout=2)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await asyncio.wait_for(call, timeout=2)


async def test_an_unauthorized_key_gets_401_before_anything_else(sim: Sim) -> None:
    await sim.post("/sim/config", {"unauthorized_keys": ["revoked"], "error_500_rate": 1.0})

    with pytest.raises(openai.AuthenticationError) as caught:
        await _chat(sim, key="revoked")
    with pytest.raises(openai.AuthenticationError):
        await sim.client.with_options(api_key="revoked").models.list()
    sim.config.error_500_rate = 0.0
    assert (await _chat(sim, key="good")).choices[0].finish_reason == "stop"

    assert caught.value.code == "invalid_api_key"
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    stats = await sim.get("/sim/stats")
    assert stats["requests_by_key"] == {"revoked": 1, "good": 1}
    assert stats["errors_injected"] == 0


async def test_faults_for_a_key_hit_only_that_key(sim: Sim) -> None:
    queued = await sim.post("/sim/faults", {"status": 429, "count": 2, "retry_after": 2, "key": "hot"})
    assert queued == {"queued": 2}

    assert (await _chat(sim, key="cool")).choices[0].finish_reason == "stop"
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as caught:
            await _chat(sim, key="hot")
        headers = caught.value.response.headers
        assert (headers["retry-after"], headers["x-ratelimit-reset-requests"]) == ("2", "2s")
    assert (await _chat(sim, key="hot")).choices[0].finish_reason == "stop"
    await sim.post("/sim/faults", {"status": 500, "count": 1})
    with pytest.raises(openai.InternalServerError):
        await _chat(sim, key="cool")

    stats = await sim.get("/sim/stats")
    assert stats["requests_by_key"] == {"cool": 2, "hot": 3}
    assert stats["errors_injected"] == 3


async def test_a_keys_faults_come_before_those_for_any_key(sim: Sim) -> None:
    await sim.post("/sim/faults", {"status": 500, "count": 1})
    await sim.post("/sim/faults", {"status": 429, "count": 1, "retry_after": 0.25, "key": "hot"})

    with pytest.raises(openai.RateLimitError) as caught:
        await _chat(sim, key="hot")
    with pytest.raises(openai.InternalServerError):
        await _chat(sim, key="hot")

    assert caught.value.response.headers["x-ratelimit-reset-requests"] == "250ms"
    assert caught.value.response.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    "body",
    [
        {"status": 429, "key": ""},
        {"status": 429, "key": 7},
        {"status": "hang", "endpoint": "moderations"},
        {"status": 0},
        {"status": 503},
    ],
)
async def test_bad_fault_specs_are_400(sim: Sim, body: dict) -> None:
    async with sim.http.post(f"{sim.base_url}/sim/faults", json=body) as response:
        assert response.status == 400


@pytest.mark.parametrize(
    "body", [{"hang_rate": 1.5}, {"hang_rate": -0.1}, {"hang_seconds": -1}, {"unauthorized_keys": [1]}]
)
async def test_bad_hang_and_key_config_is_400(sim: Sim, body: dict) -> None:
    async with sim.http.post(f"{sim.base_url}/sim/config", json=body) as response:
        assert response.status == 400


def test_one_draw_picks_429_then_500_then_hang() -> None:
    config = SimConfig(error_429_rate=0.2, error_500_rate=0.1, hang_rate=0.02)
    simulator = Simulator(config)
    draws = [simulator._fault("x") for _ in range(20_000)]

    counts = {status: sum(1 for draw in draws if draw and draw[0] == status) for status in (429, 500, HANG)}
    assert 3600 < counts[429] < 4400
    assert 1650 < counts[500] < 2350
    assert 250 < counts[HANG] < 550


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0ms"), (0.02, "20ms"), (1, "1s"), (1.5, "1.5s"), (60, "1m0s"), (360.25, "6m0.25s")]
)
def test_reset_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert _duration(seconds) == text


def test_a_deployment_overrides_the_settings_it_names() -> None:
    settings = ModelsimSettings(
        modelsim_error_500_rate=0.5,
        modelsim_deployments=[{"port": 9001}, {"port": 9002, "hang_rate": 0.02, "unauthorized_keys": ["k"]}],
    )

    first, second = (SimConfig.from_settings(settings, deployment) for deployment in settings.modelsim_deployments)

    assert (first.error_500_rate, first.hang_rate, first.unauthorized_keys) == (0.5, 0.0, [])
    assert (second.error_500_rate, second.hang_rate, second.unauthorized_keys) == (0.5, 0.02, ["k"])


@pytest.mark.parametrize(
    ("deployments", "named"),
    [
        ([{"port": 9001}, {"port": 9002, "error_429_rate": 2}], "modelsim_deployments.1.error_429_rate"),
        ([{"port": 9001, "hang_rate": -1}], "modelsim_deployments.0.hang_rate"),
        ([{"port": 9001}, {"reply_tokens": 5}], "modelsim_deployments.1.port"),
        ([{"port": 9001, "latency": 1}], "modelsim_deployments.0.latency"),
        ([{"port": 9001}, {"port": 9001}], "entry 1 has port 9001, the port of entry 0"),
        ({"port": 9001}, "modelsim_deployments"),
    ],
)
def test_bad_deployments_fail_naming_the_entry(
    monkeypatch: pytest.MonkeyPatch, deployments: object, named: str
) -> None:
    monkeypatch.setenv("CHATMESH_MODELSIM_DEPLOYMENTS", json.dumps(deployments))

    with pytest.raises(ValidationError) as caught:
        ModelsimSettings()

    assert named in str(caught.value)


async def test_main_fails_at_start_naming_a_bad_deployment() -> None:
    env = {**os.environ, "CHATMESH_MODELSIM_DEPLOYMENTS": '[{"port": 0}, {"port": 0, "error_500_rate": 7}]'}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatmesh.modelsim.server", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)

    assert process.returncode != 0
    assert b"modelsim_deployments.1.error_500_rate" in stderr


async def test_main_serves_each_deployment_on_its_own_port_with_its_own_state() -> None:
    deployments = [{"port": 0}, {"port": 0, "reply_tokens": 3, "unauthorized_keys": ["revoked"]}]
    env = {**os.environ, "CHATMESH_MODELSIM_DEPLOYMENTS": json.dumps(deployments)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatmesh.modelsim.server", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        events = [json.loads(await asyncio.wait_for(process.stderr.readline(), timeout=30)) for _ in deployments]
        assert [(event["event"], event["deployment"]) for event in events] == [("listening", 0), ("listening", 1)]
        first, second = (f"http://127.0.0.1:{event['port']}" for event in events)
        async with aiohttp.ClientSession() as http:

            async def chat(base_url: str, key: str = "x") -> int:
                async with http.post(
                    f"{base_url}/v1/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": MESSAGES},
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    await response.read()
                    return response.status

            async def stats(base_url: str) -> dict:
                async with http.get(f"{base_url}/sim/stats") as response:
                    return await response.json()

            async with http.post(f"{first}/sim/faults", json={"status": 500, "count": 1}) as response:
                assert response.status == 200
            assert [await chat(second), await chat(second, "revoked"), await chat(first)] == [200, 401, 500]
            assert await chat(first, "revoked") == 200
            assert (await stats(first))["requests_by_key"] == {"x": 1, "revoked": 1}
            assert (await stats(first))["errors_injected"] == 1
            assert (await stats(second))["requests_by_key"] == {"x": 1, "revoked": 1}
            assert (await stats(second))["errors_injected"] == 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0


# Function calling: tools offered, calls made by directives in the user's message, tool results echoed.

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "current_time",
            "description": "The time in a timezone.",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string"}},
                "required": ["timezone"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                    "exact": {"type": "boolean"},
                    "score": {"type": "number"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "extra": {"type": "object"},
                    "note": {"type": ["string", "null"]},
                    "optional": {"type": "string"},
                },
                "required": ["id", "unit", "exact", "score", "tags", "extra", "note"],
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},
]
TWO_CALLS = 'please call current_time {"timezone": "Asia/Shanghai"} and call lookup {"id": 7, "unit": "f"}'


def ask(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


def calls_of(completion: ChatCompletion) -> list[tuple[str, str]]:
    return [(call.function.name, call.function.arguments) for call in completion.choices[0].message.tool_calls or []]


async def _call(sim: Sim, messages: list[dict], **options: object) -> ChatCompletion:
    return await sim.client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=TOOLS, **options)


async def _streamed(sim: Sim, messages: list[dict], **options: object) -> tuple[ChatCompletion, list]:
    """The completion the SDK reassembles from the stream, and the stream's chunks."""
    stream = await sim.client.chat.completions.create(
        model="gpt-4o-mini",
        messages=messages,
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
        **options,
    )
    state = ChatCompletionStreamState()
    chunks = []
    async for chunk in stream:
        state.handle_chunk(chunk)
        chunks.append(chunk)
    return state.get_final_completion(), chunks


def _answers(completion: ChatCompletion, *results: str) -> list[dict]:
    """The assistant message of `completion`'s calls and a tool message answering each with `results`."""
    calls = completion.choices[0].message.tool_calls
    return [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump() for call in calls]},
        *(
            {"role": "tool", "tool_call_id": call.id, "content": result}
            for call, result in zip(calls, results, strict=True)
        ),
    ]


async def test_a_directive_call_not_streamed(sim: Sim) -> None:
    completion = await _call(sim, ask('what time is it? call current_time {"timezone": "Asia/Shanghai"}'))

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == (
        "function",
        "current_time",
        '{"timezone":"Asia/Shanghai"}',
    )
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    assert completion.usage.completion_tokens == TokenCounter().count_text("gpt-4o-mini", call.function.arguments)
    again = await _call(sim, ask('what time is it? call current_time {"timezone": "Asia/Shanghai"}'))
    assert again.choices[0].message.tool_calls[0].id == call.id


async def test_a_directive_call_streamed_as_openai_streams_it(sim: Sim) -> None:
    messages = ask('call lookup {"id": 7, "note": "a longer argument, in pieces"}')
    whole = await _call(sim, messages)

    streamed, chunks = await _streamed(sim, messages)

    assert calls_of(streamed) == calls_of(whole)
    assert streamed.choices[0].message.tool_calls[0].id == whole.choices[0].message.tool_calls[0].id
    assert streamed.choices[0].message.content is None
    assert streamed.choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage == whole.usage
    role, opening, *pieces, finish, _ = chunks
    assert (role.choices[0].delta.role, role.choices[0].delta.content) == ("assistant", None)
    [call] = opening.choices[0].delta.tool_calls
    assert (call.index, call.id, call.type) == (0, whole.choices[0].message.tool_calls[0].id, "function")
    assert (call.function.name, call.function.arguments) == ("lookup", "")
    arguments = [chunk.choices[0].delta.tool_calls[0].function.arguments for chunk in pieces]
    assert "".join(arguments) == '{"id":7,"note":"a longer argument, in pieces"}'
    assert len(arguments) == 6 and all(len(piece) <= 8 for piece in arguments)
    assert all(chunk.choices[0].delta.content is None for chunk in pieces)
    assert (finish.choices[0].finish_reason, finish.choices[0].delta.tool_calls) == ("tool_calls", None)


async def test_streamed_calls_keep_the_first_token_latency_and_token_delay(sim: Sim) -> None:
    await sim.post("/sim/config", {"first_token_latency_seconds": 0.01, "token_delay_seconds": 0.001})

    streamed, _ = await _streamed(sim, ask(TWO_CALLS))

    assert calls_of(streamed) == calls_of(await _call(sim, ask(TWO_CALLS)))
    assert (await sim.get("/sim/stats"))["streams_completed"] == 1


async def test_parallel_calls_in_order_and_parallel_tool_calls_false(sim: Sim) -> None:
    messages = ask(TWO_CALLS + ' then call unknown {"x": 1}, call ping')
    expected = [
        ("current_time", '{"timezone":"Asia/Shanghai"}'),
        ("lookup", '{"id":7,"unit":"f"}'),
        ("ping", "{}"),
    ]

    whole = await _call(sim, messages)
    streamed, _ = await _streamed(sim, messages)
    single = await _call(sim, messages, parallel_tool_calls=False)

    assert calls_of(whole) == calls_of(streamed) == expected
    assert len({call.id for call in whole.choices[0].message.tool_calls}) == 3
    assert [call.id for call in streamed.choices[0].message.tool_calls] == [
        call.id for call in whole.choices[0].message.tool_calls
    ]
    assert calls_of(single) == expected[:1]
    logged = (await sim.get("/sim/requests?limit=1"))["requests"][0]
    assert (logged["tools"], logged["parallel_tool_calls"]) == (TOOLS, False)


async def test_arguments_are_built_from_the_schema_without_an_object(sim: Sim) -> None:
    completion = await _call(sim, ask("call lookup, then call ping and call current_time"))

    [lookup, ping, current_time] = calls_of(completion)
    assert lookup[0] == "lookup" and json.loads(lookup[1]) == {
        "id": 1,
        "unit": "c",
        "exact": True,
        "score": 1.5,
        "tags": [],
        "extra": {},
        "note": "sim",
    }
    assert ping == ("ping", "{}")
    assert current_time == ("current_time", '{"timezone":"sim"}')


async def test_a_malformed_object_is_sent_as_its_raw_text(sim: Sim) -> None:
    messages = ask('call lookup {not json} and call ping {"a": {"b": }} x call current_time {"timezone": "U')

    whole = await _call(sim, messages)
    streamed, _ = await _streamed(sim, messages)

    expected = [("lookup", "{not json}"), ("ping", '{"a": {"b": }}'), ("current_time", '{"timezone": "U')]
    assert calls_of(whole) == calls_of(streamed) == expected


async def test_a_directive_inside_an_object_is_not_a_call(sim: Sim) -> None:
    completion = await _call(sim, ask('call lookup {"note": "call ping"}'))

    assert calls_of(completion) == [("lookup", '{"note":"call ping"}')]


async def test_tool_choice_none_auto_required_and_named(sim: Sim) -> None:
    plain = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=ask(TWO_CALLS))

    none = await _call(sim, ask(TWO_CALLS), tool_choice="none")
    auto = await _call(sim, ask("What time is it?"), tool_choice="auto")
    required = await _call(sim, ask("What time is it?"), tool_choice="required")
    required_with_directives = await _call(sim, ask(TWO_CALLS), tool_choice="required")
    named = await _call(sim, ask(TWO_CALLS), tool_choice={"type": "function", "function": {"name": "lookup"}})
    named_without_directive = await _call(
        sim, ask("What time is it?"), tool_choice={"type": "function", "function": {"name": "ping"}}
    )

    assert (none.choices[0].finish_reason, none.choices[0].message.tool_calls) == ("stop", None)
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert (auto.choices[0].finish_reason, auto.choices[0].message.tool_calls) == ("stop", None)
    assert calls_of(required) == [("current_time", '{"timezone":"sim"}')]
    assert len(calls_of(required_with_directives)) == 2
    assert calls_of(named) == [("lookup", '{"id":7,"unit":"f"}')]
    assert calls_of(named_without_directive) == [("ping", "{}")]


async def test_tool_results_are_echoed_as_text(sim: Sim) -> None:
    first = await _call(sim, ask(TWO_CALLS))
    messages = [*ask(TWO_CALLS), *_answers(first, "12:00 CST", '{"found": true}')]
    first_id, second_id = (call.id for call in first.choices[0].message.tool_calls)
    expected = f'tool results: {first_id}=12:00 CST; {second_id}={{"found": true}}'

    whole = await _call(sim, messages)
    streamed, chunks = await _streamed(sim, messages)

    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (expected, "stop")
    assert whole.choices[0].message.tool_calls is None
    assert streamed.choices[0].message.content == expected
    assert len([chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]) == 6
    assert whole.usage.completion_tokens == 6


async def test_keep_calling_calls_again_after_tool_results(sim: Sim) -> None:
    text = '[keep-calling] call ping and call current_time {"timezone": "UTC"}'
    first = await _call(sim, ask(text))
    messages = [*ask(text), *_answers(first, "pong", "00:00")]

    second = await _call(sim, messages)
    third = await _call(sim, [*messages, *_answers(second, "pong", "00:01")])
    stopped = await _call(sim, messages, tool_choice="none")

    assert (
        calls_of(first)
        == calls_of(second)
        == calls_of(third)
        == [("ping", "{}"), ("current_time", '{"timezone":"UTC"}')]
    )
    ids = [call.id for completion in (first, second, third) for call in completion.choices[0].message.tool_calls]
    assert len(set(ids)) == 6
    assert stopped.choices[0].message.content.startswith("tool results: ")


async def test_tools_and_tool_messages_count_in_the_prompt_and_the_context(sim: Sim) -> None:
    first = await _call(sim, ask(TWO_CALLS))
    messages = [*ask(TWO_CALLS), *_answers(first, "12:00", "found")]
    # An assistant message with tool_calls may leave content out.
    del messages[2]["content"]
    counter = TokenCounter()
    functions = json.dumps([tool["function"] for tool in TOOLS])
    expected = counter.count_messages("gpt-4o-mini", messages) + counter.count_text("gpt-4o-mini", functions)

    completion = await _call(sim, messages)
    sim.config.context_tokens = {"gpt-4o-mini": expected + 9}

    assert completion.usage.prompt_tokens == expected
    assert expected > counter.count_messages("gpt-4o-mini", messages) + 100
    await _call(sim, messages, max_tokens=9)
    with pytest.raises(openai.BadRequestError) as raised:
        await _call(sim, messages, max_tokens=10)
    assert raised.value.code == "context_length_exceeded"


def _tool(name: str, **function: object) -> dict:
    return {"type": "function", "function": {"name": name, **function}}


@pytest.mark.parametrize(
    ("options", "param", "message"),
    [
        ({"tool_choice": "auto"}, "tool_choice", "'tool_choice' is only allowed when 'tools' are specified."),
        ({"parallel_tool_calls": False}, "parallel_tool_calls", "only allowed when 'tools' are specified"),
        ({"tools": [_tool("a b")]}, "tools[0].function.name", "does not match pattern"),
        ({"tools": [_tool("ping"), _tool("x" * 65)]}, "tools[1].function.name", "does not match pattern"),
        ({"tools": [_tool("")]}, "tools[0].function.name", "does not match pattern"),
        ({"tools": [_tool("ping"), _tool("ping")]}, "tools", "unique"),
        ({"tools": [_tool(f"t{i}") for i in range(129)]}, "tools", "maximum length 128"),
        ({"tools": []}, "tools", "non-empty"),
        ({"tools": [{"type": "code", "function": {"name": "a"}}]}, "tools[0].type", "'function'"),
        ({"tools": [_tool("a", parameters="{}")]}, "tools[0].function.parameters", "expected an object"),
        ({"tools": [_tool("a", strict="yes")]}, "tools[0].function.strict", "expected a boolean"),
        ({"tools": [_tool("a")], "tool_choice": "sometimes"}, "tool_choice", "'none', 'auto', and 'required'"),
        (
            {"tools": [_tool("a")], "tool_choice": {"type": "function", "function": {"name": "b"}}},
            "tool_choice",
            "'b' is not among the tools",
        ),
        ({"tools": [_tool("a")], "tool_choice": {"type": "function"}}, "tool_choice", "expected"),
        ({"tools": [_tool("a")], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "expected a boolean"),
    ],
)
async def test_bad_tool_options_are_400(sim: Sim, options: dict, param: str, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await sim.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **options)

    assert raised.value.body["param"] == param
    assert raised.value.body["type"] == "invalid_request_error"
    assert message in raised.value.body["message"]


def _asked(*ids: str) -> dict:
    calls = [{"id": id_, "type": "function", "function": {"name": "ping", "arguments": "{}"}} for id_ in ids]
    return {"role": "assistant", "tool_calls": calls}


def _answer(id_: str) -> dict:
    return {"role": "tool", "tool_call_id": id_, "content": "pong"}


MISSING = (
    "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. "
    "The following tool_call_ids did not have response messages: "
)
ORPHAN = "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'."
USER = {"role": "user", "content": "call ping"}


@pytest.mark.parametrize(
    ("messages", "param", "message"),
    [
        ([USER, _asked("call_a", "call_b"), _answer("call_b"), USER], "messages.[3].role", MISSING + "call_a"),
        ([USER, _asked("call_a", "call_b")], "messages.[1].role", MISSING + "call_a, call_b"),
        ([USER, _asked("call_a"), _answer("call_a"), USER, _answer("call_a")], "messages.[4].role", ORPHAN),
        ([USER, _answer("call_a")], "messages.[1].role", ORPHAN),
        ([USER, _asked("call_a"), _answer("call_b")], "messages.[2].role", ORPHAN),
        (
            [USER, _asked("call_a"), _answer("call_a"), {"role": "assistant", "content": "ok"}, _answer("call_a")],
            "messages.[4].role",
            ORPHAN,
        ),
        ([USER, _asked("call_a"), {"role": "tool", "content": "pong"}], "messages[2].tool_call_id", "Missing"),
        ([USER, _asked("call_a"), {**_answer("call_a"), "content": None}], "messages[2].content", "a string"),
        ([USER, {"role": "assistant", "tool_calls": []}], "messages[1].tool_calls", "non-empty"),
        (
            [USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "a"}}]}],
            "messages[1].tool_calls[0]",
            "'arguments' (a string)",
        ),
    ],
)
async def test_bad_tool_messages_are_400(sim: Sim, messages: list[dict], param: str, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await sim.client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=TOOLS)

    assert raised.value.body["param"] == param
    assert message in raised.value.body["message"]


async def test_a_user_message_with_echo_is_answered_with_what_follows_it(sim: Sim) -> None:
    messages = [{"role": "user", "content": "please [echo] call [CARD_1] at noon"}]

    completion = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=messages)

    assert completion.choices[0].message.content == "call [CARD_1] at noon"


# Embeddings, through the openai SDK (which asks for base64 unless told otherwise).


def cosine(left: list[float], right: list[float]) -> float:
    return sum(a * b for a, b in zip(left, right, strict=True))


async def embeddings(sim: Sim, *texts: str, **options) -> list[list[float]]:
    response = await sim.client.embeddings.create(model="text-embedding-3-small", input=list(texts), **options)
    return [item.embedding for item in response.data]


async def test_embeddings_are_deterministic_unit_vectors_of_the_models_dimensions(sim: Sim) -> None:
    first, again = await embeddings(sim, "How do I reset my password?", "How do I reset my password?")
    (as_floats,) = await embeddings(sim, "How do I reset my password?", encoding_format="float")

    assert len(first) == 1536 and first == again
    assert abs(cosine(first, first) - 1) < 1e-5
    assert max(abs(a - b) for a, b in zip(first, as_floats, strict=True)) < 1e-6  # float32 over base64
    assert (await sim.get("/sim/stats"))["embedding_requests"] == 2


async def test_paraphrases_that_share_words_are_closer_than_unrelated_questions(sim: Sim) -> None:
    question, paraphrase, unrelated = await embeddings(
        sim, "How do I reset my password?", "I forgot my password, how do I reset it?", "What is the capital of Peru?"
    )
    chinese, chinese_paraphrase, chinese_unrelated = await embeddings(
        sim, "如何重置我的密码?", "我忘记密码了,怎么重置?", "秘鲁的首都是哪里?"
    )

    assert cosine(question, paraphrase) > 0.5 > 0.1 > cosine(question, unrelated)
    assert cosine(chinese, chinese_paraphrase) > 0.3 > 0.1 > cosine(chinese, chinese_unrelated)


async def test_embeddings_take_fewer_dimensions_and_count_their_tokens(sim: Sim) -> None:
    response = await sim.client.embeddings.create(
        model="text-embedding-3-large", input="hello world", dimensions=256, encoding_format="float"
    )

    assert len(response.data[0].embedding) == 256
    assert response.usage.prompt_tokens == response.usage.total_tokens == 2


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "text-embedding-3-small", "input": ""}, 400, "input"),
        ({"model": "text-embedding-3-small", "input": []}, 400, "input"),
        ({"model": "text-embedding-3-small", "input": "x", "dimensions": 0}, 400, "dimensions"),
        ({"model": "text-embedding-3-small", "input": "x", "dimensions": 4096}, 400, "dimensions"),
        ({"model": "text-embedding-ada-002", "input": "x", "dimensions": 256}, 400, "dimensions"),
        ({"model": "text-embedding-3-small", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": "gpt-4o-mini", "input": "x"}, 404, None),
    ],
)
async def test_bad_embedding_requests_are_refused_as_openai_refuses_them(
    sim: Sim, body: dict, status: int, param: str | None
) -> None:
    async with sim.http.post(
        f"{sim.base_url}/v1/embeddings", json=body, headers={"Authorization": "Bearer x"}
    ) as response:
        error = (await response.json())["error"]

    assert response.status == status and error["param"] == param


async def test_a_reply_to_numbered_sources_cites_the_one_closest_to_the_question(sim: Sim) -> None:
    sources = (
        "Answer from the numbered sources below.\n\n"
        "[1] Billing (billing.md)\nRefunds reach your card within five days.\n\n"
        "[2] Security (security.txt)\nReset your password from Settings."
    )
    question = {"role": "user", "content": "How do I reset my password?"}

    grounded = await sim.client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "system", "content": sources}, question]
    )
    plain = await sim.client.chat.completions.create(model="gpt-4o-mini", messages=[question])

    assert grounded.choices[0].message.content.endswith(" [2]")
    assert "[" not in plain.choices[0].message.content
