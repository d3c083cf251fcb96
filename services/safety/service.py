"""SafetyService: verdicts on a user's message (ScreenInput), on a reply as it streams (ScreenOutput), and on tool
calls' arguments and tools' results (ScreenTool)."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from chatmesh.dialogue.content import image_url
from chatmesh.runtime.channels import downstream_timeout
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import SafetySettings
from chatmesh.safety import metrics
from chatmesh.safety.keywords import KeywordScreen, ScreenStep
from chatmesh.safety.moderation import ModerationScreen, WindowedModeration
from chatmesh.safety.pii import PiiScreen
from chatmesh.safety.policy import PolicyVersion, ReviewPolicy
from chatmesh.safety.review import ReviewCases
from chatmesh.v1 import chat_pb2, safety_pb2, safety_pb2_grpc

log = get_logger(__name__)

KEYWORD = safety_pb2.SCREEN_SOURCE_KEYWORD
MODERATION = safety_pb2.SCREEN_SOURCE_MODERATION
INPUT = chat_pb2.ContentFilter.STAGE_INPUT
OUTPUT = chat_pb2.ContentFilter.STAGE_OUTPUT
TOOL = chat_pb2.ContentFilter.STAGE_TOOL
_STAGE_LABELS = {INPUT: "input", OUTPUT: "output", TOOL: "tool"}
_BLOCKED_EVENTS = {INPUT: "input_blocked", OUTPUT: "output_blocked", TOOL: "tool_text_blocked"}
_NOTHING_FED = ScreenStep(0)
_Request = safety_pb2.ScreenInputRequest | safety_pb2.ScreenOutputRequest | safety_pb2.ScreenToolRequest


class SafetyServicer(safety_pb2_grpc.SafetyServiceServicer):
    """Keyword lists for every text; the moderation endpoint, when given, for input and, in windows, for output.
    The review policy decides what the categories found do, and opens review cases through `cases`."""

    def __init__(
        self, settings: SafetySettings, keywords: KeywordScreen, moderation: ModerationScreen | None, cases: ReviewCases
    ) -> None:
        self._settings = settings
        self._keywords = keywords
        self._moderation = moderation
        self._output_moderation = moderation if settings.safety_moderate_output else None
        self._policy = ReviewPolicy(settings.review_policy)
        # Streams test the terms they find against the policy only when it lets some category out.
        self._passes = self._policy.passes if self._policy.allows_any else None
        self._versions = PolicyVersion(settings, moderation is not None)
        self._cases = cases
        self._pii = PiiScreen(settings.pii_policy)
        # The blocked series of the loaded lists' categories start at 0 (a reload's new ones start at their first).
        metrics.safety_categories(
            (("input", "keyword"), ("output", "keyword"), ("tool", "keyword")), keywords.current.categories
        )

    async def ScreenInput(
        self, request: safety_pb2.ScreenInputRequest, context: grpc.aio.ServicerContext
    ) -> safety_pb2.ScreenInputResponse:
        # The keyword lists read only the text; the moderation endpoint sees the images too.
        keywords = self._keywords.current
        version = self._versions.of(keywords)
        match = keywords.find(request.text)
        pii = self._pii.spans("input", request.text)
        if match is not None and not self._policy.passes(match.categories):
            verdict = await self._verdict(
                context, request, INPUT, match.categories, KEYWORD, request.text, (match.start, match.end), version
            )
            return safety_pb2.ScreenInputResponse(verdict=verdict, pii=pii)
        moderated: tuple[str, ...] = ()
        if self._moderation is not None and (request.text.strip() or request.images):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + downstream_timeout(context, self._settings.default_deadline_seconds)
            image_urls = [image_url(image) for image in request.images]
            moderated = await self._moderation.screen(request.text, deadline, image_urls)
        if not moderated and match is None:
            metrics.safety_verdict("input")
            return safety_pb2.ScreenInputResponse(
                verdict=safety_pb2.Verdict(blocked=False, policy_version=version), pii=pii
            )
        # Terms the policy lets out, maybe with what the endpoint flagged: decided together.
        categories = tuple(sorted({*moderated, *(match.categories if match is not None else ())}))
        source = MODERATION if moderated else KEYWORD
        span = (match.start, match.end) if match is not None else (0, 0)
        verdict = await self._verdict(context, request, INPUT, categories, source, request.text, span, version)
        return safety_pb2.ScreenInputResponse(verdict=verdict, pii=pii)

    async def ScreenOutput(
        self, request_iterator: AsyncIterator[safety_pb2.ScreenOutputRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[safety_pb2.ScreenOutputResponse]:
        """A reader task takes the caller's pieces as they come; each answer screens everything pending
        at that moment, so the caller never waits on a round trip and answers bunch up only while one
        is being sent. An answer is sent only when the cleared count moved, or at the end.

        With moderation of output on, text is also held until the moderation of its window cleared it (see
        WindowedModeration); without it, nothing here waits on anything but the caller's pieces."""
        keywords = self._keywords.current
        version = self._versions.of(keywords)
        screen = keywords.stream(self._passes)
        pending: list[str] = []
        ended = False
        first: safety_pb2.ScreenOutputRequest | None = None
        wakeup = asyncio.Event()
        moderation = None
        if self._output_moderation is not None:
            timeout = downstream_timeout(context, self._settings.default_deadline_seconds)
            moderation = WindowedModeration(
                self._output_moderation,
                self._settings.safety_output_moderation_window_chars,
                asyncio.get_running_loop().time() + timeout,
                wakeup,
                self._policy.passes,
            )

        async def read() -> None:
            nonlocal ended, first
            try:
                async for message in request_iterator:
                    if first is None:
                        first = message
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
            fed_final = False
            step = _NOTHING_FED
            while True:
                if pending or (ended and not fed_final):
                    final = ended
                    if final:
                        await reader  # if the caller's stream failed, this call ends the same way
                    text = "".join(pending)
                    pending.clear()
                    step = screen.feed(text, final=final)
                    fed_final = final
                    if step.blocked:
                        cleared = step.cleared if moderation is None else min(step.cleared, moderation.cleared)
                        yield await self._last_output_response(
                            context, first, cleared, version, step.categories, KEYWORD, screen.text, screen.blocked_span
                        )
                        return
                    if moderation is not None:
                        moderation.feed(text, final)
                elif moderation is not None:
                    moderation.feed("")  # woken by a window's moderation
                if moderation is None:
                    cleared, complete = step.cleared, step.complete
                else:
                    cleared = min(step.cleared, moderation.cleared)
                    if moderation.blocked:
                        categories = tuple(sorted({*moderation.categories, *moderation.passed, *screen.passed}))
                        yield await self._last_output_response(
                            context, first, cleared, version, categories, MODERATION, moderation.text, moderation.window
                        )
                        return
                    complete = step.complete and moderation.complete
                if complete:
                    if screen.passed or (moderation is not None and moderation.passed):
                        # Categories the policy lets out: the reply goes out whole, and to review.
                        passed = {*screen.passed, *(moderation.passed if moderation is not None else ())}
                        source, span = (KEYWORD, screen.passed_span)
                        if not screen.passed and moderation is not None:
                            source, span = (MODERATION, moderation.passed_window)
                        yield await self._last_output_response(
                            context, first, cleared, version, tuple(sorted(passed)), source, screen.text, span
                        )
                        return
                    metrics.safety_verdict("output")
                    yield safety_pb2.ScreenOutputResponse(
                        cleared_chars=cleared,
                        complete=True,
                        policy_version=version,
                        pii=self._pii.spans("output", screen.text),
                    )
                    return
                if cleared != sent:
                    sent = cleared
                    yield safety_pb2.ScreenOutputResponse(cleared_chars=sent)
                if not pending and not (ended and not fed_final):
                    await wakeup.wait()
                    wakeup.clear()
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            if moderation is not None:
                await moderation.close()

    async def ScreenTool(
        self, request: safety_pb2.ScreenToolRequest, context: grpc.aio.ServicerContext
    ) -> safety_pb2.ScreenToolResponse:
        """The keyword lists over each text; one verdict with every category that matched, in any of them."""
        keywords = self._keywords.current
        version = self._versions.of(keywords)
        categories: set[str] = set()
        first_text, first_span = "", (0, 0)
        for text in request.texts:
            match = keywords.find(text)
            if match is not None:
                if not categories:
                    first_text, first_span = text, (match.start, match.end)
                categories.update(match.categories)
        if not categories:
            metrics.safety_verdict("tool")
            return safety_pb2.ScreenToolResponse(verdict=safety_pb2.Verdict(blocked=False, policy_version=version))
        verdict = await self._verdict(
            context, request, TOOL, tuple(sorted(categories)), KEYWORD, first_text, first_span, version
        )
        return safety_pb2.ScreenToolResponse(verdict=verdict)

    async def _verdict(
        self,
        context: grpc.aio.ServicerContext,
        request: _Request | None,
        stage: chat_pb2.ContentFilter.Stage,
        categories: tuple[str, ...],
        source: safety_pb2.ScreenSource,
        text: str,
        span: tuple[int, int],
        version: str,
    ) -> safety_pb2.Verdict:
        """The verdict on a text of `request` in which `categories` matched, as the review policy decides, with
        the review case it opened. `span` is where the match is in `text` (for the case's excerpt)."""
        decision = self._policy.decide(categories)
        stage_label = _STAGE_LABELS[stage]
        request_id = request.request_id if request is not None else ""
        if decision.blocked:
            metrics.safety_verdict(stage_label, categories, "moderation" if source == MODERATION else "keyword")
            log.info(
                _BLOCKED_EVENTS[stage],
                extra={
                    "request_id": request_id,
                    "source": safety_pb2.ScreenSource.Name(source),
                    "categories": list(categories),
                },
            )
        else:
            metrics.safety_verdict(stage_label)
        case_id = ""
        if decision.review:
            turn = safety_pb2.TurnRef()
            if request is not None:
                turn.CopyFrom(request.turn)
                turn.request_id = turn.request_id or request_id
            timeout = downstream_timeout(context, self._settings.default_deadline_seconds)
            case_id = await self._cases.open(turn, stage, categories, source, decision.review, text, span, timeout)
        return safety_pb2.Verdict(
            blocked=decision.blocked,
            categories=categories,
            source=source,
            review_case_id=case_id,
            policy_version=version,
        )

    async def _last_output_response(
        self,
        context: grpc.aio.ServicerContext,
        first: safety_pb2.ScreenOutputRequest | None,
        cleared: int,
        version: str,
        categories: tuple[str, ...],
        source: safety_pb2.ScreenSource,
        text: str,
        span: tuple[int, int],
    ) -> safety_pb2.ScreenOutputResponse:
        """The last answer on a reply in which `categories` matched: blocked, or complete when the policy lets
        them out; with the review case, if one was opened."""
        verdict = await self._verdict(context, first, OUTPUT, categories, source, text, span, version)
        if verdict.blocked:
            return safety_pb2.ScreenOutputResponse(
                cleared_chars=cleared, verdict=verdict, policy_version=version, review_case_id=verdict.review_case_id
            )
        return safety_pb2.ScreenOutputResponse(
            cleared_chars=cleared,
            complete=True,
            policy_version=version,
            review_case_id=verdict.review_case_id,
            pii=self._pii.spans("output", text),  # the whole reply, when it is let out
        )
