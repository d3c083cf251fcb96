"""One safety stream per turn: the user's message is screened first, then the reply as it streams.

The stream opens with the user's message and safety answers it with a verdict before anything else,
so a blocked input never reaches the model. The model's deltas then go to the same stream as they
arrive (coalesced while a write is in flight), and safety answers with how much of the reply is
cleared. Only cleared text is released, so a listed term split across deltas never reaches the caller,
while text that cannot be the start of a term goes out at once: the stream stays a stream. One stream
for both costs a turn one call to safety instead of two.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from chatmesh.dialogue.coalesce import coalesce
from chatmesh.runtime.model_client import ModelOutcome
from chatmesh.v1 import safety_pb2, safety_pb2_grpc


@dataclass(frozen=True, slots=True)
class OutputBlocked:
    categories: list[str]


class SafetyUnavailable(Exception):
    """The safety service could not be reached or broke off; nothing uncleared was released."""


class TurnScreen:
    """The turn's safety stream. `open` it with the user's message; then `screen_output` the reply, or
    `finish` it unused (a cached answer); `close` it in every case."""

    def __init__(self, call: grpc.aio.StreamStreamCall, input_verdict: safety_pb2.Verdict) -> None:
        self._call = call
        self.input_verdict = input_verdict
        # Safety ends the call by itself once it has given its last answer (a blocked input, a complete or
        # blocked reply) or once the request stream ends; cancelling it then would only turn OK into
        # CANCELLED on our side.
        self._ending = input_verdict.blocked

    @classmethod
    async def open(
        cls, safety: safety_pb2_grpc.SafetyServiceStub, message: str, request_id: str, deadline: float
    ) -> TurnScreen:
        """Sends the user's message and waits for its verdict. `deadline` is in `loop.time()` terms."""
        call = safety.ScreenOutput(timeout=deadline - asyncio.get_running_loop().time())
        try:
            await call.write(safety_pb2.ScreenOutputRequest(input=message, request_id=request_id))
            response = await call.read()
        except grpc.aio.AioRpcError as error:
            raise SafetyUnavailable(f"the safety service failed: {error.code().name}") from error
        except BaseException:
            call.cancel()
            raise
        if response is grpc.aio.EOF or not response.HasField("input_verdict"):
            call.cancel()
            raise SafetyUnavailable("the safety service did not answer the input")
        return cls(call, response.input_verdict)

    async def finish(self) -> None:
        """Ends the request stream when the reply needs no screening; safety then completes the call."""
        self._ending = True
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._call.done_writing()

    def close(self) -> None:
        """Cancels the call unless it is ending by itself (for a turn that failed or was cancelled)."""
        if not self._ending:
            self._call.cancel()

    async def screen_output(
        self, source: AsyncIterator[str | ModelOutcome]
    ) -> AsyncIterator[str | ModelOutcome | OutputBlocked]:
        """Yields cleared text, then the model's outcome, or OutputBlocked as the last item.

        An error of `source` is raised after the text safety cleared before it. Closing this iterator
        closes `source`.
        """
        call = self._call
        received: list[str] = []
        outcomes: list[ModelOutcome] = []

        async def feed() -> None:
            try:
                async for item in coalesce(source):
                    if isinstance(item, str):
                        received.append(item)
                        await call.write(safety_pb2.ScreenOutputRequest(text=item))
                    else:
                        outcomes.append(item)
                await call.write(safety_pb2.ScreenOutputRequest(final=True))
            finally:
                # Ending the request stream makes safety screen what it has and finish; if the model
                # failed, the reader learns it from this task once safety is done.
                with contextlib.suppress(Exception):
                    await call.done_writing()

        feeder = asyncio.create_task(feed())
        reply = ""
        released = 0
        try:
            async for response in call:
                if response.cleared_chars > released:
                    if response.cleared_chars > len(reply):
                        reply = "".join(received)
                    yield reply[released : response.cleared_chars]
                    released = response.cleared_chars
                if response.verdict.blocked:
                    self._ending = True
                    yield OutputBlocked(list(response.verdict.categories))
                    return
                if response.complete:
                    self._ending = True
                    await feeder
                    yield outcomes[0]
                    return
            raise SafetyUnavailable("the safety service ended the output screen without a verdict")
        except grpc.aio.AioRpcError as error:
            raise SafetyUnavailable(f"the safety service failed: {error.code().name}") from error
        finally:
            if not feeder.done():
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeder
