"""Unary calls on multiplexed streams (chatmesh.runtime.multiplex), against an in-process server: each call is
answered as its unary method would answer it, by id and in any order, within its own deadline, and a stream that
ends leaves no caller waiting."""

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chatmesh.runtime.channels import open_channel
from chatmesh.runtime.multiplex import Multiplexer, MultiplexServicer, UnaryMethod, multiplex_servicer
from chatmesh.runtime.settings import ProcessSettings
from chatmesh.runtime.status import abort_with, invalid_argument, is_deliberate
from chatmesh.v1 import multiplex_pb2, multiplex_pb2_grpc, safety_pb2

ECHO = "/test.Echo/Echo"
CALL_SECONDS = 5.0


class Echo:
    """Answers with the request's text after `request.request_id` milliseconds (a number), refuses an empty text,
    and fails on "bug"."""

    def __init__(self) -> None:
        self.finished: list[str] = []
        self.cancelled: list[str] = []

    async def handle(self, request: safety_pb2.ScreenInputRequest, context) -> safety_pb2.ScreenInputRequest:
        try:
            await asyncio.sleep(int(request.request_id or "0") / 1000)
        except asyncio.CancelledError:
            self.cancelled.append(request.text)
            raise
        if not request.text:
            await abort_with(context, invalid_argument([("text", "required")]))
        if request.text == "bug":
            raise ValueError("a bug")
        self.finished.append(request.text)
        return safety_pb2.ScreenInputRequest(text=request.text.upper(), request_id=str(context.time_remaining() or ""))


@pytest.fixture
async def served() -> AsyncIterator[tuple[Echo, MultiplexServicer, grpc.aio.Channel]]:
    echo = Echo()
    servicer = MultiplexServicer({ECHO: UnaryMethod(safety_pb2.ScreenInputRequest, echo.handle)})
    server = grpc.aio.server()
    multiplex_pb2_grpc.add_MultiplexServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield echo, servicer, channel
    await server.stop(None)


def echo(multiplexer: Multiplexer, text: str, delay_ms: int = 0, seconds: float | None = CALL_SECONDS):
    request = safety_pb2.ScreenInputRequest(text=text, request_id=str(delay_ms))
    return multiplexer.call(ECHO, request, safety_pb2.ScreenInputRequest, seconds)


async def test_many_calls_on_two_streams_are_each_answered_with_their_own_response(served):
    _, _, channel = served
    multiplexer = Multiplexer(channel, streams=2, rotate_seconds=60)
    texts = [f"call {index}" for index in range(40)]
    # Later calls finish first: answers are matched by id, not by order.
    responses = await asyncio.gather(*(echo(multiplexer, text, 40 - index) for index, text in enumerate(texts)))
    assert [response.text for response in responses] == [text.upper() for text in texts]
    await multiplexer.close()


async def test_a_handlers_error_status_reaches_the_caller_with_its_details_and_chatmeshs_mark(served):
    _, _, channel = served
    multiplexer = Multiplexer(channel, streams=1, rotate_seconds=60)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await echo(multiplexer, "")
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "text: required"
    assert is_deliberate(refused.value)
    detail = rpc_status.from_call(refused.value).details[0]
    bad_request = error_details_pb2.BadRequest()
    detail.Unpack(bad_request)
    assert bad_request.field_violations[0].field == "text"

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await echo(multiplexer, "bug")
    assert failed.value.code() is grpc.StatusCode.UNKNOWN
    assert "a bug" not in failed.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await multiplexer.call("/test.Echo/Other", safety_pb2.ScreenInputRequest(), safety_pb2.ScreenInputRequest, 1)
    assert unknown.value.code() is grpc.StatusCode.UNIMPLEMENTED
    # The stream is still fine.
    assert (await echo(multiplexer, "after")).text == "AFTER"
    await multiplexer.close()


async def test_each_call_has_its_own_deadline_which_the_handler_sees_and_is_stopped_at(served):
    handler, _, channel = served
    multiplexer = Multiplexer(channel, streams=1, rotate_seconds=60)
    slow = asyncio.ensure_future(echo(multiplexer, "slow", delay_ms=2000, seconds=0.2))
    fast = await echo(multiplexer, "fast", seconds=3.0)
    assert 2.0 < float(fast.request_id) <= 3.0  # the handler's time_remaining
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await slow
    assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.sleep(0.3)
    assert handler.cancelled == ["slow"]
    await multiplexer.close()


