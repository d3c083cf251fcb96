"""The moderation screen: the model provider's /v1/moderations, through ModelClient, with a failure policy."""

from collections.abc import Sequence
from dataclasses import dataclass

from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.model_client import ModelClient, ModelError
from chatmesh.runtime.settings import MODELSIM_API_KEY, Settings

log = get_logger(__name__)

# The category of an input blocked because the endpoint failed and the policy is to fail closed.
MODERATION_UNAVAILABLE = "moderation_unavailable"


def moderation_enabled(settings: Settings) -> bool:
    """ "on" or "off" as set; "auto" is on when a real OPENAI_API_KEY is set (not the simulator's)."""
    if settings.safety_moderation != "auto":
        return settings.safety_moderation == "on"
    key = settings.openai_api_key
    return key is not None and key.get_secret_value() not in ("", MODELSIM_API_KEY)


@dataclass(frozen=True, slots=True)
class ModerationVerdict:
    blocked: bool
    # The provider's flagged categories, or MODERATION_UNAVAILABLE.
    categories: tuple[str, ...] = ()


class ModerationScreen:
    """Asks the moderation endpoint about a text; when it fails, blocks (fail closed) or allows (fail open)."""

    def __init__(self, model: ModelClient, *, fail_open: bool) -> None:
        self._model = model
        self._fail_open = fail_open

    async def screen(self, text: str, deadline: float, image_urls: Sequence[str] = ()) -> ModerationVerdict:
        """`deadline` is in `loop.time()` terms; the images (https or `data:` URLs) are judged with the text."""
        try:
            flagged, categories = await self._model.moderate(text, deadline=deadline, image_urls=image_urls)
        except ModelError as error:
            log.warning("moderation_failed", extra={"kind": error.kind.value, "fail_open": self._fail_open})
            if self._fail_open:
                return ModerationVerdict(False)
            return ModerationVerdict(True, (MODERATION_UNAVAILABLE,))
        if not flagged:
            return ModerationVerdict(False)
        # A flag without a named category still blocks; say so rather than give no reason.
        return ModerationVerdict(True, tuple(sorted(set(categories))) or ("flagged",))
