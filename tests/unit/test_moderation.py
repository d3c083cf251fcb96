"""The moderation screen: modelsim's /v1/moderations, ModelClient.moderate over it, and the failure policy."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from support.ports import free_port

from chatmesh.modelsim.server import SimConfig, build_app
from chatmesh.runtime.model_client import ModelClient, ModelError, ModelErrorKind
from chatmesh.runtime.settings import MODELSIM_API_KEY, Settings
from chatmesh.safety.moderation import MODERATION_UNAVAILABLE, ModerationScreen, moderation_enabled

CATEGORIES = {
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
}


@dataclass
class Sim:
    base_url: str
    config: SimConfig
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: object = None, *, key: str | None = "x") -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.http.request(method, f"{self.base_url}{path}", json=body, headers=headers) as response:
            return response.status, await response.json()

    def settings(self, **fields: object) -> Settings:
        return Settings(
            OPENAI_API_KEY="test-key",
            OPENAI_BASE_URL=f"{self.base_url}/v1",
            model_backoff_initial_seconds=0.01,
            **fields,
        )


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    config = SimConfig()
    runner = web.AppRunner(build_app(config))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    http = aiohttp.ClientSession()
    try:
        yield Sim(f"http://127.0.0.1:{runner.addresses[0][1]}", config, http)
    finally:
        await http.close()
        await runner.cleanup()


@pytest.fixture
async def client(sim: Sim) -> AsyncIterator[ModelClient]:
    model = ModelClient(sim.settings())
    try:
        yield model
    finally:
        await model.close()


def deadline(seconds: float = 30) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_modelsim_answers_in_openais_shape_and_counts_moderations_apart(sim: Sim):
    status, body = await sim.call("POST", "/v1/moderations", {"input": "a SimFlag here"})

    assert status == 200
    assert body["id"].startswith("modr-") and body["model"] == "omni-moderation-latest"
    (result,) = body["results"]
    assert result["flagged"] is True
    assert set(result["categories"]) == set(result["category_scores"]) == CATEGORIES
    assert [name for name, value in result["categories"].items() if value] == ["harassment"]
    _, stats = await sim.call("GET", "/sim/stats")
    assert stats["moderation_requests"] == 1 and stats["requests"] == 0


async def test_modelsim_judges_each_input_string_and_its_flag_words_are_settable(sim: Sim):
    status, config = await sim.call("POST", "/sim/config", {"moderation_flag_words": ["Alpha", "beta"]})
    assert status == 200 and config["moderation_flag_words"] == ["Alpha", "beta"]

    _, body = await sim.call("POST", "/v1/moderations", {"input": ["alphabet", "gamma", "simflag"], "model": "m"})

    assert body["model"] == "m"
    assert [result["flagged"] for result in body["results"]] == [True, False, False]
    status, _ = await sim.call("POST", "/sim/config", {"moderation_flag_words": "alpha"})
    assert status == 400


async def test_modelsim_refuses_bad_moderation_requests(sim: Sim):
    assert (await sim.call("POST", "/v1/moderations", {"input": "x"}, key=None))[0] == 401
    status, body = await sim.call("POST", "/v1/moderations", {"input": 3})
    assert status == 400 and body["error"]["param"] == "input"


async def test_modelsim_queues_moderation_faults_apart_from_chat_faults(sim: Sim):
    assert (await sim.call("POST", "/sim/faults", {"status": 500, "count": 1, "endpoint": "moderations"}))[0] == 200
    assert (await sim.call("POST", "/sim/faults", {"status": 500, "count": 1, "endpoint": "embeddings"}))[0] == 400

    assert (await sim.call("POST", "/v1/moderations", {"input": "x"}))[0] == 500
    assert (await sim.call("POST", "/v1/moderations", {"input": "x"}))[0] == 200
    _, stats = await sim.call("GET", "/sim/stats")
    assert stats["moderation_errors_injected"] == 1 and stats["errors_injected"] == 0


async def test_moderate_reports_the_flagged_categories(client: ModelClient):
    assert await client.moderate("hello there", deadline=deadline()) == (False, [])
    assert await client.moderate("you simflag", deadline=deadline()) == (True, ["harassment"])


async def test_moderate_retries_a_server_error(sim: Sim, client: ModelClient):
    await sim.call("POST", "/sim/faults", {"status": 500, "count": 1, "endpoint": "moderations"})

    assert await client.moderate("hello", deadline=deadline()) == (False, [])
    _, stats = await sim.call("GET", "/sim/stats")
    assert stats["moderation_requests"] == 2


async def test_moderate_fails_as_a_model_error_when_the_endpoint_keeps_failing(sim: Sim, client: ModelClient):
    await sim.call("POST", "/sim/faults", {"status": 500, "count": 100, "endpoint": "moderations"})

    with pytest.raises(ModelError) as raised:
        await client.moderate("hello", deadline=deadline())
    assert raised.value.kind is ModelErrorKind.UNAVAILABLE
    _, stats = await sim.call("GET", "/sim/stats")
    assert stats["moderation_requests"] == 4  # model_max_attempts


async def test_moderate_fails_as_a_model_error_when_nothing_listens():
    settings = Settings(
        OPENAI_API_KEY="test-key",
        OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1",
        model_backoff_initial_seconds=0.01,
    )
    model = ModelClient(settings)
    try:
        with pytest.raises(ModelError) as raised:
            await model.moderate("hello", deadline=deadline())
    finally:
        await model.close()
    # The SDK reports a refused connection as a connection error or a timeout, by transport.
    assert raised.value.kind in (ModelErrorKind.UNAVAILABLE, ModelErrorKind.TIMEOUT)


async def test_the_screen_fails_closed_by_default_and_open_when_told(sim: Sim, client: ModelClient):
    closed = ModerationScreen(client, fail_open=False)
    opened = ModerationScreen(client, fail_open=True)
    assert (await closed.screen("simflag", deadline())).categories == ("harassment",)

    await sim.call("POST", "/sim/faults", {"status": 500, "count": 100, "endpoint": "moderations"})
    verdict = await closed.screen("hello", deadline())
    assert verdict.blocked and verdict.categories == (MODERATION_UNAVAILABLE,)
    assert not (await opened.screen("hello", deadline())).blocked


@pytest.mark.parametrize(
    ("mode", "key", "enabled"),
    [
        ("auto", None, False),
        ("auto", MODELSIM_API_KEY, False),
        ("auto", "sk-real", True),
        ("on", None, True),
        ("off", "sk-real", False),
    ],
)
def test_moderation_is_on_by_default_only_with_a_real_key(
    monkeypatch: pytest.MonkeyPatch, mode: str, key: str | None, enabled: bool
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fields = {"safety_moderation": mode} | ({"OPENAI_API_KEY": key} if key else {})
    assert moderation_enabled(Settings(**fields)) is enabled