async def test_a_cancelled_caller_leaves_the_stream_and_the_other_calls_unharmed(served):
    _, _, channel = served
    multiplexer = Multiplexer(channel, streams=1, rotate_seconds=60)
    gone = asyncio.ensure_future(echo(multiplexer, "gone", delay_ms=100))
    others = [asyncio.ensure_future(echo(multiplexer, f"other {index}", delay_ms=150)) for index in range(5)]
    await asyncio.sleep(0.05)
    gone.cancel()
    assert [response.text for response in await asyncio.gather(*others)] == [f"OTHER {index}" for index in range(5)]
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert (await echo(multiplexer, "next")).text == "NEXT"
    await multiplexer.close()


async def test_a_draining_server_answers_what_it_read_and_later_calls_fail_unavailable_without_hanging(served):
    handler, servicer, channel = served
    multiplexer = Multiplexer(channel, streams=1, rotate_seconds=60)
    in_flight = asyncio.ensure_future(echo(multiplexer, "in flight", delay_ms=200))
    await asyncio.sleep(0.05)
    servicer.drain()
    assert (await in_flight).text == "IN FLIGHT"
    # This server takes no more calls, and there is no other replica: new streams end unread until MOST_SENDS.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(echo(multiplexer, "after drain"), 5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "after drain" not in handler.finished
    await multiplexer.close()


async def test_a_draining_server_says_so_on_each_stream_before_the_answers_it_still_owes(served):
    _, servicer, channel = served
    stream = multiplex_pb2_grpc.MultiplexServiceStub(channel).Calls()
    request = safety_pb2.ScreenInputRequest(text="read", request_id="200")
    await stream.write(multiplex_pb2.MultiplexedCall(id=7, method=ECHO, request=request.SerializeToString()))
    await asyncio.sleep(0.05)
    servicer.drain()

    notice, answer = [result async for result in stream]
    assert notice == multiplex_pb2.MultiplexedResult(draining=True)
    assert (answer.id, answer.code) == (7, 0)
    assert await stream.code() == grpc.StatusCode.OK
    # A stream opened once the server drains is told at once.
    assert [result async for result in multiplex_pb2_grpc.MultiplexServiceStub(channel).Calls()] == [notice]


async def test_while_one_of_two_replicas_drains_under_load_every_call_is_answered_by_the_other():
    replicas = [Echo(), Echo()]
    servicers = [MultiplexServicer({ECHO: UnaryMethod(safety_pb2.ScreenInputRequest, one.handle)}) for one in replicas]
    servers, ports = [], []
    for servicer in servicers:
        server = grpc.aio.server()
        multiplex_pb2_grpc.add_MultiplexServiceServicer_to_server(servicer, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
    channel = open_channel(f"ipv4:{','.join(f'127.0.0.1:{port}' for port in ports)}", ProcessSettings())
    # Streams replaced often, so that they spread over both replicas once both are connected.
    multiplexer = Multiplexer(channel, streams=4, rotate_seconds=0.02)

    async def caller(index: int) -> list[str]:
        return [(await echo(multiplexer, f"{index}.{turn}", delay_ms=2)).text for turn in range(60)]

    callers = asyncio.gather(*(caller(index) for index in range(8)))
    for _ in range(100):
        if replicas[0].finished and replicas[1].finished:
            break
        await asyncio.sleep(0.01)
    # As a process stops: its streams drain, then its server refuses new calls.
    servicers[0].drain()
    await asyncio.sleep(0.05)
    await servers[0].stop(5)
    answered = await asyncio.wait_for(callers, 30)

    assert answered == [[f"{index}.{turn}" for turn in range(60)] for index in range(8)]
    assert replicas[0].finished and replicas[1].finished
    assert len(replicas[1].finished) > len(replicas[0].finished)
    assert len(replicas[0].finished) + len(replicas[1].finished) == 8 * 60
    await multiplexer.close()
    await channel.close()
    for server in servers:
        await server.stop(None)


async def test_a_server_that_goes_away_fails_waiting_calls_with_unavailable():
    server = grpc.aio.server()
    multiplex_pb2_grpc.add_MultiplexServiceServicer_to_server(
        MultiplexServicer({ECHO: UnaryMethod(safety_pb2.ScreenInputRequest, Echo().handle)}), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as lost_channel:
        multiplexer = Multiplexer(lost_channel, streams=2, rotate_seconds=60)
        assert (await echo(multiplexer, "before")).text == "BEFORE"
        waiting = [asyncio.ensure_future(echo(multiplexer, f"waiting {index}", delay_ms=5000)) for index in range(4)]
        await asyncio.sleep(0.1)
        await server.stop(None)
        outcomes = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
        assert {outcome.code() for outcome in outcomes} == {grpc.StatusCode.UNAVAILABLE}
        await multiplexer.close()


def test_only_unary_methods_can_be_multiplexed():
    safety = safety_pb2.DESCRIPTOR.services_by_name["SafetyService"]
    with pytest.raises(ValueError, match="ScreenOutput is not a unary method"):
        multiplex_servicer(safety, object(), ("ScreenOutput",), ProcessSettings())
