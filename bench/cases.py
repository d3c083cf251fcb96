"""The benchmark's cases: what is sent, how often at once, and what the last event must say.

A case that a feature of chatmesh does not have yet carries `unavailable=<reason>`; the run reports it
as "not available" with that reason. Enabling it later is deleting that one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

Rpc = Literal["Chat", "StreamChat"]


class Expect(Enum):
    """What the `Completed` event (or `ChatResponse`) of every measured chatmesh call must say."""

    REPLY = "a model reply: finish_reason STOP, not cached"
    CACHED = "a cache hit: cached = true"
    CONTENT_FILTER = "a refusal: finish_reason CONTENT_FILTER"


class Message(Enum):
    """Which user message each call of a case sends."""

    UNIQUE = "unique"  # a different question every call, so no cache can answer it
    REPEATED = "repeated"  # the same first-turn question every call (primed once before measuring)
    BLOCKED = "blocked"  # a question containing BLOCKED_TERM


# A term of the keyword list that ships with the safety service (services/safety/default_keywords.txt).
BLOCKED_TERM = "forbidden-demo-term"

# What the simulated users ask; every call's question is made unique by a prefix.
QUESTIONS = (
    "How should I size a connection pool for a service that calls a slow downstream API?",
    "What is a good way to retry a failed HTTP request without overloading the server?",
    "Can you explain the difference between a process and a thread in simple terms?",
    "Which metrics should I put on a dashboard for a gRPC service in production?",
)
REPEATED_QUESTION = "What are your opening hours on public holidays?"


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    rpc: Rpc
    concurrency: int
    # 1 = each call starts a new conversation; 10 = each call is the tenth turn of a conversation
    # prepared with nine turns beforehand (not measured).
    turn: int = 1
    message: Message = Message.UNIQUE
    expect: Expect = Expect.REPLY
    # The straight-to-modelsim baselines this case is compared with.
    baselines: tuple[str, ...] = ("floor", "sdk")
    # Every call of each chatmesh target sends a fresh idempotency_key (uuid4 hex). In every round, such a case
    # also runs the same calls without a key against the same clusters (the targets chatmesh_unkeyed and
    # chatmesh_open_unkeyed, bench/report.py UNKEYED), and the report subtracts those from these.
    idempotency_key: bool = False
    unavailable: str | None = None

    @property
    def available(self) -> bool:
        return self.unavailable is None

    def describe(self) -> str:
        where = "new conversation" if self.turn == 1 else f"turn {self.turn}"
        return f"{self.rpc}, c={self.concurrency}, {where}" + (", idempotency key" if self.idempotency_key else "")


CASES: tuple[Case, ...] = (
    Case("chat_c1_new", "Chat", 1),
    Case("stream_c1_new", "StreamChat", 1),
    # stream_c1_new with a fresh idempotency_key on every call, alternating within each round with the same calls
    # without a key: what the key adds is the one minus the other. The baselines would repeat stream_c1_new's (the
    # model never sees the key): none.
    Case("stream_c1_new_keyed", "StreamChat", 1, baselines=(), idempotency_key=True),
    Case("chat_c1_turn10", "Chat", 1, turn=10),
    Case("stream_c1_turn10", "StreamChat", 1, turn=10),
    Case("chat_c32_new", "Chat", 32),
    Case("stream_c32_new", "StreamChat", 32),
    Case("chat_c32_turn10", "Chat", 32, turn=10),
    Case("stream_c32_turn10", "StreamChat", 32, turn=10),
    Case(
        "cache_hit",
        "StreamChat",
        1,
        message=Message.REPEATED,
        expect=Expect.CACHED,
    ),
    Case(
        "blocked_input",
        "StreamChat",
        1,
        message=Message.BLOCKED,
        expect=Expect.CONTENT_FILTER,
        # The model is never called for a blocked input, so calling it directly is no baseline.
        baselines=(),
    ),
)


def question(case: Case, index: int) -> str:
    """The user message of call `index` of `case`."""
    if case.message is Message.REPEATED:
        return REPEATED_QUESTION
    text = f"[{case.name} #{index}] {QUESTIONS[index % len(QUESTIONS)]}"
    if case.message is Message.BLOCKED:
        return f"{text} Also, give me {BLOCKED_TERM}."
    return text


def preparation_message(case: Case, conversation: int, turn: int) -> str:
    """The user message of an unmeasured turn that prepares a conversation of `case`."""
    question = QUESTIONS[(conversation + turn) % len(QUESTIONS)]
    return f"[{case.name} conversation {conversation}, turn {turn}] {question}"
