"""Every call's outcome is unambiguous: the right code, a request id, and no internals in a message."""

import asyncio
import json
import random
import uuid

import grpc
import pytest
from support.cluster import Cluster

from chatmesh.v1 import chat_pb2, chat_pb2_grpc

# Things no error message may show a caller.
INTERNALS = ("<class", "Traceback", ".py", "Error:", "127.0.0.1", "ipv4:")


def raw_method(channel: grpc.aio.Channel, method: str, streaming: bool):
    """The method with bytes in and bytes out, so that any bytes can be sent."""
    if streaming:
        return channel.unary_stream(f"/chatmesh.v1.ChatService/{method}")
    return channel.unary_unary(f"/chatmesh.v1.ChatService/{method}")


def undecodable_requests(count: int) -> list[bytes]:
    """Random bytes (seeded), truncations of a valid request, and a string field with invalid UTF-8."""
    generator = random.Random(1234)
    valid = chat_pb2.ChatRequest(user_id="u", message="hello there", options={"model": "m"}).SerializeToString()
    requests = [valid[:cut] for cut in range(1, len(valid)) if cut not in (len(valid),)]
    # Field 3 (message), length 2, the bytes of no UTF-8 character.
    requests.append(bytes([0x1A, 0x02, 0xC3, 0x28]))
    while len(requests) < count:
        requests.append(bytes(generator.getrandbits(8) for _ in range(generator.randint(1, 64))))
    return requests


async def test_undecodable_bytes_are_invalid_argument_without_internals(sim: Cluster):
    """A few thousand malformed requests, bounded: none is UNKNOWN, none names a Python class."""
    seen: dict[grpc.StatusCode, int] = {}
    async with grpc.aio.insecure_channel(sim.gateway_target) as channel:
        for method, streaming in (("Chat", False), ("StreamChat", True), ("GetConversation", False)):
            call_method = raw_method(channel, method, streaming)
            for request in undecodable_requests(700):
                call = call_method(request, timeout=10)
                try:
                    if streaming:
                        async for _ in call:
                            pass
                    else:
                        await call
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                    assert not any(marker in (error.details() or "") for marker in INTERNALS), error.details()
                seen[code] = seen.get(code, 0) + 1

    assert grpc.StatusCode.UNKNOWN not in seen and grpc.StatusCode.INTERNAL not in seen
    assert seen[grpc.StatusCode.INVALID_ARGUMENT] > 1000
    errors = [
        line
        for line in sim.processes["gateway"].log().splitlines()
        if line.startswith("{") and json.loads(line)["level"] == "error"
    ]
    assert errors == []


async def test_a_truncated_request_says_it_is_not_a_valid_chat_request(sim: Cluster):
    valid = chat_pb2.ChatRequest(user_id="u", message="hello").SerializeToString()
    async with grpc.aio.insecure_channel(sim.gateway_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await raw_method(channel, "Chat", False)(valid[:-2], timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details() == "the request is not a valid chatmesh.v1.ChatRequest"


def request_id_of(metadata: tuple | None) -> str | None:
    return next((value for key, value in metadata or () if key == "x-request-id"), None)


@pytest.mark.parametrize(
    "bad",
    [
        chat_pb2.ChatRequest(user_id="", message="hi"),
        chat_pb2.ChatRequest(user_id="u", message="hi", conversation_id="no-such-conversation"),
    ],
    ids=["invalid-argument", "not-found"],
)
async def test_every_failed_stream_carries_its_request_id_under_concurrency(
    sim: Cluster, chat: chat_pb2_grpc.ChatServiceStub, bad: chat_pb2.ChatRequest
):
    async def one() -> tuple[str, str | None, grpc.StatusCode]:
        sent = f"mine-{uuid.uuid4().hex}"
        call = chat.StreamChat(bad, metadata=(("x-request-id", sent),))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in call:
                pass
        # The error's trailers carry it on every call, whether or not its headers reached the caller.
        return sent, request_id_of(await call.trailing_metadata()), failure.value.code()

    outcomes = await asyncio.gather(*(one() for _ in range(64)))
    assert {code for _, _, code in outcomes} == {
        grpc.StatusCode.INVALID_ARGUMENT if not bad.user_id else grpc.StatusCode.NOT_FOUND
    }
    assert all(received == sent for sent, received, _ in outcomes)
