"""Placeholders for personal information in a conversation, and the originals restored in a streamed reply."""

import pytest

from chatmesh.dialogue.redaction import Placeholders, StreamRestorer, kinds_of, redact
from chatmesh.v1 import safety_pb2

PHONE = safety_pb2.PII_KIND_PHONE
EMAIL = safety_pb2.PII_KIND_EMAIL
CARD = safety_pb2.PII_KIND_PAYMENT_CARD
ALL = frozenset({PHONE, EMAIL, CARD})


def spans_of(text: str, *found: tuple[int, str]) -> list[safety_pb2.PiiSpan]:
    """The spans of each (kind, value) in `text`, at the value's first place."""
    spans = []
    for kind, value in found:
        start = text.index(value)
        spans.append(safety_pb2.PiiSpan(kind=kind, start=start, end=start + len(value)))
    return sorted(spans, key=lambda span: span.start)


def test_each_value_gets_the_next_placeholder_of_its_kind():
    text = "call 138 0013 8000 or 139-0013-9000, mail a@example.com"
    placeholders = Placeholders(kept=frozenset({PHONE}))

    redacted = redact(
        text,
        spans_of(text, (PHONE, "138 0013 8000"), (PHONE, "139-0013-9000"), (EMAIL, "a@example.com")),
        ALL,
        placeholders,
    )

    assert redacted == "call [PHONE_1] or [PHONE_2], mail [EMAIL_1]"
    # Only the kinds kept (the policy's `model` kinds) keep their originals.
    assert placeholders.added == {"[PHONE_1]": "138 0013 8000", "[PHONE_2]": "139-0013-9000", "[EMAIL_1]": ""}


def test_the_same_value_keeps_its_placeholder_across_turns_however_it_is_written():
    first = Placeholders(kept=ALL)
    redact("138 0013 8000", spans_of("138 0013 8000", (PHONE, "138 0013 8000")), ALL, first)
    later = Placeholders.of(first.take_added(), kept=ALL)
    full_width = "13800138000".translate({ord(digit): ord(digit) + 0xFEE0 for digit in "0123456789"})
    text = f"is {full_width} still yours? and 139 0000 0000?"

    redacted = redact(text, spans_of(text, (PHONE, full_width), (PHONE, "139 0000 0000")), ALL, later)

    assert redacted == "is [PHONE_1] still yours? and [PHONE_2]?"
    assert later.added == {"[PHONE_2]": "139 0000 0000"}


def test_placeholders_whose_originals_are_not_kept_are_numbered_on_but_not_reused():
    first = Placeholders(kept=frozenset())
    redact("mail a@example.com", spans_of("mail a@example.com", (EMAIL, "a@example.com")), ALL, first)
    later = Placeholders.of(first.take_added(), kept=frozenset())

    assert redact("a@example.com", spans_of("a@example.com", (EMAIL, "a@example.com")), ALL, later) == "[EMAIL_2]"
    assert later.restore("[EMAIL_1] [EMAIL_2]") == "[EMAIL_1] [EMAIL_2]"


def test_only_the_kinds_asked_for_are_redacted():
    text = "card 4111 1111 1111 1111, mail a@example.com"
    spans = spans_of(text, (CARD, "4111 1111 1111 1111"), (EMAIL, "a@example.com"))

    assert redact(text, spans, frozenset({EMAIL}), Placeholders()) == "card 4111 1111 1111 1111, mail [EMAIL_1]"


def test_the_policy_names_the_kinds_of_each_mode():
    policy = {"email": "model", "phone": "storage", "payment_card": "storage", "ip_address": "leave"}

    assert kinds_of(policy, "model") == {EMAIL}
    assert kinds_of(policy, "storage", "model") == {EMAIL, PHONE, CARD}
    assert kinds_of(policy, "leave") == {safety_pb2.PII_KIND_IP_ADDRESS, safety_pb2.PII_KIND_CN_ID}


@pytest.mark.parametrize(
    "pieces",
    [
        ["I will call [PHONE_1] now."],
        ["I will call [PH", "ONE_1] now."],
        ["I will call [", "PHONE_", "1", "] now."],
        ["I will call [PHONE_1", "] now."],
    ],
)
def test_a_placeholder_split_across_deltas_is_restored_whole(pieces: list[str]):
    restorer = StreamRestorer(Placeholders.of([("[PHONE_1]", "138 0013 8000")], kept=ALL))

    out = [restorer.feed(piece) for piece in pieces] + [restorer.flush()]

    assert "".join(out) == "I will call 138 0013 8000 now."
    assert not any("[" in part for part in out)


def test_text_that_is_not_a_placeholder_is_not_held_back():
    restorer = StreamRestorer(Placeholders.of([("[PHONE_1]", "138 0013 8000")], kept=ALL))

    assert restorer.feed("see [note] and [PHONE_9] and a[") == "see [note] and [PHONE_9] and a"
    assert restorer.feed("b] done") == "[b] done"
    assert restorer.flush() == ""
