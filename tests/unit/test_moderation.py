"""The moderation screen: modelsim's /v1/moderations, ModelClient.moderate over it, and the failure policy."""

import asyncio

import pytest
from support.ports import free_port
from support.sim import Sim

from chatmesh.model.client import ModelClient, ModerationResult
from chatmesh.model.errors import ModelError, ModelErrorKind
from chatmesh.runtime.settings import MODELSIM_API_KEY, SafetySettings
from chatmesh.safety.moderation import (
    MODERATION_UNAVAILABLE,
    ModerationScreen,
    WindowedModeration,
    matched_categories,
    moderation_enabled,
)

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


async def test_moderate_reports_the_flagged_categories_and_every_score(model_client: ModelClient):
    clean = await model_client.moderate("hello there", deadline=deadline())
    flagged = await model_client.moderate("you simflag", deadline=deadline())

    assert (clean.flagged, clean.categories) == (False, [])
    assert set(clean.scores) == CATEGORIES and max(clean.scores.values()) < 0.01
    assert (flagged.flagged, flagged.categories) == (True, ["harassment"])
    assert flagged.scores["harassment"] > 0.9 and flagged.scores["violence"] < 0.01


async def test_modelsim_scores_the_words_it_is_given_and_flags_from_half(sim: Sim, model_client: ModelClient):
    scores = {"borderline": {"violence": 0.3}, "grim": {"violence": 0.6, "hate": 0.2}}
    status, config = await sim.call("POST", "/sim/config", {"moderation_word_scores": scores})
    assert status == 200 and config["moderation_word_scores"] == scores

    low = await model_client.moderate("a BORDERLINE remark", deadline=deadline())
    high = await model_client.moderate("borderline and grim", deadline=deadline())

    assert (low.flagged, low.categories, low.scores["violence"]) == (False, [], 0.3)
    assert (high.flagged, high.categories, high.scores["violence"], high.scores["hate"]) == (
        True,
        ["violence"],
        0.6,
        0.2,
    )
    for bad in ({"w": {"violence": 1.5}}, {"w": {"not-a-category": 0.5}}, {"w": 0.5}, ["w"]):
        assert (await sim.call("POST", "/sim/config", {"moderation_word_scores": bad}))[0] == 400


async def test_moderate_retries_a_server_error(sim: Sim, model_client: ModelClient):
    await sim.call("POST", "/sim/faults", {"status": 500, "count": 1, "endpoint": "moderations"})

    assert not (await model_client.moderate("hello", deadline=deadline())).flagged
    _, stats = await sim.call("GET", "/sim/stats")
    assert stats["moderation_requests"] == 2


async def test_moderate_fails_as_a_model_error_when_the_endpoint_keeps_failing(sim: Sim, model_client: ModelClient):
    await sim.call("POST", "/sim/faults", {"status": 500, "count": 100, "endpoint": "moderations"})

    with pytest.raises(ModelError) as raised:
        await model_client.moderate("hello", deadline=deadline())
    assert raised.value.kind is ModelErrorKind.UNAVAILABLE
    _, stats = await sim.call("GET", "/sim/stats")
    assert stats["moderation_requests"] == 4  # model_max_attempts


