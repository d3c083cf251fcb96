"""A turn through safety and the cache, over real processes: what callers receive, and what is kept."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from support.cluster import Cluster

from chatmesh.v1 import chat_pb2, chat_pb2_grpc, safety_pb2, safety_pb2_grpc

RELOAD_SECONDS = 0.1
KEYWORDS = "violence\tforbidden fruit\nviolence\t禁止的水果\n"


@pytest.fixture(scope="module")
def keywords(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keywords")
    (folder / "base.txt").write_text(KEYWORDS, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def cluster(keywords: Path) -> Iterator[Cluster]:
    """This module's cluster, with keyword files the tests change; conftest's `sim` and `chat` use it."""
    with Cluster(
        env={
            "CHATMESH_SAFETY_KEYWORDS": str(keywords),
            "CHATMESH_SAFETY_KEYWORDS_RELOAD_SECONDS": str(RELOAD_SECONDS),
        }
    ) as running:
        yield running


def request(message: str, user_id: str = "alice", conversation_id: str = "", **options) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(
        conversation_id=conversation_id, user_id=user_id, message=message, options=chat_pb2.ChatOptions(**options)
    )


async def stream(chat: chat_pb2_grpc.ChatServiceStub, chat_request: chat_pb2.ChatRequest) -> list[chat_pb2.ChatEvent]:
    return [event async for event in chat.StreamChat(chat_request)]


def text_of(events: list[chat_pb2.ChatEvent]) -> str:
    return "".join(event.delta.text for event in events if event.WhichOneof("event") == "delta")


async def history(chat: chat_pb2_grpc.ChatServiceStub, conversation_id: str, user_id: str = "alice"):
    response = await chat.GetConversation(
        chat_pb2.GetConversationRequest(conversation_id=conversation_id, user_id=user_id)
    )
    return list(response.conversation.messages)


@pytest.mark.parametrize(
    "disguised",
    [
        "tell me about the forbidden fruit",
        "tell me about the FoRbIdDeN FRUIT",
        "tell me about the " + "".join(chr(ord(c) + 0xFEE0) if c != " " else "\u3000" for c in "forbidden fruit"),
        "tell me about the f o r b i d d e n - f r u i t",
        "tell me about the forb\u200bidden\u200d fr\u200cuit",  # zero-width characters
        "说说禁止的水果吧",
        "说说禁 止 的\u200b水-果吧",
    ],
)
async def test_a_blocked_input_is_refused_without_calling_the_model(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, disguised: str
):
    for call in (chat.Chat, chat.StreamChat):
        if call is chat.Chat:
            response = await chat.Chat(request(disguised))
            conversation_id, text = response.conversation_id, response.text
            finish_reason, content_filter = response.finish_reason, response.content_filter
        else:
            events = await stream(chat, request(disguised))
            conversation_id, text = events[0].started.conversation_id, text_of(events)
            finish_reason, content_filter = events[-1].completed.finish_reason, events[-1].completed.content_filter
        assert finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
        assert content_filter.stage == chat_pb2.ContentFilter.STAGE_INPUT
        assert list(content_filter.categories) == ["violence"]
        assert text == ""
        # The refusal is recorded, without the offending text.
        messages = await history(chat, conversation_id)
        assert [(m.refused, m.content) for m in messages] == [(True, ""), (True, "")]
    assert sim.sim_stats()["requests"] == 0


async def test_a_refused_turn_is_left_out_of_what_the_model_sees_next(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    refused = await chat.Chat(request("the forbidden fruit"))
    await chat.Chat(request("something else", conversation_id=refused.conversation_id))

    assert sim.sim_requests(limit=1)[-1]["messages"] == [{"role": "user", "content": "something else"}]


async def test_a_blocked_term_split_across_deltas_never_reaches_the_caller(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, keywords: Path
):
    sim.sim_config(reply_tokens=12, token_delay_seconds=0.02)
    # Temperature above the cache's bound: both calls must reach the model, which answers them alike.
    question = request(f"say something {uuid.uuid4().hex}", temperature=0.9)
    reply = (await chat.Chat(question)).text
    words = reply.split()
    term = f"{words[4]} {words[5]}"  # two tokens, so two deltas
    (keywords / "split.txt").write_text(f"secret\t{term}\n", encoding="utf-8")
    try:
        for _ in range(100):
            events = await stream(chat, question)
            if events[-1].completed.finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER:
                break
            await asyncio.sleep(RELOAD_SECONDS)
        received = text_of(events)
        assert events[-1].completed.content_filter.stage == chat_pb2.ContentFilter.STAGE_OUTPUT
        assert list(events[-1].completed.content_filter.categories) == ["secret"]
        # What the blocked reply cost is in its Completed: the window's tokens and those produced.
        usage = events[-1].completed.usage
        assert usage.input_tokens > 0 and usage.output_tokens > 0
        assert usage.total_tokens == usage.input_tokens + usage.output_tokens
        assert reply.startswith(received)
        assert len(received) <= reply.index(term)
        # Not even the term's first word (words[4]) got out; it may also occur earlier in the reply, so count words.
        assert len(received.split()) <= 4
        messages = await history(chat, events[0].started.conversation_id)
        assert [(m.content, m.refused) for m in messages] == [(question.message, False), ("", True)]
    finally:
        (keywords / "split.txt").unlink()


async def policy_version(cluster: Cluster) -> str:
    async with grpc.aio.insecure_channel(cluster.safety_target) as channel:
        response = await safety_pb2_grpc.SafetyServiceStub(channel).ScreenInput(
            safety_pb2.ScreenInputRequest(text="a probe")
        )
    return response.verdict.policy_version


@asynccontextmanager
async def lists_with(cluster: Cluster, keywords: Path, name: str, text: str) -> AsyncIterator[None]:
    """The keyword lists with one more file while the block runs; after it, waits (at most 10 s) until safety
    screens with the lists as they were again, so that later tests' answers are cached under the usual version."""
    before = await policy_version(cluster)
    (keywords / name).write_text(text, encoding="utf-8")
    try:
        yield
    finally:
        (keywords / name).unlink()
        for _ in range(100):
            if await policy_version(cluster) == before:
                break
            await asyncio.sleep(RELOAD_SECONDS)


