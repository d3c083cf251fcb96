"""chatmesh.runtime.call_observer: one `request` line and the grpc_server_* metrics of every call, however it ends,
for calls served by a real in-process server and for bare unary handlers observed with `CallObserver.unary`."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client import REGISTRY

from chatmesh.runtime.access_log import UserIdHasher
from chatmesh.runtime.call_observer import CallObserver
from chatmesh.runtime.decoding import DecodeGuardInterceptor
from chatmesh.runtime.interceptors import observed
from chatmesh.runtime.logs import JsonFormatter, annotate
from chatmesh.runtime.settings import ProcessSettings
from chatmesh.runtime.status import abort
from chatmesh.v1 import chat_pb2, dialogue_pb2, dialogue_pb2_grpc, safety_pb2, safety_pb2_grpc

SECRET = "a user's secret text"
SCREEN_INPUT = "chatmesh.v1.SafetyService/ScreenInput"
TURN = "chatmesh.v1.DialogueService/RunTurn"
SALT = "test-salt"


class Safety(safety_pb2_grpc.SafetyServiceServicer):
    async def ScreenInput(self, request, context):
        annotate(user_id="alice")
        if request.text == "missing":
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no {SECRET}")
        if request.text == "bug":
            raise ValueError(SECRET)
        return safety_pb2.ScreenInputResponse(verdict=safety_pb2.Verdict(blocked=False))


class Dialogue(dialogue_pb2_grpc.DialogueServiceServicer):
    async def RunTurn(self, request, context):
        for _ in range(int(request.request.message or "0")):
            yield dialogue_pb2.TurnEvents(events=[chat_pb2.ChatEvent(delta=chat_pb2.Delta(text="x"))])
            await asyncio.sleep(0)


class Lines(logging.Handler):
    """Every line the process logs, as the JSON formatter writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter("safety"))
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(self.format(record))

    def requests(self) -> list[dict]:
        return [line for line in map(json.loads, self.texts) if line["event"] == "request"]


@pytest.fixture
def lines() -> Iterator[Lines]:
    access = logging.getLogger("chatmesh.access")
    level = access.level
    access.setLevel(logging.INFO)
    handler = Lines()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)
        access.setLevel(level)


@pytest.fixture
def observer() -> CallObserver:
    return CallObserver(ProcessSettings(log_user_id_salt=SALT), observed, metered=True)


