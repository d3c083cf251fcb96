"""Many unary calls on a few long-lived streams (chatmesh.v1.MultiplexService), for dialogue's calls to safety and
cache.

A unary call costs about 40% more CPU, on both sides, than one message on a stream that is already open
(../shared/perf-notes.md), and a turn makes several: the input screen, the cache lookup, the store of the answer.
So dialogue keeps `multiplex_streams` streams open per channel and sends those calls as messages on them, matched
by id. Each call is served by the same handler as its unary method, and logged, counted and traced under that
method's name (see `MultiplexServicer`), so logs, dashboards and traces read the same either way.

What a unary call gives, and how the streams keep it:
- **Deadlines**: each call carries its timeout; the caller stops waiting at it (DEADLINE_EXCEEDED) and the server
  stops the handler at it.
- **Cancellation**: a caller that stops waiting drops its call's result when it comes; the server finishes the
  handler (screens and lookups take milliseconds) or stops it at the call's deadline.
- **Load balancing**: internal channels balance round robin over the replicas' addresses, and each stream is a
  call of its own, so the streams spread over replicas as unary calls did. They are replaced every
  `rotate_seconds` (within the servers' max connection age), so new replicas get their share.
- **Failures**: a draining server says so on each of its streams (`draining`), answers the calls it has read and
  ends them; a call it never read, or one that could not be written because its stream had so ended, is sent again
  on the next stream (another replica's, or a new one) while its deadline allows, at most MOST_SENDS times. The
  notice, not the stream's status, tells a drained stream: a write that fails as a stream ends turns its OK into
  INTERNAL. When a stream breaks (a
  replica killed, a connection lost), each call waiting on it is sent once more on another stream, as the channels'
  retry policy resends a unary call that found no process; if that fails too, the call fails with UNAVAILABLE. An
  answer a handler gave (an error status included) is never resent.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from chatmesh.runtime.grpc_server import Servicer
from chatmesh.runtime.interceptors import unary_call_observer
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.propagation import observe_multiplexed_call
from chatmesh.runtime.settings import DialogueSettings, ProcessSettings
from chatmesh.v1 import multiplex_pb2, multiplex_pb2_grpc

log = get_logger(__name__)

CALLS_METHOD = "/chatmesh.v1.MultiplexService/Calls"
# What a draining server sends on each of its streams: it reads no more calls from it.
DRAINING = multiplex_pb2.MultiplexedResult(draining=True)
# The longest a failed write waits for its stream's reader to see the stream's end (it has come, or is coming).
READER_END_SECONDS = 1.0
# The most streams one call is sent on. A call is resent without limit but this one (and its deadline) only while
# draining servers end its streams unread: while a replica drains, new streams may still reach it.
MOST_SENDS = 16
_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


# The server side.


class CallAborted(grpc.aio.AbortError):
    """A multiplexed call's handler ended it with a status (`CallContext.abort`); an AbortError, as a served call's
    abort raises, so that what observes calls reads its status from the context."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, Any], ...]) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


class CallContext:
    """What a unary handler uses of its grpc.aio.ServicerContext, for a call that came on a multiplexed stream:
    its metadata, its deadline, and `abort`. A handler that needs more must not be multiplexed (the servicer's
    tests run every multiplexed method through a stream, error paths included)."""

    __slots__ = ("_code", "_deadline", "_metadata")

    def __init__(self, metadata: tuple[tuple[str, str], ...], deadline: float | None) -> None:
        self._metadata = metadata
        self._deadline = deadline
        self._code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def code(self) -> grpc.StatusCode | None:
        return self._code

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: tuple[tuple[str, Any], ...] = ()
    ) -> NoReturn:
        self._code = code
        raise CallAborted(code, details, tuple(trailing_metadata))


@dataclass(frozen=True, slots=True)
class UnaryMethod:
    """A unary method that may come on a multiplexed stream: how to read its request, and its handler."""

    request_type: type[Message]
    handler: Callable[[Any, Any], Awaitable[Message]]


# Given a method ("/package.Service/Method") and its handler, the handler observed (traced, logged, counted) as a
# served unary call of that method is (chatmesh.runtime.interceptors.unary_call_observer).
ObserveHandler = Callable[[str, Callable[[Any, Any], Awaitable[Message]]], Callable[[Any, Any], Awaitable[Message]]]


def _unobserved_handler(
    method: str, handler: Callable[[Any, Any], Awaitable[Message]]
) -> Callable[[Any, Any], Awaitable[Message]]:
    return handler


