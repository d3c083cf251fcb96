"""The moderation screen: the model provider's /v1/moderations, through ModelClient, with a failure policy and
per-category score thresholds; and its windowed form for a streamed reply."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from chatmesh.model.errors import ModelError
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import MODELSIM_API_KEY, SafetySettings

if TYPE_CHECKING:
    # The client, and with it the openai SDK, is loaded only where moderation is on (chatmesh.safety.main).
    from chatmesh.model.client import ModelClient, ModerationResult

log = get_logger(__name__)

# The category of a text blocked because the endpoint failed and the policy is to fail closed.
MODERATION_UNAVAILABLE = "moderation_unavailable"


def moderation_enabled(settings: SafetySettings) -> bool:
    """ "on" or "off" as set; "auto" is on when a real OPENAI_API_KEY is set (not the simulator's)."""
    if settings.safety_moderation != "auto":
        return settings.safety_moderation == "on"
    key = settings.openai_api_key
    return key is not None and key.get_secret_value() not in ("", MODELSIM_API_KEY)


def matched_categories(result: ModerationResult, thresholds: Mapping[str, float]) -> tuple[str, ...]:
    """The categories that count, sorted: those with a threshold when their score is at or above it, the others
    when the endpoint flagged them. A flag without a named category counts as "flagged" (a reason, not none)."""
    matched = {name for name in result.categories if name not in thresholds}
    matched.update(name for name, threshold in thresholds.items() if result.scores.get(name, 0.0) >= threshold)
    if not matched and result.flagged and not result.categories:
        return ("flagged",)
    return tuple(sorted(matched))


class ModerationScreen:
    """Asks the moderation endpoint about a text; when it fails, matches MODERATION_UNAVAILABLE (fail closed) or
    nothing (fail open)."""

    def __init__(self, model: ModelClient, *, fail_open: bool, thresholds: Mapping[str, float] | None = None) -> None:
        self._model = model
        self._fail_open = fail_open
        self._thresholds = dict(thresholds or {})

    async def screen(self, text: str, deadline: float, image_urls: Sequence[str] = ()) -> tuple[str, ...]:
        """The matched categories, sorted; empty when the text is clean. `deadline` is in `loop.time()` terms;
        the images (https or `data:` URLs) are judged with the text."""
        try:
            result = await self._model.moderate(text, deadline=deadline, image_urls=image_urls)
        except ModelError as error:
            log.warning("moderation_failed", extra={"kind": error.kind.value, "fail_open": self._fail_open})
            return () if self._fail_open else (MODERATION_UNAVAILABLE,)
        return matched_categories(result, self._thresholds)


class WindowedModeration:
    """Moderates a reply that arrives in pieces, in windows of `window_chars` characters: each window once all
    of it arrived, the rest once the reply ended; one call at a time, in order. `cleared` is how much of the reply
    the endpoint judged and did not stop; the text after it is held.

    A window whose categories `passes` accepts (the review policy lets them out) is cleared like a clean one and
    its categories gathered in `passed` (`passed_window` is the first such window). One it does not accept stops
    the screen: `categories` are then its categories and `window` where it is, [start, end) in code points.
    `wakeup` is set whenever a call finishes.
    """

    def __init__(
        self,
        screen: ModerationScreen,
        window_chars: int,
        deadline: float,
        wakeup: asyncio.Event,
        passes: Callable[[tuple[str, ...]], bool],
    ) -> None:
        self._screen = screen
        self._window_chars = window_chars
        self._deadline = deadline
        self._wakeup = wakeup
        self._passes = passes
        self._parts: list[str] = []
        self._length = 0
        self._ended = False
        self._call: asyncio.Task[tuple[str, ...]] | None = None
        self._call_end = 0
        self.cleared = 0
        self.categories: tuple[str, ...] = ()
        self.window = (0, 0)
        self.passed: set[str] = set()
        self.passed_window = (0, 0)

    @property
    def blocked(self) -> bool:
        return bool(self.categories)

    @property
    def complete(self) -> bool:
        """The reply ended and all of it is cleared."""
        return self._ended and self._call is None and self.cleared == self._length and not self.categories

    def feed(self, text: str, final: bool = False) -> None:
        """Appends `text` (`final`: the reply ended), takes the answer of a finished call, and starts the next
        call when a window is due. Raises what a call raised other than the endpoint's failure."""
        if text:
            self._parts.append(text)
            self._length += len(text)
        self._ended = self._ended or final
        call = self._call
        if call is not None:
            if not call.done():
                return
            self._call = None
            categories = call.result()
            window = (self.cleared, self._call_end)
            if categories and not self._passes(categories):
                self.categories, self.window = categories, window
                return
            if categories:
                self.passed_window = self.passed_window if self.passed else window
                self.passed.update(categories)
            self.cleared = self._call_end
        if self.categories:
            return
        while self.cleared < self._length:
            end = min(self.cleared + self._window_chars, self._length)
            if end - self.cleared < self._window_chars and not self._ended:
                return
            text = self.text[self.cleared : end]
            if not text.strip():
                self.cleared = end  # nothing for the endpoint to judge
                continue
            self._call = asyncio.create_task(self._screen.screen(text, self._deadline))
            self._call.add_done_callback(lambda _: self._wakeup.set())
            self._call_end = end
            return

    @property
    def text(self) -> str:
        """The reply so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    async def close(self) -> None:
        """Cancels a call in flight; its outcome no longer matters."""
        call = self._call
        if call is None:
            return
        call.cancel()
        await asyncio.wait([call])
        if not call.cancelled():
            call.exception()  # retrieved, so that asyncio does not report it