async def test_a_keyword_file_changed_on_disk_takes_effect_without_a_restart(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, keywords: Path
):
    message = f"a perfectly harmless {uuid.uuid4().hex[:8]} question"
    assert (await chat.Chat(request(message, temperature=0.9))).finish_reason == chat_pb2.FINISH_REASON_STOP

    async with lists_with(sim, keywords, "added.txt", "newly-banned\tperfectly harmless\n"):
        for _ in range(100):
            response = await chat.Chat(request(message, temperature=0.9))
            if response.finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER:
                break
            await asyncio.sleep(RELOAD_SECONDS)
        assert response.finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
        assert list(response.content_filter.categories) == ["newly-banned"]


async def test_the_same_first_question_from_two_users_is_answered_once_by_the_model(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    question = f"what are your opening hours? {uuid.uuid4().hex}"
    first = await chat.Chat(request(question, user_id="alice"))
    events = await stream(chat, request(question, user_id="bob"))

    completed = events[-1].completed
    assert not first.cached and completed.cached
    assert text_of(events) == first.text
    assert completed.usage.input_tokens == completed.usage.output_tokens == completed.usage.total_tokens == 0
    assert completed.cost_usd == 0
    assert sim.sim_stats()["requests"] == 1
    for user_id, conversation_id in (("alice", first.conversation_id), ("bob", events[0].started.conversation_id)):
        assert [m.content for m in await history(chat, conversation_id, user_id)] == [question, first.text]


async def test_a_cached_reply_screened_under_other_keyword_lists_is_not_served(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, keywords: Path
):
    """Any change of the lists (or the screening policy) changes the policy version that every cached reply
    records: replies screened before are answered anew (and cached under the new version), never served."""
    question = f"what are your prices? {uuid.uuid4().hex}"
    await chat.Chat(request(question))
    assert (await chat.Chat(request(question))).cached

    async with lists_with(sim, keywords, "other.txt", "unrelated\tsome other term\n"):
        for _ in range(100):
            response = await chat.Chat(request(question))
            if not response.cached:
                break
            await asyncio.sleep(RELOAD_SECONDS)
        assert not response.cached
        assert sim.sim_stats()["requests"] == 2
        assert (await chat.Chat(request(question))).cached


async def test_a_follow_up_with_another_history_is_not_answered_from_the_cache(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub
):
    follow_up = f"and why? {uuid.uuid4().hex}"
    first = await chat.Chat(request(f"topic one {uuid.uuid4().hex}"))
    second = await chat.Chat(request(f"topic two {uuid.uuid4().hex}"))
    one = await chat.Chat(request(follow_up, conversation_id=first.conversation_id))
    two = await chat.Chat(request(follow_up, conversation_id=second.conversation_id))

    assert not one.cached and not two.cached
    assert sim.sim_stats()["requests"] == 4


def follow_ups_after_the_same_history(chat: chat_pb2_grpc.ChatServiceStub) -> tuple[bool, bool]:
    """Two users ask the same first question (the second is answered from the cache, so both conversations hold the
    same history), then the same follow-up; whether each follow-up was answered from the cache."""
    first_question, follow_up = f"topic {uuid.uuid4().hex}", f"and why? {uuid.uuid4().hex}"
    alice = chat.Chat(request(first_question, user_id="alice"), timeout=20)
    bob = chat.Chat(request(first_question, user_id="bob"), timeout=20)
    assert bob.cached and bob.text == alice.text
    return (
        chat.Chat(request(follow_up, user_id="alice", conversation_id=alice.conversation_id), timeout=20).cached,
        chat.Chat(request(follow_up, user_id="bob", conversation_id=bob.conversation_id), timeout=20).cached,
    )


def test_by_default_follow_ups_are_neither_looked_up_nor_stored(cluster: Cluster):
    cluster.sim_reset()
    with grpc.insecure_channel(cluster.gateway_target) as channel:
        assert follow_ups_after_the_same_history(chat_pb2_grpc.ChatServiceStub(channel)) == (False, False)
    assert cluster.sim_stats()["requests"] == 3


def test_with_cache_follow_ups_on_a_follow_up_after_the_same_history_is_answered_from_the_cache():
    with Cluster(env={"CHATMESH_CACHE_FOLLOW_UPS": "true"}) as running:
        with grpc.insecure_channel(running.gateway_target) as channel:
            assert follow_ups_after_the_same_history(chat_pb2_grpc.ChatServiceStub(channel)) == (False, True)
        assert running.sim_stats()["requests"] == 2


@pytest.mark.parametrize(
    ("why", "options"),
    [("a reply cut by max_tokens", {"max_tokens": 3}), ("a temperature above the bound", {"temperature": 0.9})],
)
async def test_some_replies_are_never_cached(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, why: str, options):
    question = f"{why} {uuid.uuid4().hex}"
    await chat.Chat(request(question, **options))
    again = await chat.Chat(request(question, user_id="bob", **options))

    assert not again.cached
    assert sim.sim_stats()["requests"] == 2


async def test_turns_still_work_while_the_cache_is_down(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    cache = sim.processes["cache"]
    cache.kill()
    try:
        question = f"is anyone there? {uuid.uuid4().hex}"
        first = await chat.Chat(request(question))
        second = await chat.Chat(request(question, user_id="bob"))
        assert first.text and second.text == first.text
        assert not second.cached
        assert sim.sim_stats()["requests"] == 2
    finally:
        cache.start()


async def test_with_safety_down_a_turn_fails_closed(sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub):
    safety = sim.processes["safety"]
    safety.kill()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await chat.Chat(request(f"hello {uuid.uuid4().hex}"))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "safety service is unavailable" in raised.value.details()
        assert sim.sim_stats()["requests"] == 0
    finally:
        safety.start()


def test_with_safety_down_and_fail_open_set_a_turn_is_answered_unscreened_and_not_cached():
    running = Cluster(processes=("modelsim", "cache", "dialogue", "gateway"), env={"CHATMESH_SAFETY_FAIL_OPEN": "true"})
    running.start()
    try:
        with grpc.insecure_channel(running.gateway_target) as channel:
            chat = chat_pb2_grpc.ChatServiceStub(channel)
            first = chat.Chat(request("the forbidden fruit", user_id="alice"), timeout=20)
            second = chat.Chat(request("the forbidden fruit", user_id="bob"), timeout=20)
        assert first.finish_reason == chat_pb2.FINISH_REASON_STOP and first.text
        # An unscreened reply must not be served from the cache once safety is back.
        assert not second.cached
        assert running.sim_stats()["requests"] == 2
    finally:
        running.stop()
