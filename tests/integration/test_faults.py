"""Crashes under traffic: every process, and Redis, killed with SIGKILL at random moments while callers hold
multi-turn conversations and retry every failed turn with its idempotency key. Every conversation must end
up holding exactly the turns its caller saw succeed, each once, in order."""

import asyncio
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from support.cluster import Cluster
from support.redis_server import RedisServer

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

CALLERS = 6
TURNS = 12
# Callers go on past TURNS (up to MAX_TURNS) until the chaos has killed this many times, however slow the machine.
MIN_KILLS = 8
MAX_TURNS = 60
CALL_TIMEOUT_SECONDS = 3.0
# Everything a caller may get while a process is down, restarting or a claim's lease runs out.
RETRIED = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
}


@pytest.fixture
def redis_with_aof() -> Iterator[RedisServer]:
    server = RedisServer.start(appendonly=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def crashing(redis_with_aof: RedisServer) -> Iterator[Cluster]:
    with Cluster(
        redis_url=redis_with_aof.url,
        env={"CHATMESH_MODELSIM_TOKEN_DELAY_SECONDS": "0.02", "CHATMESH_MODELSIM_REPLY_TOKENS": "20"},
        replicas={"gateway": 2, "dialogue": 2},
    ) as running:
        yield running


@dataclass
class Tally:
    kills: list[str] = field(default_factory=list)
    retries: int = 0
    replays: int = 0
    refusals: int = 0


async def converse(
    caller: int, gateways: list[chat_pb2_grpc.ChatServiceStub], tally: Tally, deadline: float
) -> tuple[str, list[tuple[str, str]]]:
    """One caller's conversation of TURNS turns or more (until the chaos has killed MIN_KILLS times): each turn
    retried with its key until it succeeds. Returns the conversation id and the (message, reply) of every turn,
    as the caller saw them."""
    conversation_id = ""
    seen: list[tuple[str, str]] = []
    for turn in range(MAX_TURNS):
        if turn >= TURNS and len(tally.kills) >= MIN_KILLS:
            break
        request = chat_pb2.ChatRequest(
            conversation_id=conversation_id,
            user_id=f"caller-{caller}",
            message=f"caller {caller} turn {turn} {uuid.uuid4().hex[:8]}",
            idempotency_key=uuid.uuid4().hex,
        )
        for attempt in range(400):
            assert time.monotonic() < deadline, f"caller {caller} turn {turn} never succeeded"
            stub = gateways[(caller + turn + attempt) % len(gateways)]
            try:
                reply = await stub.Chat(request, timeout=CALL_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as error:
                assert error.code() in RETRIED, f"{error.code()}: {error.details()}"
                tally.retries += 1
                await asyncio.sleep(0.1)
                continue
            tally.replays += reply.replayed
            conversation_id = reply.conversation_id
            # A refusal is an answer (moderation fails closed while modelsim is down): kept without its text.
            refused = reply.finish_reason == chat_pb2.FINISH_REASON_CONTENT_FILTER
            tally.refusals += refused
            seen.append(("" if refused else request.message, reply.text))
            break
    return conversation_id, seen


async def chaos(cluster: Cluster, redis: RedisServer, tally: Tally, done: asyncio.Event) -> None:
    """Kills a random process (or Redis) every so often, and starts it again shortly after."""
    chooser = random.Random(20261203)
    victims = [name for name in cluster.processes if name != "modelsim"] + ["modelsim", "redis"]
    for _ in range(40):
        if done.is_set():
            return
        await asyncio.sleep(chooser.uniform(0.2, 0.6))
        victim = chooser.choice(victims)
        tally.kills.append(victim)
        if victim == "redis":
            redis.kill()
            await asyncio.sleep(chooser.uniform(0.1, 0.5))
            await asyncio.to_thread(redis.restart)
        else:
            cluster.processes[victim].kill()
            await asyncio.sleep(chooser.uniform(0.1, 0.5))
            await asyncio.to_thread(cluster.processes[victim].start)


async def read_when_back(
    gateway: chat_pb2_grpc.ChatServiceStub, request: chat_pb2.GetConversationRequest
) -> chat_pb2.GetConversationResponse:
    """The conversation, once the process or Redis that the chaos restarted last answers again (at most 50
    tries, 0.1 s apart)."""
    for _ in range(50):
        try:
            return await gateway.GetConversation(request, timeout=10)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, f"{error.code()}: {error.details()}"
            await asyncio.sleep(0.1)
    raise AssertionError("the cluster did not come back within 5 s of the last restart")


@pytest.mark.timeout(300)
async def test_every_turn_is_stored_exactly_once_through_crashes_of_every_process_and_redis(
    crashing: Cluster, redis_with_aof: RedisServer
):
    tally = Tally()
    done = asyncio.Event()
    channels = [grpc.aio.insecure_channel(target) for target in crashing.gateway_targets]
    gateways = [chat_pb2_grpc.ChatServiceStub(channel) for channel in channels]
    try:
        deadline = time.monotonic() + 200
        breaker = asyncio.create_task(chaos(crashing, redis_with_aof, tally, done))
        try:
            conversations = await asyncio.gather(
                *(converse(caller, gateways, tally, deadline) for caller in range(CALLERS))
            )
        finally:
            done.set()
            await breaker

        for caller, (conversation_id, seen) in enumerate(conversations):
            # One page holds every turn: at most MAX_TURNS of them, 2 * MAX_TURNS messages.
            request = chat_pb2.GetConversationRequest(
                conversation_id=conversation_id, user_id=f"caller-{caller}", page_size=2 * MAX_TURNS
            )
            stored = await read_when_back(gateways[0], request)
            messages = [(message.content) for message in stored.conversation.messages]
            assert messages == [text for pair in seen for text in pair]
    finally:
        for channel in channels:
            await channel.close()
    print(
        f"\nfaults: {len(tally.kills)} kills ({', '.join(tally.kills)}), "
        f"{sum(len(seen) for _, seen in conversations)} turns, "
        f"{tally.retries} retries, {tally.replays} replays, {tally.refusals} refusals"
    )
    assert len(tally.kills) >= MIN_KILLS
