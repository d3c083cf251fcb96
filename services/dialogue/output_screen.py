"""Release a streamed reply only as fast as safety clears it.

The model's deltas go to safety's ScreenOutput stream as they arrive (coalesced while a write is in
flight); safety answers with how much of the reply is cleared. Only cleared text is yielded, so a
listed term split across deltas never reaches the caller, while text that cannot be the start of a
term goes out at once: the stream stays a stream.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from chatmesh.dialogue.coalesce import coalesce
from chatmesh.model.client import ModelOutcome
from chatmesh.runtime.logs import get_logger
from chatmesh.v1 import safety_pb2, safety_pb2_grpc

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class OutputBlocked:
    categories: list[str]


@dataclass(slots=True)
class OutputVerdict:
    """What safety's last answer said of a reply: the personal information in it (when it was cleared whole), the
    version of the lists and policy it was screened under, and the review case opened for it, if any."""

    pii: list[safety_pb2.PiiSpan] = field(default_factory=list)
    policy_version: str = ""
    review_case_id: str = ""


class SafetyUnavailable(Exception):
    """The safety service could not be reached or broke off; nothing uncleared was released."""


async def screen_output(
    source: AsyncIterator[str | ModelOutcome],
    safety: safety_pb2_grpc.SafetyServiceStub,
    turn: safety_pb2.TurnRef,
    deadline: float,
    verdict: OutputVerdict,
) -> AsyncIterator[str | ModelOutcome | OutputBlocked]:
    """Yields cleared text, then the model's outcome, or OutputBlocked as the last item; `verdict` holds what
    the last answer said.

    `deadline` is in `loop.time()` terms. An error of `source` is raised after the text safety cleared
    before it. Closing this iterator closes `source` and the safety stream.
    """
    call = safety.ScreenOutput(timeout=deadline - asyncio.get_running_loop().time())
    received: list[str] = []
    outcomes: list[ModelOutcome] = []

    async def feed() -> None:
        # Safety reads the request id and the turn from the first message.
        first = safety_pb2.ScreenOutputRequest(request_id=turn.request_id, turn=turn)
        try:
            async for item in coalesce(source):
                if isinstance(item, str):
                    received.append(item)
                    if first is not None:
                        first.text = item
                        request, first = first, None
                    else:
                        request = safety_pb2.ScreenOutputRequest(text=item)
                    await call.write(request)
                else:
                    outcomes.append(item)
            final = first if first is not None else safety_pb2.ScreenOutputRequest()
            final.final = True
            await call.write(final)
        finally:
            # Ending the request stream makes safety screen what it has and finish; if the model failed,
            # the reader learns it from this task once safety is done.
            with contextlib.suppress(Exception):
                await call.done_writing()

    feeder = asyncio.create_task(feed())
    reply = ""
    released = 0
    # After its last answer safety ends the call with OK by itself; cancelling it then would only turn
    # that into CANCELLED on our side.
    answered = False
    complete = False
    try:
        async for response in call:
            if response.cleared_chars > released:
                if response.cleared_chars > len(reply):
                    reply = "".join(received)
                yield reply[released : response.cleared_chars]
                released = response.cleared_chars
            if response.verdict.blocked:
                answered = True
                verdict.policy_version = response.policy_version
                verdict.review_case_id = response.review_case_id
                yield OutputBlocked(list(response.verdict.categories))
                return
            if response.complete:
                answered = complete = True
                verdict.pii = list(response.pii)
                verdict.policy_version = response.policy_version
                verdict.review_case_id = response.review_case_id
                await feeder
                yield outcomes[0]
                return
        raise SafetyUnavailable("the safety service ended the output screen without a verdict")
    except grpc.aio.AioRpcError as error:
        raise SafetyUnavailable(f"the safety service failed: {error.code().name}") from error
    finally:
        if not feeder.done():
            feeder.cancel()
            await asyncio.wait([feeder])
        # The feeder can fail once safety has answered (writing to a call that ended): retrieved here, so that
        # asyncio does not report it as never retrieved. A model error that ended the reply was raised above.
        if not feeder.cancelled() and feeder.exception() is not None and not complete:
            log.debug("output_screen_feeder_ended", extra={"error": type(feeder.exception()).__name__})
        if not answered:
            call.cancel()
