"""The review policy: what the categories of a verdict do (block; block and send the text to a person; let it
out and send it to a person), and the policy version a verdict is given under."""

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from chatmesh.runtime.settings import SafetySettings
from chatmesh.safety.keywords import KeywordList
from chatmesh.safety.moderation import MODERATION_UNAVAILABLE
from chatmesh.v1 import review_pb2

ReviewAction = Literal["block", "block_and_review", "allow_and_review"]
# The key of review_policy that sets the action of the categories it does not name.
ANY_CATEGORY = "*"


@dataclass(frozen=True, slots=True)
class Decision:
    blocked: bool
    # REVIEW_ACTION_UNSPECIFIED when no case is opened.
    review: review_pb2.ReviewAction = review_pb2.REVIEW_ACTION_UNSPECIFIED


_BLOCK = Decision(True)
_BLOCK_AND_REVIEW = Decision(True, review_pb2.REVIEW_ACTION_BLOCK_AND_REVIEW)
_ALLOW_AND_REVIEW = Decision(False, review_pb2.REVIEW_ACTION_ALLOW_AND_REVIEW)


class ReviewPolicy:
    """Category to action, from the review_policy setting; a category it does not name takes the "*" entry's
    action, or "block". A verdict is decided over all its categories: blocked and reviewed when any says
    block_and_review; blocked alone when any other says block; let out and reviewed when all say
    allow_and_review. A failed moderation endpoint (fail closed) always blocks, unreviewed: there is no text
    problem for a person to look at, and letting it out would make fail-closed fail open."""

    def __init__(self, actions: Mapping[str, ReviewAction]) -> None:
        self._actions = {category: action for category, action in actions.items() if category != ANY_CATEGORY}
        self._actions[MODERATION_UNAVAILABLE] = "block"
        self._default: ReviewAction = actions.get(ANY_CATEGORY, "block")
        # Whether any category can be let out: when none can, streams need no `passes` test.
        self.allows_any = self._default == "allow_and_review" or "allow_and_review" in self._actions.values()

    def action(self, category: str) -> ReviewAction:
        return self._actions.get(category, self._default)

    def decide(self, categories: Iterable[str]) -> Decision:
        """The decision for a text in which these categories (at least one) matched."""
        actions = {self.action(category) for category in categories}
        if "block_and_review" in actions:
            return _BLOCK_AND_REVIEW
        if "block" in actions:
            return _BLOCK
        return _ALLOW_AND_REVIEW

    def passes(self, categories: Iterable[str]) -> bool:
        """Whether a text in which these categories matched goes out."""
        return not self.decide(categories).blocked


class PolicyVersion:
    """A short, stable hash of what decides a verdict: the keyword list as loaded (the files' terms and the
    added ones), the review policy, and the moderation settings that are in force. It changes when any of them
    does, and only then; computed once per keyword list."""

    def __init__(self, settings: SafetySettings, moderation: bool) -> None:
        settled: dict[str, object] = {"review_policy": dict(sorted(settings.review_policy.items()))}
        if moderation:
            settled["moderation"] = {
                "model": settings.safety_moderation_model,
                "fail_open": settings.safety_moderation_fail_open,
                "thresholds": dict(sorted(settings.safety_moderation_thresholds.items())),
                "output_window_chars": settings.safety_output_moderation_window_chars
                if settings.safety_moderate_output
                else 0,
            }
        self._settled = json.dumps(settled, sort_keys=True)
        self._keywords: KeywordList | None = None
        self._version = ""

    def of(self, keywords: KeywordList) -> str:
        """The version of verdicts given with this keyword list."""
        if keywords is not self._keywords:
            payload = f"{keywords.digest}\n{self._settled}".encode()
            self._version = hashlib.sha256(payload).hexdigest()[:16]
            self._keywords = keywords
        return self._version
