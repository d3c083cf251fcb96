"""SafetyService: verdicts on a user's message (ScreenInput), on a reply as it streams (ScreenOutput), and on tool
calls' arguments and tools' results (ScreenTool)."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from chatmesh.dialogue.content import image_url
from chatmesh.runtime import metrics
from chatmesh.runtime.channels import downstream_timeout
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import Settings
from chatmesh.safety.keywords import KeywordScreen
from chatmesh.safety.moderation import ModerationScreen
from chatmesh.v1 import safety_pb2, safety_pb2_grpc

log = get_logger(__name__)


class SafetyServicer(safety_pb2_grpc.SafetyServiceServicer):
    """Keyword lists for input and output; the moderation endpoint, when given, for input only (asking
    it about every piece of a streamed reply would cost a round trip per piece)."""

    def __init__(self, settings: Settings, keywords: KeywordScreen, moderation: ModerationScreen | None) -> None:
        self._settings = settings
        self._keywords = keywords
        self._moderation = moderation
        # The blocked series of the loaded lists' categories start at 0 (a reload's new ones start at their first).
        metrics.safety_categories(
            (("input", "keyword"), ("output", "keyword"), ("tool", "keyword")), keywords.current.categories
        )

    async def ScreenInput(
        self, request: safety_pb2.ScreenInputRequest, context: grpc.aio.ServicerContext
    ) -> safety_pb2.ScreenInputResponse:
        # The keyword lists read only the text; the moderation endpoint sees the images too.
        categories = self._keywords.screen(request.text)
        if categories:
            return self._blocked_input(request.request_id, categories, safety_pb2.SCREEN_SOURCE_KEYWORD)
        if self._moderation is not None and (request.text.strip() or request.images):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + downstream_timeout(context, self._settings.default_deadline_seconds)
            image_urls = [image_url(image) for image in request.images]
            verdict = await self._moderation.screen(request.text, deadline, image_urls)
            if verdict.blocked:
                return self._blocked_input(
                    request.request_id, list(verdict.categories), safety_pb2.SCREEN_SOURCE_MODERATION
                )
        metrics.safety_verdict("input")
        return safety_pb2.ScreenInputResponse(verdict=safety_pb2.Verdict(blocked=False))

    async def ScreenOutput(
        self, request_iterator: AsyncIterator[safety_pb2.ScreenOutputRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[safety_pb2.ScreenOutputResponse]:
        """A reader task takes the caller's pieces as they come; each answer screens everything pending
        at that moment, so the caller never waits on a round trip and answers bunch up only while one
        is being sent. An answer is sent only when the cleared count moved, or at the end."""
        screen = self._keywords.stream()
        pending: list[str] = []
        ended = False
        request_id = ""
        wakeup = asyncio.Event()

        async def read() -> None:
            nonlocal ended, request_id
            try:
                async for message in request_iterator:
                    request_id = request_id or message.request_id
                    if message.text:
                        pending.append(message.text)
                    if message.final:
                        break
                    wakeup.set()
            finally:
                # The end of the request stream counts as the final marker.
                ended = True
                wakeup.set()

        reader = asyncio.create_task(read())
        try:
            sent = 0
            while True:
                if not pending and not ended:
                    await wakeup.wait()
                    wakeup.clear()
                    continue
                final = ended
                if final:
                    await reader  # if the caller's stream failed, this call ends the same way
                text = "".join(pending)
                pending.clear()
                step = screen.feed(text, final=final)
                if step.blocked:
                    log.info("output_blocked", extra={"request_id": request_id, "categories": list(step.categories)})
                    metrics.safety_verdict("output", step.categories, "keyword")
                    yield safety_pb2.ScreenOutputResponse(
                        cleared_chars=step.cleared,
                        verdict=safety_pb2.Verdict(
                            blocked=True, categories=step.categories, source=safety_pb2.SCREEN_SOURCE_KEYWORD
                        ),
                    )
                    return
                if step.complete:
                    metrics.safety_verdict("output")
                    yield safety_pb2.ScreenOutputResponse(cleared_chars=step.cleared, complete=True)
                    return
                if step.cleared != sent:
                    sent = step.cleared
                    yield safety_pb2.ScreenOutputResponse(cleared_chars=sent)
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def ScreenTool(
        self, request: safety_pb2.ScreenToolRequest, context: grpc.aio.ServicerContext
    ) -> safety_pb2.ScreenToolResponse:
        """The keyword lists over each text; one verdict with every category that matched, in any of them."""
        categories = sorted({category for text in request.texts for category in self._keywords.screen(text)})
        metrics.safety_verdict("tool", categories)
        if not categories:
            return safety_pb2.ScreenToolResponse(verdict=safety_pb2.Verdict(blocked=False))
        log.info("tool_text_blocked", extra={"request_id": request.request_id, "categories": categories})
        return safety_pb2.ScreenToolResponse(
            verdict=safety_pb2.Verdict(blocked=True, categories=categories, source=safety_pb2.SCREEN_SOURCE_KEYWORD)
        )

    def _blocked_input(
        self, request_id: str, categories: list[str], source: safety_pb2.ScreenSource
    ) -> safety_pb2.ScreenInputResponse:
        metrics.safety_verdict(
            "input", categories, "moderation" if source == safety_pb2.SCREEN_SOURCE_MODERATION else "keyword"
        )
        log.info(
            "input_blocked",
            extra={"request_id": request_id, "source": safety_pb2.ScreenSource.Name(source), "categories": categories},
        )
        return safety_pb2.ScreenInputResponse(
            verdict=safety_pb2.Verdict(blocked=True, categories=categories, source=source)
        )