@pytest.fixture
async def stubs(observer: CallObserver) -> AsyncIterator[tuple[safety_pb2_grpc.SafetyServiceStub, object]]:
    server = grpc.aio.server(interceptors=[observer, DecodeGuardInterceptor(observed)])
    safety_pb2_grpc.add_SafetyServiceServicer_to_server(Safety(), server)
    dialogue_pb2_grpc.add_DialogueServiceServicer_to_server(Dialogue(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield safety_pb2_grpc.SafetyServiceStub(channel), dialogue_pb2_grpc.DialogueServiceStub(channel)
    await server.stop(None)


def served(name: str, method: str, **labels: str) -> float:
    service, _, method_name = method.rpartition("/")
    labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method_name, **labels}
    return REGISTRY.get_sample_value(f"grpc_server_{name}", labels) or 0.0


def unary_counts() -> dict[str, float]:
    return {
        "started": served("started_total", SCREEN_INPUT),
        "OK": served("handled_total", SCREEN_INPUT, grpc_code="OK"),
        "NotFound": served("handled_total", SCREEN_INPUT, grpc_code="NotFound"),
        "Unknown": served("handled_total", SCREEN_INPUT, grpc_code="Unknown"),
        "Canceled": served("handled_total", SCREEN_INPUT, grpc_code="Canceled"),
        "received": served("msg_received_total", SCREEN_INPUT),
        "sent": served("msg_sent_total", SCREEN_INPUT),
        "timed": served("handling_seconds_count", SCREEN_INPUT),
    }


def increase(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


def assert_unexpected_failure_line(line: dict, lines: Lines) -> None:
    """UNKNOWN, with the exception's type and its frames down to the handler, and its message nowhere."""
    assert (line["grpc_code"], line["error"], line["level"]) == ("UNKNOWN", "unknown", "error")
    assert line["exception"] == "ValueError"
    handler_frame = line["traceback"][-1]
    assert handler_frame["file"] == __file__ and handler_frame["function"] in ("ScreenInput", "screen_input")
    assert all(SECRET not in text for text in lines.texts)


async def test_a_served_unary_call_has_one_line_whatever_its_outcome(stubs, lines: Lines):
    safety, _ = stubs
    metadata = (("x-request-id", "req-1"),)
    await safety.ScreenInput(safety_pb2.ScreenInputRequest(text="fine"), metadata=metadata)
    for text in ("missing", "bug"):
        with pytest.raises(grpc.aio.AioRpcError):
            await safety.ScreenInput(safety_pb2.ScreenInputRequest(text=text), metadata=metadata)

    fine, missing, bug = lines.requests()
    assert fine["method"] == SCREEN_INPUT and fine["request_id"] == "req-1"
    assert fine["user_id"] == UserIdHasher(SALT)("alice")
    assert (fine["grpc_code"], fine["error"], fine["level"]) == ("OK", None, "info")
    assert fine["latency_ms"] >= 0 and "exception" not in fine
    assert (missing["grpc_code"], missing["error"], missing["level"]) == ("NOT_FOUND", "not_found", "info")
    assert "exception" not in missing and "traceback" not in missing
    assert_unexpected_failure_line(bug, lines)


async def test_a_served_stream_has_one_line_when_it_ends_or_is_cancelled(stubs, lines: Lines):
    _, dialogue = stubs
    call = dialogue.RunTurn(dialogue_pb2.TurnRequest(request=chat_pb2.ChatRequest(message="5")))
    assert len([events async for events in call]) == 5
    call = dialogue.RunTurn(dialogue_pb2.TurnRequest(request=chat_pb2.ChatRequest(message="1000")))
    await call.read()
    call.cancel()
    for _ in range(100):
        if len(lines.requests()) == 2:
            break
        await asyncio.sleep(0.01)

    ended, cancelled = lines.requests()
    assert (ended["method"], ended["grpc_code"]) == (TURN, "OK")
    assert (cancelled["method"], cancelled["grpc_code"], cancelled["error"]) == (TURN, "CANCELLED", "cancelled")
    assert "exception" not in cancelled


async def test_each_method_is_wrapped_once(observer: CallObserver):
    handler = grpc.unary_unary_rpc_method_handler(Safety().ScreenInput)

    async def continuation(_details: object) -> grpc.RpcMethodHandler:
        return handler

    details = SimpleNamespace(method=f"/{SCREEN_INPUT}", invocation_metadata=())
    first = await observer.intercept_service(continuation, details)
    assert first is not handler
    assert await observer.intercept_service(continuation, details) is first


class Aborted(grpc.aio.AbortError):
    pass


class MinimalContext:
    """All that a unary request carried on a multiplexed stream has of a call."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._metadata = metadata
        self._code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: object = ()) -> None:
        self._code = code
        raise Aborted()


async def screen_input(request: safety_pb2.ScreenInputRequest, context: MinimalContext) -> object:
    return await Safety().ScreenInput(request, context)


async def test_a_bare_unary_handler_is_logged_and_counted_as_a_served_call(observer: CallObserver, lines: Lines):
    wrapped = observer.unary(SCREEN_INPUT, screen_input)
    before = unary_counts()

    response = await asyncio.create_task(
        wrapped(safety_pb2.ScreenInputRequest(text="fine"), MinimalContext((("x-request-id", "req-2"),)))
    )
    with pytest.raises(Aborted):
        await asyncio.create_task(wrapped(safety_pb2.ScreenInputRequest(text="missing"), MinimalContext()))
    with pytest.raises(ValueError):
        await asyncio.create_task(wrapped(safety_pb2.ScreenInputRequest(text="bug"), MinimalContext()))

    assert response == safety_pb2.ScreenInputResponse(verdict=safety_pb2.Verdict(blocked=False))
    assert increase(before, unary_counts()) == {
        "started": 3,
        "OK": 1,
        "NotFound": 1,
        "Unknown": 1,
        "received": 3,
        "sent": 1,
        "timed": 3,
    }
    fine, missing, bug = lines.requests()
    assert (fine["method"], fine["request_id"], fine["grpc_code"]) == (SCREEN_INPUT, "req-2", "OK")
    assert fine["user_id"] == UserIdHasher(SALT)("alice")
    assert (missing["grpc_code"], missing["error"]) == ("NOT_FOUND", "not_found")
    assert_unexpected_failure_line(bug, lines)


async def test_a_bare_unary_handler_that_is_cancelled_counts_as_cancelled(observer: CallObserver, lines: Lines):
    started = asyncio.Event()

    async def waits(request: object, context: MinimalContext) -> object:
        started.set()
        await asyncio.Event().wait()

    wrapped = observer.unary(SCREEN_INPUT, waits)
    before = unary_counts()
    task = asyncio.create_task(wrapped(safety_pb2.ScreenInputRequest(), MinimalContext()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert increase(before, unary_counts()) == {"started": 1, "Canceled": 1, "received": 1, "timed": 1}
    (line,) = lines.requests()
    assert (line["grpc_code"], line["error"], line["level"]) == ("CANCELLED", "cancelled", "info")


async def test_a_line_whose_level_is_off_is_not_built(
    observer: CallObserver, lines: Lines, monkeypatch: pytest.MonkeyPatch
):
    def never(self: UserIdHasher, user_id: str) -> str:
        raise AssertionError("the user id was hashed for a line that is not written")

    monkeypatch.setattr(UserIdHasher, "__call__", never)
    logging.getLogger("chatmesh.access").setLevel(logging.WARNING)
    wrapped = observer.unary(SCREEN_INPUT, screen_input)
    before = unary_counts()

    await asyncio.create_task(wrapped(safety_pb2.ScreenInputRequest(text="fine"), MinimalContext()))

    assert lines.requests() == []
    assert increase(before, unary_counts()) == {"started": 1, "OK": 1, "received": 1, "sent": 1, "timed": 1}


def test_unobserved_methods_are_left_as_they_are(observer: CallObserver):
    assert observer.unary("grpc.health.v1.Health/Check", screen_input) is screen_input