async def test_moderate_fails_as_a_model_error_when_nothing_listens():
    settings = SafetySettings(
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


async def test_the_screen_fails_closed_by_default_and_open_when_told(sim: Sim, model_client: ModelClient):
    closed = ModerationScreen(model_client, fail_open=False)
    opened = ModerationScreen(model_client, fail_open=True)
    assert await closed.screen("simflag", deadline()) == ("harassment",)

    await sim.call("POST", "/sim/faults", {"status": 500, "count": 100, "endpoint": "moderations"})
    assert await closed.screen("hello", deadline()) == (MODERATION_UNAVAILABLE,)
    assert await opened.screen("hello", deadline()) == ()


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
    assert moderation_enabled(SafetySettings(**fields)) is enabled


@pytest.mark.parametrize(
    ("result", "thresholds", "matched"),
    [
        # Without thresholds, what the endpoint flags.
        (ModerationResult(True, ["hate"], {"hate": 0.8, "violence": 0.3}), {}, ("hate",)),
        # A threshold lowers the bar for its category, or raises it; the others keep the endpoint's flag.
        (ModerationResult(False, [], {"hate": 0.1, "violence": 0.3}), {"violence": 0.3}, ("violence",)),
        (ModerationResult(True, ["hate"], {"hate": 0.8, "violence": 0.3}), {"violence": 0.25}, ("hate", "violence")),
        (ModerationResult(True, ["hate"], {"hate": 0.8}), {"hate": 0.9}, ()),
        # A category the endpoint gave no score for does not reach a threshold.
        (ModerationResult(False, [], {}), {"violence": 0.0001}, ()),
        # A flag without a category still counts.
        (ModerationResult(True, [], {}), {"violence": 0.5}, ("flagged",)),
    ],
)
def test_a_category_matches_at_its_threshold_or_else_by_the_endpoints_flag(
    result: ModerationResult, thresholds: dict[str, float], matched: tuple[str, ...]
):
    assert matched_categories(result, thresholds) == matched


async def test_thresholds_apply_to_the_endpoints_scores(sim: Sim, model_client: ModelClient):
    sim.config.moderation_word_scores = {"borderline": {"violence": 0.3}}
    screen = ModerationScreen(model_client, fail_open=False, thresholds={"violence": 0.25, "harassment": 0.99})

    assert await screen.screen("a borderline remark", deadline()) == ("violence",)
    assert await screen.screen("simflag", deadline()) == ()  # 0.97 is below its threshold


class FakeModeration:
    """Judges a window by the words in it; each call waits until the test lets it answer."""

    def __init__(self, verdicts: dict[str, tuple[str, ...]]) -> None:
        self.verdicts = verdicts
        self.windows: list[str] = []
        self.answer = asyncio.Event()

    async def screen(self, text: str, deadline: float) -> tuple[str, ...]:
        self.windows.append(text)
        await self.answer.wait()
        self.answer.clear()
        return next((categories for word, categories in self.verdicts.items() if word in text), ())


async def answered(moderation: WindowedModeration, fake: FakeModeration, wakeup: asyncio.Event) -> None:
    """Lets the call in flight answer, takes its answer, and lets the next call (if any) start."""
    fake.answer.set()
    await asyncio.wait_for(wakeup.wait(), 5)
    wakeup.clear()
    moderation.feed("")
    await asyncio.sleep(0)


async def test_windows_are_moderated_whole_one_at_a_time_and_the_rest_at_the_end():
    fake = FakeModeration({})
    wakeup = asyncio.Event()
    moderation = WindowedModeration(fake, 10, deadline(), wakeup, lambda categories: False)  # type: ignore[arg-type]

    moderation.feed("0123456")
    assert fake.windows == [] and moderation.cleared == 0  # not a whole window yet
    moderation.feed("789abcdefghijklmnopq")
    await asyncio.sleep(0)
    assert fake.windows == ["0123456789"]  # one call at a time
    await answered(moderation, fake, wakeup)
    assert moderation.cleared == 10 and fake.windows[-1] == "abcdefghij"
    await answered(moderation, fake, wakeup)
    assert moderation.cleared == 20 and not moderation.complete

    moderation.feed("rs", final=True)
    await asyncio.sleep(0)
    assert fake.windows[-1] == "klmnopqrs"
    await answered(moderation, fake, wakeup)
    assert moderation.cleared == 29 and moderation.complete and len(fake.windows) == 3


async def test_a_window_that_matches_stops_at_its_start_unless_the_policy_lets_it_out():
    fake = FakeModeration({"bad": ("violence",), "meh": ("spam",)})
    wakeup = asyncio.Event()
    moderation = WindowedModeration(
        fake,
        5,
        deadline(),
        wakeup,
        lambda categories: set(categories) <= {"spam"},  # type: ignore[arg-type]
    )

    moderation.feed("a meh")
    await answered(moderation, fake, wakeup)
    assert moderation.cleared == 5 and moderation.passed == {"spam"} and moderation.passed_window == (0, 5)
    moderation.feed("  bad and more", final=True)
    await answered(moderation, fake, wakeup)

    assert moderation.blocked and moderation.categories == ("violence",) and moderation.window == (5, 10)
    assert moderation.cleared == 5 and not moderation.complete
    moderation.feed("")
    assert len(fake.windows) == 2  # nothing is moderated after a window that stopped the reply


async def test_blank_windows_are_cleared_without_a_call_and_close_cancels_the_call_in_flight():
    fake = FakeModeration({})
    wakeup = asyncio.Event()
    moderation = WindowedModeration(fake, 4, deadline(), wakeup, lambda categories: False)  # type: ignore[arg-type]

    moderation.feed("    \n\n  ")
    assert moderation.cleared == 8 and fake.windows == []
    moderation.feed("text", final=True)
    await asyncio.sleep(0)
    assert fake.windows == ["text"]

    await moderation.close()
    assert not moderation.complete