class MultiplexServicer(multiplex_pb2_grpc.MultiplexServiceServicer):
    """Serves `methods` ("/package.Service/Method" -> UnaryMethod) on MultiplexService.Calls streams, each call's
    handler observed by `observe` as a call of its method."""

    def __init__(self, methods: Mapping[str, UnaryMethod], observe: ObserveHandler = _unobserved_handler) -> None:
        self._methods = {
            path: UnaryMethod(method.request_type, observe(path, method.handler)) for path, method in methods.items()
        }
        self._readers: set[asyncio.Task[None]] = set()
        self._draining = False

    def drain(self) -> None:
        """The process is stopping: every stream stops reading calls, answers those it has, and ends with OK, so
        that callers send their next calls to another replica."""
        self._draining = True
        for reader in self._readers:
            reader.cancel()

    async def Calls(
        self, calls: AsyncIterator[multiplex_pb2.MultiplexedCall], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[multiplex_pb2.MultiplexedResult]:
        results: asyncio.Queue[multiplex_pb2.MultiplexedResult | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def serve(call: multiplex_pb2.MultiplexedCall) -> None:
            results.put_nowait(await self._result(call))

        async def read() -> None:
            try:
                async for call in calls:
                    task = asyncio.create_task(serve(call))
                    running.add(task)
                    task.add_done_callback(running.discard)
            except asyncio.CancelledError:
                # Draining: the caller learns that calls not answered by the end were not read; those read so far
                # are answered below.
                results.put_nowait(DRAINING)
            finally:
                if running:
                    await asyncio.wait(running)
                results.put_nowait(None)

        if self._draining:
            yield DRAINING
            return
        reader = asyncio.create_task(read())
        self._readers.add(reader)
        try:
            while (result := await results.get()) is not None:
                yield result
        finally:
            self._readers.discard(reader)
            if not reader.done():
                # The caller went away: its calls' results have nowhere to go.
                reader.cancel()
                for task in running:
                    task.cancel()

    async def _result(self, call: multiplex_pb2.MultiplexedCall) -> multiplex_pb2.MultiplexedResult:
        unary = self._methods.get(call.method)
        if unary is None:
            return _error(call.id, grpc.StatusCode.UNIMPLEMENTED, f"{call.method} is not served on this stream")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + call.timeout_seconds if call.timeout_seconds > 0 else None
        context = CallContext(tuple(call.metadata.items()), deadline)
        try:
            request = unary.request_type.FromString(call.request)
        except Exception:
            return _error(call.id, grpc.StatusCode.INVALID_ARGUMENT, "the request could not be decoded")
        try:
            async with asyncio.timeout_at(deadline):
                response = await unary.handler(request, context)
        except CallAborted as aborted:
            return _error(call.id, aborted.code, aborted.details, aborted.trailing_metadata)
        except TimeoutError:
            return _error(call.id, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        except Exception:
            log.exception("multiplexed_call_failed", extra={"method": call.method})
            return _error(call.id, grpc.StatusCode.UNKNOWN, "Unexpected error in the handler")
        return multiplex_pb2.MultiplexedResult(id=call.id, response=response.SerializeToString())


def _error(
    call_id: int, code: grpc.StatusCode, message: str, trailing_metadata: tuple[tuple[str, Any], ...] = ()
) -> multiplex_pb2.MultiplexedResult:
    return multiplex_pb2.MultiplexedResult(
        id=call_id,
        code=code.value[0],
        message=message,
        trailing_metadata=[
            multiplex_pb2.MetadataEntry(key=key, value=value if isinstance(value, bytes) else value.encode())
            for key, value in trailing_metadata
        ],
    )


# The caller's side.


class StreamEnded(Exception):
    """The stream a call waited on ended before the call's result came: `drained` when its server ended it (a
    draining server answers every call it read, so the call was never read), else it broke."""

    def __init__(self, why: str, drained: bool) -> None:
        super().__init__(why)
        self.drained = drained


@dataclass(eq=False)
class _Stream:
    call: Any  # grpc.aio.StreamStreamCall
    opened_at: float
    pending: dict[int, asyncio.Future[multiplex_pb2.MultiplexedResult]] = field(default_factory=dict)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reader: asyncio.Task[None] | None = None
    # Its server said it drains: calls it has not answered by the end were never read.
    drained: bool = False
    retiring: bool = False


# Adds what a call carries downstream (request id, tenant, trace context) to its metadata, and returns what ends its
# client-side observation (span, metrics) with the call's status.
ObserveCall = Callable[[str, dict[str, str]], Callable[[grpc.StatusCode], None]]


def _unobserved(method: str, metadata: dict[str, str]) -> Callable[[grpc.StatusCode], None]:
    return lambda code: None


class Multiplexer:
    """Unary calls over `streams` MultiplexService.Calls streams of `channel`, each replaced after `rotate_seconds`."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        streams: int,
        rotate_seconds: float,
        observe_call: ObserveCall = _unobserved,
    ) -> None:
        self._stub = multiplex_pb2_grpc.MultiplexServiceStub(channel)
        self._slots: list[_Stream | None] = [None] * streams
        self._next_slot = itertools.cycle(range(streams))
        self._ids = itertools.count(1)
        self._rotate_seconds = rotate_seconds
        self._observe_call = observe_call

    async def call(self, method: str, request: Message, response_type: type[Message], seconds: float | None) -> Any:
        """The unary call `method` ("/package.Service/Method") within `seconds` (None: no deadline), on a stream;
        raises grpc.aio.AioRpcError as a unary call would."""
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        metadata: dict[str, str] = {}
        done = self._observe_call(method, metadata)
        payload = request.SerializeToString()
        code = grpc.StatusCode.UNKNOWN
        try:
            result = await self._send(loop, method, payload, metadata, deadline)
            code = _CODES_BY_VALUE.get(result.code, grpc.StatusCode.UNKNOWN)
            if code is not grpc.StatusCode.OK:
                raise _rpc_error(code, result.message, result.trailing_metadata)
            return response_type.FromString(result.response)
        except grpc.aio.AioRpcError as failed:
            code = failed.code()
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            done(code)

    async def _send(
        self,
        loop: asyncio.AbstractEventLoop,
        method: str,
        payload: bytes,
        metadata: dict[str, str],
        deadline: float | None,
    ) -> multiplex_pb2.MultiplexedResult:
        """The call's result, from the first stream that answers it. A call that a draining server never read is
        sent again on the next stream (another replica's, or a new one) while its deadline allows; one that a broken
        stream (or a stream that found no server) may have carried, once more only: a handler's answer, an error
        included, is never resent."""
        resends_after_break = 1
        failure: Exception | None = None
        for _ in range(MOST_SENDS):
            stream = self._stream(loop)
            call_id = next(self._ids)
            waiter: asyncio.Future[multiplex_pb2.MultiplexedResult] = loop.create_future()
            stream.pending[call_id] = waiter
            remaining = 0.0 if deadline is None else max(deadline - loop.time(), 0.001)
            message = multiplex_pb2.MultiplexedCall(
                id=call_id, method=method, request=payload, timeout_seconds=remaining, metadata=metadata
            )
            try:
                async with asyncio.timeout_at(deadline):
                    async with stream.write_lock:
                        await stream.call.write(message)
                    return await waiter
            except TimeoutError:
                raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            except (StreamEnded, grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as ended:
                self._forget(stream)
                failure = ended
                if not await _drained(stream, ended):
                    if resends_after_break == 0:
                        break
                    resends_after_break -= 1
            finally:
                stream.pending.pop(call_id, None)
                if waiter.done() and not waiter.cancelled():
                    # Marked as seen: the stream's end that failed the write may have failed the waiter as well.
                    waiter.exception()
                self._retire_if_idle(stream)
        raise _rpc_error(grpc.StatusCode.UNAVAILABLE, f"the stream to the service ended: {failure}")

    def _stream(self, loop: asyncio.AbstractEventLoop) -> _Stream:
        """The next slot's stream: opened when the slot has none, or its stream ended or is due to be replaced."""
        slot = next(self._next_slot)
        current = self._slots[slot]
        if (
            current is not None
            and not current.drained
            and not current.call.done()
            and loop.time() - current.opened_at < self._rotate_seconds
        ):
            return current
        stream = self._slots[slot] = self._open(loop)
        if current is not None:
            current.retiring = True
            self._retire_if_idle(current)
        return stream

    def _open(self, loop: asyncio.AbstractEventLoop) -> _Stream:
        # Opened in an empty context: the stream outlives the turn being served, so it must not carry that turn's
        # request id or trace context (each call carries its own).
        call = contextvars.Context().run(self._stub.Calls)
        stream = _Stream(call=call, opened_at=loop.time())
        stream.reader = asyncio.create_task(self._read(stream), context=contextvars.Context())
        return stream

    async def _read(self, stream: _Stream) -> None:
        error: BaseException | None = None
        try:
            async for result in stream.call:
                if result.draining:
                    stream.drained = True
                    continue
                waiter = stream.pending.get(result.id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(result)
        except grpc.aio.AioRpcError as failure:
            error = failure
        except asyncio.CancelledError:
            pass
        finally:
            # A drained stream may still end with an error: a write that failed on it as it ended sets one.
            if stream.drained or not isinstance(error, grpc.aio.AioRpcError):
                why = StreamEnded("the server drained it", drained=True)
            else:
                why = StreamEnded(error.code().name, drained=False)
            for waiter in stream.pending.values():
                if not waiter.done():
                    waiter.set_exception(why)

    def _forget(self, stream: _Stream) -> None:
        """A stream that failed a call takes no more: its slot opens a new one on its next call."""
        stream.retiring = True
        self._slots = [None if current is stream else current for current in self._slots]

    @staticmethod
    def _retire_if_idle(stream: _Stream) -> None:
        """A stream replaced or failed is closed once no call waits on it."""
        if stream.retiring and not stream.pending:
            stream.call.cancel()

    async def close(self) -> None:
        for stream in self._slots:
            if stream is not None:
                stream.call.cancel()
                if stream.reader is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await stream.reader
        self._slots = [None] * len(self._slots)


async def _drained(stream: _Stream, failure: Exception) -> bool:
    """Whether the call that failed with `failure` on `stream` was never read because the stream's server drained
    it. Otherwise the stream broke (or never reached a server), and the call may have been served."""
    if isinstance(failure, StreamEnded):
        return failure.drained
    # The call's write failed because the stream had ended: its reader, which ends with it, has seen whether its
    # server said it drained.
    if stream.reader is not None:
        await asyncio.wait({stream.reader}, timeout=READER_END_SECONDS)
    return stream.drained


def _rpc_error(code: grpc.StatusCode, message: str, trailing: Any = ()) -> grpc.aio.AioRpcError:
    metadata = grpc.aio.Metadata(
        *((entry.key, entry.value if entry.key.endswith("-bin") else entry.value.decode()) for entry in trailing)
    )
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), metadata, message)


class MultiplexedStub:
    """A service's stub whose `methods` go over `multiplexer` (name -> response type); its other methods are the
    stub's own."""

    def __init__(self, stub: Any, service: str, multiplexer: Multiplexer, methods: Mapping[str, type[Message]]) -> None:
        self._stub = stub
        for name, response_type in methods.items():
            setattr(self, name, self._method(multiplexer, f"/{service}/{name}", response_type))

    @staticmethod
    def _method(multiplexer: Multiplexer, path: str, response_type: type[Message]) -> Callable[..., Awaitable[Any]]:
        def call(request: Message, *, timeout: float | None = None) -> Awaitable[Any]:
            return multiplexer.call(path, request, response_type, timeout)

        return call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)


# Wiring, for the processes' mains.

# The longest a stream is used before calls go to a new one; at most half the servers' max connection age.
ROTATE_SECONDS = 30.0


def _unary_method(service: ServiceDescriptor, name: str) -> MethodDescriptor:
    method = service.methods_by_name[name]
    if method.client_streaming or method.server_streaming:
        raise ValueError(f"{service.full_name}/{name} is not a unary method")
    return method


def multiplex_servicer(
    service: ServiceDescriptor, servicer: Any, names: Iterable[str], settings: ProcessSettings
) -> Servicer:
    """The MultiplexService of a process that also serves the unary methods `names` of `service` (as `servicer`
    serves them) on multiplexed streams, each call traced, logged and counted as a unary call of its method."""
    methods = {
        f"/{service.full_name}/{name}": UnaryMethod(
            GetMessageClass(_unary_method(service, name).input_type), getattr(servicer, name)
        )
        for name in names
    }
    multiplexing = MultiplexServicer(methods, unary_call_observer(settings))
    return Servicer(
        multiplex_pb2.DESCRIPTOR.services_by_name["MultiplexService"].full_name,
        lambda server: multiplex_pb2_grpc.add_MultiplexServiceServicer_to_server(multiplexing, server),
        drain=multiplexing.drain,
    )


def multiplexed(
    stub: Any,
    service: ServiceDescriptor,
    names: Iterable[str],
    channel: grpc.aio.Channel,
    settings: DialogueSettings,
) -> tuple[Any, Multiplexer | None]:
    """`stub` (of `service` on `channel`) with its unary methods `names` sent on multiplexed streams, and the
    Multiplexer to close at the end; `stub` itself when `multiplex_streams` is 0."""
    if settings.multiplex_streams == 0:
        return stub, None
    rotate_seconds = min(ROTATE_SECONDS, settings.grpc_max_connection_age_ms / 2000)
    multiplexer = Multiplexer(channel, settings.multiplex_streams, rotate_seconds, observe_multiplexed_call)
    methods = {name: GetMessageClass(_unary_method(service, name).output_type) for name in names}
    return MultiplexedStub(stub, service.full_name, multiplexer, methods), multiplexer
