"""The PII policy in a turn: placeholders such as `[PHONE_1]` in place of the personal information that safety's
PII screen found, and the originals restored in what the caller receives.

Per kind, the policy (CHATMESH_PII_POLICY) is one of:
- `leave`: nothing changes;
- `storage`: the stored history (and so every later window) holds placeholders; the model sees the original in
  the turn it is sent, and the caller's reply is as the model wrote it;
- `model`: the model sees placeholders too, and placeholders in its reply are restored to the originals for the
  caller. A conversation keeps its placeholders (`Placeholders`, stored with it and erased with it), so the same
  value has the same placeholder in every turn.

Turns with personal information of a kind that is not left are never cached.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from chatmesh.v1 import safety_pb2

PiiMode = str  # "leave", "storage" or "model"

# The policy's names of the kinds, and the word their placeholders use.
KIND_NAMES = {
    safety_pb2.PII_KIND_EMAIL: "email",
    safety_pb2.PII_KIND_PHONE: "phone",
    safety_pb2.PII_KIND_CN_ID: "cn_id",
    safety_pb2.PII_KIND_PAYMENT_CARD: "payment_card",
    safety_pb2.PII_KIND_IP_ADDRESS: "ip_address",
}
_PLACEHOLDER_WORDS = {
    safety_pb2.PII_KIND_EMAIL: "EMAIL",
    safety_pb2.PII_KIND_PHONE: "PHONE",
    safety_pb2.PII_KIND_CN_ID: "ID",
    safety_pb2.PII_KIND_PAYMENT_CARD: "CARD",
    safety_pb2.PII_KIND_IP_ADDRESS: "IP",
}
_KINDS_BY_WORD = {word: kind for kind, word in _PLACEHOLDER_WORDS.items()}
PLACEHOLDER = re.compile(r"\[(?:EMAIL|PHONE|ID|CARD|IP)_[1-9][0-9]{0,5}\]")
# The longest placeholder: what a stream holds back while a `[` may begin one.
_LONGEST_PLACEHOLDER = len("[EMAIL_999999]")


@dataclass(slots=True)
class Placeholders:
    """A conversation's placeholders. Only those of the kinds in `kept` (the policy's `model` kinds) keep their
    originals, to be restored and reused in later turns; the others are numbered on, their values not kept.
    `added` holds the placeholders made in this turn, which its commit stores: placeholder → original, or ""
    for one whose original is not kept."""

    kept: frozenset[int] = frozenset()
    originals: dict[str, str] = field(default_factory=dict)
    added: dict[str, str] = field(default_factory=dict)
    _by_value: dict[tuple[int, str], str] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, stored: Iterable[tuple[str, str]], kept: frozenset[int]) -> Placeholders:
        """From the placeholders a conversation's messages introduced: (placeholder, original or "")."""
        placeholders = cls(kept=kept)
        for placeholder, original in stored:
            placeholders._remember(_KINDS_BY_WORD[placeholder[1:].rsplit("_", 1)[0]], placeholder, original)
        return placeholders

    def placeholder(self, kind: int, value: str) -> str:
        """The placeholder of `value`: the one it already has (in this turn, or kept from an earlier one), or the
        kind's next one."""
        key = (kind, _comparable(kind, value))
        existing = self._by_value.get(key)
        if existing is not None:
            return existing
        word = _PLACEHOLDER_WORDS[kind]
        placeholder = f"[{word}_{self._counts.get(word, 0) + 1}]"
        original = value if kind in self.kept else ""
        self._remember(kind, placeholder, original)
        self._by_value[key] = placeholder
        self.added[placeholder] = original
        return placeholder

    def take_added(self) -> tuple[tuple[str, str], ...]:
        """The placeholders made since the last call, as the message that introduced them stores them."""
        added, self.added = tuple(self.added.items()), {}
        return added

    def _remember(self, kind: int, placeholder: str, original: str) -> None:
        word = _PLACEHOLDER_WORDS[kind]
        if original:
            self.originals[placeholder] = original
            self._by_value[(kind, _comparable(kind, original))] = placeholder
        number = int(placeholder[len(word) + 2 : -1])
        self._counts[word] = max(self._counts.get(word, 0), number)

    def restore(self, text: str) -> str:
        """`text` with every placeholder of this conversation replaced by its original."""
        if not self.originals or "[" not in text:
            return text
        return PLACEHOLDER.sub(lambda match: self.originals.get(match[0], match[0]), text)


def kinds_of(policy: Mapping[str, PiiMode], *modes: PiiMode) -> frozenset[int]:
    """The kinds whose policy is one of `modes`."""
    return frozenset(kind for kind, name in KIND_NAMES.items() if policy.get(name, "leave") in modes)


def redact(text: str, spans: Iterable[safety_pb2.PiiSpan], kinds: frozenset[int], placeholders: Placeholders) -> str:
    """`text` with the spans of `kinds` replaced by their placeholders (spans in order, not overlapping, in code
    points of `text`)."""
    parts: list[str] = []
    end = 0
    for span in spans:
        if span.kind not in kinds:
            continue
        parts.append(text[end : span.start])
        parts.append(placeholders.placeholder(span.kind, text[span.start : span.end]))
        end = span.end
    if not parts:
        return text
    parts.append(text[end:])
    return "".join(parts)


class StreamRestorer:
    """Restores placeholders in a streamed reply: a placeholder split across deltas is restored whole, so text
    from a `[` that may still begin one is held back until it cannot (at most a placeholder's length)."""

    def __init__(self, placeholders: Placeholders) -> None:
        self._placeholders = placeholders
        self._held = ""

    def feed(self, text: str) -> str:
        text = self._held + text
        cut = _held_from(text)
        self._held = text[cut:]
        return self._placeholders.restore(text[:cut])

    def flush(self) -> str:
        held, self._held = self._held, ""
        return self._placeholders.restore(held)


def _held_from(text: str) -> int:
    """Where the part of `text` that may be the beginning of a placeholder starts (len(text) when none)."""
    start = text.rfind("[", max(0, len(text) - _LONGEST_PLACEHOLDER))
    if start == -1 or "]" in text[start:]:
        return len(text)
    tail = text[start:]
    return start if re.fullmatch(r"\[(?:[A-Z]{0,5}|(?:EMAIL|PHONE|ID|CARD|IP)_[0-9]{0,6})", tail) else len(text)


def _comparable(kind: int, value: str) -> str:
    """One form for the ways of writing a value: width, case, and separators inside numbers folded."""
    folded = unicodedata.normalize("NFKC", value)
    if kind == safety_pb2.PII_KIND_EMAIL:
        return folded.lower()
    if kind == safety_pb2.PII_KIND_IP_ADDRESS:
        return folded.lower()
    return "".join(character for character in folded if character.isalnum() or character == "+").upper()
