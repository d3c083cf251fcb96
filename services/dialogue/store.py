"""Where conversations live: the ConversationStore interface and its in-memory and Redis implementations.

A conversation belongs to the user of the tenant that started it. Every method takes that tenant and
user id, and a conversation of another tenant or of another user is reported exactly like one that
does not exist. Conversation ids are scoped by tenant: the same id in two tenants names two
independent conversations, and the same user id in two tenants names two different users.
A conversation comes into being with its first committed turn, so a turn that fails leaves nothing.

One turn at a time: a turn on an existing conversation opens it (`open_turn`), which takes the
conversation's turn lock for the turn's deadline and returns what the window is built from; a second
turn that arrives meanwhile gets TurnInProgress. `commit_turn` appends the turn's messages (the user's
message and the reply, or with function calling any run of user, assistant and tool messages) and
releases the lock, in one atomic step; `abandon_turn` releases it for a turn that does not commit.

Messages are numbered from 0 in the order they were written. With a retention period, every message
is erased that long after it was written, whatever came after it (and the conversation with its last
message); past `max_messages`, the oldest messages go first. A summary of the first `message_count`
messages stands in for them in the window; it is kept as long as the newest message it covers.

A turn sent with an idempotency key is claimed first (`claim_turn`): the claim says whether this attempt
runs it, another attempt still does, or it was committed, and then what the caller was answered, which
`commit_turn` keeps with the turn in the same atomic step. A claim whose turn fails is dropped
(`release_turn`); one whose process died lapses with its lease. Keys are remembered for
`idempotency_ttl_seconds` (within the retention period), and deleting the conversation forgets them.

Each user's conversations are indexed, so that `erase_user` erases all of them at once (with every message,
summary and idempotency record); `delete` and `erase_user` say what they removed (`Erased`).
"""

from __future__ import annotations

import abc
import base64
import contextlib
import json
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import quote

from redis.asyncio import Redis

from chatmesh.runtime.redis_errors import unavailable_on_redis_error

Role = Literal["user", "assistant", "tool"]


class ConversationNotFound(Exception):
    """The conversation does not exist, or belongs to another tenant or another user."""


class TurnAlreadyCommitted(Exception):
    """Another attempt with the same idempotency key committed the turn first; nothing was written."""


class StoreUnavailable(Exception):
    """The store could not be reached or did not answer; nothing was written."""


class TurnInProgress(Exception):
    """Another turn holds the conversation (or this turn's hold lapsed); nothing was written."""


@dataclass(frozen=True, slots=True)
class StoredImage:
    """An image that came with a user's message: an https URL, or inline bytes and their MIME type."""

    url: str = ""
    mime_type: str = ""
    data: bytes = b""
    detail: str = "auto"


@dataclass(frozen=True, slots=True)
class StoredToolCall:
    """A function call the model made: its id, the function's name and its arguments (JSON text).
    `server_side`: a tool the server runs itself, whose result the turn stores; else the caller runs it."""

    id: str
    name: str
    arguments: str
    server_side: bool = False


@dataclass(frozen=True, slots=True)
class StoredMessage:
    role: Role
    content: str  # a tool message's: the call's result
    created_at: float  # Unix seconds
    # Refused by safety policy: its content and an assistant's tool calls are not kept, and the model never
    # sees the message, except a tool message, whose call still needs an answer (see context_window).
    refused: bool = False
    # Its tokens in `encoding`, counted once when it was committed ("" when not counted).
    tokens: int = 0
    encoding: str = ""
    images: tuple[StoredImage, ...] = ()
    # An assistant's function calls.
    tool_calls: tuple[StoredToolCall, ...] = ()
    # A tool message's: the id of the call it answers, and whether its result is the call's error.
    tool_call_id: str = ""
    tool_error: bool = False
    # The PII placeholders this message introduced (chatmesh.dialogue.redaction): (placeholder, original), the
    # original "" when the policy does not keep it. Kept with the message, so erased and expired with it.
    placeholders: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Summary:
    """A model's summary of the conversation's first `message_count` messages."""

    text: str
    message_count: int
    updated_at: float  # Unix seconds


@dataclass(frozen=True, slots=True)
class TurnHistory:
    """What a turn on an existing conversation starts from: the newest messages after the summary (at most
    the `limit` asked for, oldest first; `first_index` is the number of messages[0]), the summary, and the
    token of the turn lock that `commit_turn` and `abandon_turn` take."""

    messages: list[StoredMessage]
    first_index: int
    summary: Summary | None
    lock: str


@dataclass(frozen=True, slots=True)
class CommittedTurn:
    """One turn as it is committed: its messages in order (at least one; e.g. the user's message and the reply,
    or the caller's tool results, the user's message, the assistant's calls of server-side tools, their results
    and the final reply), and what the model reported over the turn."""

    messages: tuple[StoredMessage, ...]
    input_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if not self.messages:
            raise ValueError("a committed turn has at least one message")


class ClaimState(StrEnum):
    CLAIMED = "claimed"  # this attempt runs the turn
    RUNNING = "running"  # another attempt holds the key and its lease has not lapsed
    COMMITTED = "committed"  # the turn was committed: `replay` is what its caller was answered
    MISMATCH = "mismatch"  # the key was used for a different request


@dataclass(frozen=True, slots=True)
class TurnClaim:
    state: ClaimState
    replay: str = ""


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A turn's idempotency key, the fingerprint of the request it was first sent with, and (to commit)
    what a retry is to be answered."""

    key: str
    fingerprint: str
    replay: str = ""


@dataclass(frozen=True, slots=True)
class Erased:
    """What a deletion removed: conversations, their messages still kept, and their summaries."""

    conversations: int = 0
    messages: int = 0
    summaries: int = 0

    def __add__(self, other: Erased) -> Erased:
        return Erased(
            self.conversations + other.conversations,
            self.messages + other.messages,
            self.summaries + other.summaries,
        )


@dataclass(slots=True)
class Conversation:
    """A conversation with one page of its messages: `messages` are numbered from `first_index`, and
    `next_index` is where the next page starts (None after the last)."""

    tenant: str
    conversation_id: str
    user_id: str
    created_at: float
    updated_at: float
    messages: list[StoredMessage] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    summary: Summary | None = None
    first_index: int = 0
    next_index: int | None = None


class ConversationStore(abc.ABC):
    @abc.abstractmethod
    async def open_turn(
        self, tenant: str, conversation_id: str, user_id: str, *, limit: int, lease_seconds: float
    ) -> TurnHistory:
        """Takes the conversation's turn lock for `lease_seconds` and returns the newest `limit` messages
        that the summary does not cover. Raises ConversationNotFound, or TurnInProgress while another
        turn holds the lock."""

    @abc.abstractmethod
    async def abandon_turn(self, tenant: str, conversation_id: str, lock: str) -> None:
        """Releases the turn lock of a turn that will not commit, if it still holds it."""

    @abc.abstractmethod
    async def claim_turn(
        self, tenant: str, conversation_id: str, key: IdempotencyKey, *, lease_seconds: float
    ) -> TurnClaim:
        """Claims the turn of `key` for this attempt, for `lease_seconds`, unless another attempt holds it,
        it was committed, or the key was used with another fingerprint (see ClaimState)."""

    @abc.abstractmethod
    async def release_turn(self, tenant: str, conversation_id: str, key: IdempotencyKey) -> None:
        """Drops this attempt's claim of a turn that was not committed, so that a retry runs it anew."""

    @abc.abstractmethod
    async def commit_turn(
        self,
        tenant: str,
        conversation_id: str,
        user_id: str,
        turn: CommittedTurn,
        *,
        new: bool,
        lock: str | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> None:
        """Appends the messages of a turn in order, adds its usage and releases its turn lock, all or nothing; with
        `idempotency`, keeps its replay under the key in the same step (raises TurnAlreadyCommitted if
        another attempt committed it). Raises TurnInProgress if another turn holds the lock (`lock` is the
        one `open_turn` gave this turn; without one, no turn may hold it).

        With `new`, creates the conversation owned by `user_id` of `tenant`, created when its first message
        was and updated when its last was (raises ConversationNotFound if the id is already taken within
        `tenant`; the same id in another tenant does not count).
        Without it, raises ConversationNotFound if the conversation no longer exists or belongs to
        another tenant or user, for example because it was deleted while the turn ran.
        """

    @abc.abstractmethod
    async def add_usage(self, tenant: str, conversation_id: str, input_tokens: int, output_tokens: int) -> None:
        """Adds tokens spent outside a committed turn (a cancelled stream, a summary) to the conversation's usage;
        nothing if the conversation is gone."""

    @abc.abstractmethod
    async def get(
        self, tenant: str, conversation_id: str, user_id: str, *, start: int = 0, limit: int | None = None
    ) -> Conversation:
        """The conversation with at most `limit` (None: all) of its messages from number `start` on, the
        expired and dropped ones skipped. Raises ConversationNotFound."""

    @abc.abstractmethod
    async def commit_summary(
        self, tenant: str, conversation_id: str, summary: Summary, *, replaces: int, covered_until: float
    ) -> bool:
        """Stores `summary` if the current one still covers `replaces` messages (0: none), so that of two
        summaries written at once only one lands; it is kept until `covered_until` (Unix seconds, when the
        newest message it covers expires). False if another summary landed first or the conversation
        is gone."""

    @abc.abstractmethod
    async def delete(self, tenant: str, conversation_id: str, user_id: str) -> Erased:
        """Erases the conversation at once, and says what it held. Raises ConversationNotFound."""

    @abc.abstractmethod
    async def erase_user(self, tenant: str, user_id: str) -> Erased:
        """Erases every conversation of the user of `tenant` at once, and says what they held (nothing when the
        user has none: erasing again is no error)."""

    async def close(self) -> None:  # noqa: B027 - optional hook; the memory store has nothing to release
        """Releases connections."""


@dataclass(slots=True)
class _MemoryConversation:
    """A conversation in the memory store: its messages from number `first_index` on, each with the clock
    reading when it expires."""

    tenant: str
    user_id: str
    created_at: float
    updated_at: float
    messages: list[tuple[StoredMessage, float]] = field(default_factory=list)
    first_index: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    summary: tuple[Summary, float] | None = None
    lock: tuple[str, float] | None = None

    @property
    def next_index(self) -> int:
        return self.first_index + len(self.messages)


class MemoryConversationStore(ConversationStore):
    """Conversations in a dict, for one process. Never awaits, so every method is atomic on the event loop.

    Keyed by (tenant, conversation_id). Bounded: past `max_conversations` (over all tenants together),
    the least recently used conversation is dropped, so that a long-running process without Redis does
    not grow without end. Expired messages are dropped whenever their conversation is used.
    """

    def __init__(
        self,
        *,
        retention_seconds: float | None = None,
        max_conversations: int | None = None,
        max_messages: int | None = None,
        idempotency_ttl_seconds: float = 86_400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._conversations: OrderedDict[tuple[str, str], _MemoryConversation] = OrderedDict()
        # By conversation, then key: (state "R" or "C", fingerprint, lease end or replay, forgotten at).
        self._turns: dict[tuple[str, str], dict[str, tuple[str, str, float | str, float]]] = {}
        self._idempotency_ttl = _idempotency_ttl(idempotency_ttl_seconds, retention_seconds)
        self._retention_seconds = retention_seconds
        self._max_conversations = max_conversations
        self._max_messages = max_messages
        self._clock = clock

    def _expiry(self) -> float:
        return math.inf if self._retention_seconds is None else self._clock() + self._retention_seconds

    def _owned(self, tenant: str, conversation_id: str, user_id: str) -> _MemoryConversation:
        key = (tenant, conversation_id)
        conversation = self._conversations.get(key)
        if conversation is not None:
            self._drop_expired(key, conversation)
            conversation = self._conversations.get(key)
        if conversation is None or conversation.tenant != tenant or conversation.user_id != user_id:
            raise ConversationNotFound(conversation_id)
        self._conversations.move_to_end(key)
        return conversation

    def _drop_expired(self, key: tuple[str, str], conversation: _MemoryConversation) -> None:
        now = self._clock()
        expired = 0
        while expired < len(conversation.messages) and conversation.messages[expired][1] <= now:
            expired += 1
        if expired:
            del conversation.messages[:expired]
            conversation.first_index += expired
        if conversation.summary is not None and conversation.summary[1] <= now:
            conversation.summary = None
        if not conversation.messages:
            self._forget(key)

    def _forget(self, key: tuple[str, str]) -> None:
        del self._conversations[key]
        self._turns.pop(key, None)

    def _turn_records(self, conversation: tuple[str, str]) -> dict[str, tuple[str, str, float | str, float]]:
        now = self._clock()
        records = self._turns.setdefault(conversation, {})
        for expired in [key for key, record in records.items() if record[3] <= now]:
            del records[expired]
        return records

    async def claim_turn(
        self, tenant: str, conversation_id: str, key: IdempotencyKey, *, lease_seconds: float
    ) -> TurnClaim:
        records = self._turn_records((tenant, conversation_id))
        record = records.get(key.key)
        now = self._clock()
        if record is not None:
            state, fingerprint, detail, _ = record
            if fingerprint != key.fingerprint:
                return TurnClaim(ClaimState.MISMATCH)
            if state == "C":
                return TurnClaim(ClaimState.COMMITTED, str(detail))
            if float(detail) > now:
                return TurnClaim(ClaimState.RUNNING)
        records[key.key] = ("R", key.fingerprint, now + lease_seconds, now + self._idempotency_ttl)
        return TurnClaim(ClaimState.CLAIMED)

    async def release_turn(self, tenant: str, conversation_id: str, key: IdempotencyKey) -> None:
        records = self._turns.get((tenant, conversation_id), {})
        record = records.get(key.key)
        if record is not None and record[0] == "R" and record[1] == key.fingerprint:
            del records[key.key]
        if not records:
            self._turns.pop((tenant, conversation_id), None)

    def _lock_holder(self, conversation: _MemoryConversation) -> str | None:
        if conversation.lock is None or conversation.lock[1] <= self._clock():
            return None
        return conversation.lock[0]

    async def open_turn(
        self, tenant: str, conversation_id: str, user_id: str, *, limit: int, lease_seconds: float
    ) -> TurnHistory:
        conversation = self._owned(tenant, conversation_id, user_id)
        if self._lock_holder(conversation) is not None:
            raise TurnInProgress(conversation_id)
        token = uuid.uuid4().hex
        conversation.lock = (token, self._clock() + lease_seconds)
        summary = conversation.summary[0] if conversation.summary is not None else None
        start = max(conversation.first_index, summary.message_count if summary else 0, conversation.next_index - limit)
        messages = [message for message, _ in conversation.messages[start - conversation.first_index :]]
        return TurnHistory(messages=messages, first_index=start, summary=summary, lock=token)

    async def abandon_turn(self, tenant: str, conversation_id: str, lock: str) -> None:
        conversation = self._conversations.get((tenant, conversation_id))
        if conversation is not None and conversation.lock is not None and conversation.lock[0] == lock:
            conversation.lock = None

    async def commit_turn(
        self,
        tenant: str,
        conversation_id: str,
        user_id: str,
        turn: CommittedTurn,
        *,
        new: bool,
        lock: str | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> None:
        key = (tenant, conversation_id)
        if idempotency is not None:
            record = self._turn_records(key).get(idempotency.key)
            if record is not None and record[0] == "C":
                raise TurnAlreadyCommitted(idempotency.key)
        if new:
            if key in self._conversations:
                raise ConversationNotFound(conversation_id)
            if self._max_conversations is not None and len(self._conversations) >= self._max_conversations:
                self._forget(next(iter(self._conversations)))
            conversation = _MemoryConversation(
                tenant=tenant,
                user_id=user_id,
                created_at=turn.messages[0].created_at,
                updated_at=turn.messages[-1].created_at,
            )
            self._conversations[key] = conversation
        else:
            conversation = self._owned(tenant, conversation_id, user_id)
            if self._lock_holder(conversation) != lock:
                raise TurnInProgress(conversation_id)
            conversation.lock = None
        expires_at = self._expiry()
        conversation.messages += ((message, expires_at) for message in turn.messages)
        if self._max_messages is not None and len(conversation.messages) > self._max_messages:
            dropped = len(conversation.messages) - self._max_messages
            del conversation.messages[:dropped]
            conversation.first_index += dropped
        conversation.input_tokens += turn.input_tokens
        conversation.output_tokens += turn.output_tokens
        conversation.updated_at = turn.messages[-1].created_at
        if idempotency is not None:
            self._turn_records(key)[idempotency.key] = (
                "C",
                idempotency.fingerprint,
                idempotency.replay,
                self._clock() + self._idempotency_ttl,
            )

    async def commit_summary(
        self, tenant: str, conversation_id: str, summary: Summary, *, replaces: int, covered_until: float
    ) -> bool:
        conversation = self._conversations.get((tenant, conversation_id))
        if conversation is None or conversation.tenant != tenant:
            return False
        current = conversation.summary[0].message_count if conversation.summary is not None else 0
        if current != replaces:
            return False
        keep = math.inf if self._retention_seconds is None else self._clock() + (covered_until - time.time())
        conversation.summary = (summary, keep)
        return True

    async def add_usage(self, tenant: str, conversation_id: str, input_tokens: int, output_tokens: int) -> None:
        conversation = self._conversations.get((tenant, conversation_id))
        if conversation is not None and conversation.tenant == tenant:
            conversation.input_tokens += input_tokens
            conversation.output_tokens += output_tokens

    async def get(
        self, tenant: str, conversation_id: str, user_id: str, *, start: int = 0, limit: int | None = None
    ) -> Conversation:
        conversation = self._owned(tenant, conversation_id, user_id)
        first = max(start, conversation.first_index)
        end = conversation.next_index if limit is None else min(conversation.next_index, first + limit)
        offset = conversation.first_index
        # StoredMessage is frozen, so a new list is enough to keep callers off the stored state.
        return Conversation(
            tenant=tenant,
            conversation_id=conversation_id,
            user_id=user_id,
            created_at=conversation.created_at,
            updated_at=conversation.updated_at,
            messages=[message for message, _ in conversation.messages[first - offset : end - offset]],
            input_tokens=conversation.input_tokens,
            output_tokens=conversation.output_tokens,
            summary=conversation.summary[0] if conversation.summary is not None else None,
            first_index=first,
            next_index=end if end < conversation.next_index else None,
        )

    async def delete(self, tenant: str, conversation_id: str, user_id: str) -> Erased:
        conversation = self._owned(tenant, conversation_id, user_id)
        self._forget((tenant, conversation_id))
        return Erased(1, len(conversation.messages), int(conversation.summary is not None))

    async def erase_user(self, tenant: str, user_id: str) -> Erased:
        # A scan of at most `max_conversations`, on a rare call: simpler than an index kept right through
        # eviction and expiry.
        owned = [
            conversation_id
            for (owner_tenant, conversation_id), conversation in self._conversations.items()
            if owner_tenant == tenant and conversation.user_id == user_id
        ]
        erased = Erased()
        for conversation_id in owned:
            with contextlib.suppress(ConversationNotFound):  # its messages had all expired
                erased += await self.delete(tenant, conversation_id, user_id)
        return erased


# The owner check compares both the tenant and the user id stored in the meta hash. The tenant is
# already part of the keys; checking it again means that a key shared by two tenants, through a bug
# or an unvalidated name, can never expose one tenant's conversation to the other.

# An idempotency key's record is the string `…:turn:<key>`: "R|<fingerprint>|<lease end, ms>" while an
# attempt runs the turn, "C|<fingerprint>|<replay>" once it is committed; it lives for the idempotency TTL.
# The sorted set `…:turns` (key -> when its record lapses) lets a deletion find them all.

# KEYS: the key's record, the conversation's turns set. ARGV: key, fingerprint, now ms, lease end ms, TTL ms.
# Returns {state, replay}.
_CLAIM_TURN_LUA = """
local record = redis.call("GET", KEYS[1])
if record then
  local state, fingerprint, detail = string.match(record, "^(%u)|(%x+)|(.*)$")
  if fingerprint ~= ARGV[2] then return {"mismatch", ""} end
  if state == "C" then return {"committed", detail} end
  if tonumber(detail) > tonumber(ARGV[3]) then return {"running", ""} end
end
redis.call("SET", KEYS[1], "R|" .. ARGV[2] .. "|" .. ARGV[4], "PX", ARGV[5])
redis.call("ZREMRANGEBYSCORE", KEYS[2], "-inf", ARGV[3])
redis.call("ZADD", KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[5]), ARGV[1])
redis.call("PEXPIRE", KEYS[2], ARGV[5])
return {"claimed", ""}
"""

# KEYS: the key's record, the turns set. ARGV: key, fingerprint. Drops a running claim of this fingerprint.
_RELEASE_TURN_LUA = """
local record = redis.call("GET", KEYS[1])
if record and string.sub(record, 1, #ARGV[2] + 2) == "R|" .. ARGV[2] then
  redis.call("DEL", KEYS[1])
  redis.call("ZREM", KEYS[2], ARGV[1])
end
return 1
"""

# A conversation's keys, all under the hash tag `{tenant/id}` (prefix P): the hash P:meta (tenant, user_id,
# created_at, updated_at, input_tokens, output_tokens, `first` and `next`, the numbers of the oldest kept
# message and of the next one), a string P:m:<n> per message (JSON: role, content, created_at, and only when
# not their defaults refused, tokens with encoding, images, tool_calls, tool_call_id, tool_error), each with
# the retention as its TTL, the summary P:summary (JSON: text, count, at), and the turn lock P:lock (a token,
# with the turn's lease as TTL).
# Messages expire oldest first, so the messages that are left are always a run that ends at `next`.

# Appends to `result` the messages numbered first to last that are left, each as its number and its JSON.
_APPEND_MESSAGES_LUA = """
local function append_messages(result, prefix, first, last)
  if first > last then return end
  local keys = {}
  for n = first, last do keys[#keys + 1] = prefix .. "m:" .. n end
  local values = redis.call("MGET", unpack(keys))
  for i = 1, #values do
    if values[i] then
      result[#result + 1] = first + i - 1
      result[#result + 1] = values[i]
    end
  end
end
"""

# KEYS: meta, lock. ARGV: tenant, user_id, limit, lease ms, lock token, prefix P: (with the colon).
# Returns {0} when the owner check fails, {1} when another turn holds the lock, else
# {2, summary JSON or "", n1, message1, n2, message2, …} (the newest `limit` messages after the summary).
_OPEN_TURN_LUA = (
    _APPEND_MESSAGES_LUA
    + """
local meta = redis.call("HMGET", KEYS[1], "tenant", "user_id", "first", "next")
if meta[1] ~= ARGV[1] or meta[2] ~= ARGV[2] then return {0} end
if not redis.call("SET", KEYS[2], ARGV[5], "NX", "PX", ARGV[4]) then return {1} end
local summary = redis.call("GET", ARGV[6] .. "summary") or ""
local covered = 0
if summary ~= "" then covered = cjson.decode(summary)["count"] end
local last = (tonumber(meta[4]) or 0) - 1
local start = math.max(tonumber(meta[3]) or 0, covered, last + 1 - tonumber(ARGV[3]))
local result = {2, summary}
append_messages(result, ARGV[6], start, last)
return result
"""
)

# KEYS: meta, lock, the key's record, the turns set, the user's conversations. ARGV: 1 tenant, 2 user_id, 3 new
# ("1" or "0"), 4 created_at, 5 updated_at, 6 input_tokens, 7 output_tokens, 8 retention in ms ("0": kept until
# deleted), 9 the most messages kept ("0": no bound), 10 the lock token ("": none), 11 prefix P:; 12 to 16, for
# an idempotent turn, key, fingerprint, replay, TTL ms, now ms (all five "" otherwise); 17 the conversation id,
# 18 now ms; from 19 on, the turn's messages in order (at least one). Returns 1 when committed, 0 when the id is
# taken (new) or the owner check failed, 2 when another attempt committed the key's turn, 3 when another turn
# holds the lock.
_COMMIT_TURN_LUA = """
local idempotent = ARGV[12] ~= ""
if idempotent and string.sub(redis.call("GET", KEYS[3]) or "", 1, 2) == "C|" then return 2 end
if ARGV[3] == "1" then
  if redis.call("EXISTS", KEYS[1]) == 1 then return 0 end
  redis.call("HSET", KEYS[1], "tenant", ARGV[1], "user_id", ARGV[2], "created_at", ARGV[4],
    "input_tokens", 0, "output_tokens", 0, "first", 0, "next", 0)
else
  local owner = redis.call("HMGET", KEYS[1], "tenant", "user_id")
  if owner[1] ~= ARGV[1] or owner[2] ~= ARGV[2] then return 0 end
  if (redis.call("GET", KEYS[2]) or "") ~= ARGV[10] then return 3 end
  redis.call("DEL", KEYS[2])
end
local first = tonumber(redis.call("HGET", KEYS[1], "first")) or 0
local next = tonumber(redis.call("HGET", KEYS[1], "next")) or 0
for i = 19, #ARGV do
  if ARGV[8] ~= "0" then
    redis.call("SET", ARGV[11] .. "m:" .. next, ARGV[i], "PX", ARGV[8])
  else
    redis.call("SET", ARGV[11] .. "m:" .. next, ARGV[i])
  end
  next = next + 1
end
local bound = tonumber(ARGV[9])
while bound > 0 and next - first > bound do
  redis.call("DEL", ARGV[11] .. "m:" .. first)
  first = first + 1
end
redis.call("HSET", KEYS[1], "first", first, "next", next, "updated_at", ARGV[5])
redis.call("HINCRBY", KEYS[1], "input_tokens", ARGV[6])
redis.call("HINCRBY", KEYS[1], "output_tokens", ARGV[7])
if ARGV[8] ~= "0" then redis.call("PEXPIRE", KEYS[1], ARGV[8]) end
if idempotent then
  redis.call("SET", KEYS[3], "C|" .. ARGV[13] .. "|" .. ARGV[14], "PX", ARGV[15])
  redis.call("ZADD", KEYS[4], tonumber(ARGV[16]) + tonumber(ARGV[15]), ARGV[12])
  redis.call("PEXPIRE", KEYS[4], ARGV[15])
end
redis.call("ZREMRANGEBYSCORE", KEYS[5], "-inf", "(" .. ARGV[18])
if ARGV[8] ~= "0" then
  redis.call("ZADD", KEYS[5], tonumber(ARGV[18]) + tonumber(ARGV[8]), ARGV[17])
  redis.call("PEXPIRE", KEYS[5], ARGV[8])
else
  redis.call("ZADD", KEYS[5], "+inf", ARGV[17])
end
return 1
"""

# KEYS: lock. ARGV: lock token. Releases the lock if this token holds it.
_ABANDON_TURN_LUA = """
if redis.call("GET", KEYS[1]) == ARGV[1] then redis.call("DEL", KEYS[1]) end
return 1
"""

# KEYS: meta, summary. ARGV: tenant, the count of the summary it replaces (0: none), the summary JSON, its
# TTL ms ("0": kept until deleted). Returns 1 when stored.
_COMMIT_SUMMARY_LUA = """
if redis.call("HGET", KEYS[1], "tenant") ~= ARGV[1] then return 0 end
local current = redis.call("GET", KEYS[2])
local count = 0
if current then count = cjson.decode(current)["count"] end
if count ~= tonumber(ARGV[2]) then return 0 end
if ARGV[4] ~= "0" then
  redis.call("SET", KEYS[2], ARGV[3], "PX", ARGV[4])
else
  redis.call("SET", KEYS[2], ARGV[3])
end
return 1
"""

# KEYS: meta. ARGV: tenant, input tokens, output tokens. Adds them if the conversation is there.
_ADD_USAGE_LUA = """
if redis.call("HGET", KEYS[1], "tenant") ~= ARGV[1] then return 0 end
redis.call("HINCRBY", KEYS[1], "input_tokens", ARGV[2])
redis.call("HINCRBY", KEYS[1], "output_tokens", ARGV[3])
return 1
"""

# KEYS: meta, summary. ARGV: tenant, user_id, start, limit ("-1": all), prefix P:. Returns {0} when the owner
# check fails, else {1, meta as a flat list, summary JSON or "", end, next, n1, message1, …}: the messages
# numbered start to end - 1 that are left.
_GET_LUA = (
    _APPEND_MESSAGES_LUA
    + """
local meta = redis.call("HGETALL", KEYS[1])
local fields = {}
for i = 1, #meta, 2 do fields[meta[i]] = meta[i + 1] end
if fields["tenant"] ~= ARGV[1] or fields["user_id"] ~= ARGV[2] then return {0} end
local next = tonumber(fields["next"]) or 0
local start = math.max(tonumber(ARGV[3]), tonumber(fields["first"]) or 0)
local stop = next
if ARGV[4] ~= "-1" then stop = math.min(next, start + tonumber(ARGV[4])) end
local result = {1, meta, redis.call("GET", KEYS[2]) or "", stop, next}
append_messages(result, ARGV[5], start, stop - 1)
return result
"""
)

# KEYS: meta, the turns set, lock, summary, the user's conversations. ARGV: tenant, user_id, prefix P:, the
# conversation id. Deletes it with every message and idempotency record, and returns {1, messages, summaries}
# (those that were still kept); {0} when the owner check failed.
_DELETE_LUA = """
local meta = redis.call("HMGET", KEYS[1], "tenant", "user_id", "first", "next")
if meta[1] ~= ARGV[1] or meta[2] ~= ARGV[2] then return {0} end
for _, key in ipairs(redis.call("ZRANGE", KEYS[2], 0, -1)) do
  redis.call("DEL", ARGV[3] .. "turn:" .. key)
end
local messages = 0
for n = tonumber(meta[3]) or 0, (tonumber(meta[4]) or 0) - 1 do
  messages = messages + redis.call("DEL", ARGV[3] .. "m:" .. n)
end
local summaries = redis.call("DEL", KEYS[4])
redis.call("DEL", KEYS[1], KEYS[2], KEYS[3])
redis.call("ZREM", KEYS[5], ARGV[4])
return {1, messages, summaries}
"""


_unavailable_on_redis_error = unavailable_on_redis_error(StoreUnavailable)


class RedisConversationStore(ConversationStore):
    """Conversations in Redis, under keys `chatmesh:conv:{tenant/id}:…` (see the scripts above).

    The `{tenant/id}` hash tag covers both the tenant and the id, so every key of a conversation sits in
    one Redis Cluster slot and the Lua scripts that check the owner and write may touch them all
    atomically. Tenant names (`[a-z0-9][a-z0-9-]*`) hold no '/', so the first '/' always ends the tenant.

    Each user's conversations are a sorted set `chatmesh:user:{tenant/user id}:conversations` (the id
    percent-encoded; conversation id -> when it expires, in ms), kept by the same scripts that commit and
    delete, with the retention as its TTL. It sits in another slot than the conversations it lists, so those
    scripts need one Redis server (as chatmesh uses), not a Redis Cluster.
    """

    def __init__(
        self,
        client: Redis,
        *,
        retention_seconds: float | None = None,
        max_messages: int | None = None,
        idempotency_ttl_seconds: float = 86_400.0,
    ) -> None:
        """Takes ownership of `client` (closed by `close`), which must decode responses; see `from_url`."""
        if not client.get_encoder().decode_responses:
            raise ValueError("RedisConversationStore needs a client created with decode_responses=True")
        self._client = client
        self._retention_seconds = retention_seconds
        self._retention_ms = "0" if retention_seconds is None else str(max(1, round(retention_seconds * 1000)))
        self._max_messages = str(max_messages or 0)
        self._idempotency_ttl_ms = str(
            max(1, round(_idempotency_ttl(idempotency_ttl_seconds, retention_seconds) * 1000))
        )
        self._claim_turn = client.register_script(_CLAIM_TURN_LUA)
        self._release_turn = client.register_script(_RELEASE_TURN_LUA)
        self._open_turn = client.register_script(_OPEN_TURN_LUA)
        self._abandon_turn = client.register_script(_ABANDON_TURN_LUA)
        self._commit_turn = client.register_script(_COMMIT_TURN_LUA)
        self._commit_summary = client.register_script(_COMMIT_SUMMARY_LUA)
        self._add_usage = client.register_script(_ADD_USAGE_LUA)
        self._get = client.register_script(_GET_LUA)
        self._delete = client.register_script(_DELETE_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        retention_seconds: float | None = None,
        max_messages: int | None = None,
        idempotency_ttl_seconds: float = 86_400.0,
        options: Mapping[str, Any] | None = None,
    ) -> RedisConversationStore:
        """A store with its own connection pool to `url`, e.g. `redis://localhost:6379/0`; `options` are
        more arguments of `Redis.from_url` (credentials, TLS files)."""
        client = Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5, **(options or {})
        )
        return cls(
            client,
            retention_seconds=retention_seconds,
            max_messages=max_messages,
            idempotency_ttl_seconds=idempotency_ttl_seconds,
        )

    @staticmethod
    def _prefix(tenant: str, conversation_id: str) -> str:
        return f"chatmesh:conv:{{{tenant}/{conversation_id}}}:"

    @classmethod
    def _keys(cls, tenant: str, conversation_id: str, *names: str) -> list[str]:
        prefix = cls._prefix(tenant, conversation_id)
        return [prefix + name for name in names]

    @staticmethod
    def _user_conversations(tenant: str, user_id: str) -> str:
        return f"chatmesh:user:{{{tenant}/{quote(user_id, safe='')}}}:conversations"

    @_unavailable_on_redis_error
    async def claim_turn(
        self, tenant: str, conversation_id: str, key: IdempotencyKey, *, lease_seconds: float
    ) -> TurnClaim:
        now_ms = math.floor(time.time() * 1000)
        state, replay = await self._claim_turn(
            keys=self._keys(tenant, conversation_id, f"turn:{key.key}", "turns"),
            args=(key.key, key.fingerprint, now_ms, now_ms + math.ceil(lease_seconds * 1000), self._idempotency_ttl_ms),
        )
        return TurnClaim(ClaimState(state), replay)

    @_unavailable_on_redis_error
    async def release_turn(self, tenant: str, conversation_id: str, key: IdempotencyKey) -> None:
        await self._release_turn(
            keys=self._keys(tenant, conversation_id, f"turn:{key.key}", "turns"), args=(key.key, key.fingerprint)
        )

    @_unavailable_on_redis_error
    async def open_turn(
        self, tenant: str, conversation_id: str, user_id: str, *, limit: int, lease_seconds: float
    ) -> TurnHistory:
        token = uuid.uuid4().hex
        result = await self._open_turn(
            keys=self._keys(tenant, conversation_id, "meta", "lock"),
            args=(
                tenant,
                user_id,
                max(0, limit),
                max(1, math.ceil(lease_seconds * 1000)),
                token,
                self._prefix(tenant, conversation_id),
            ),
        )
        if result[0] == 0:
            raise ConversationNotFound(conversation_id)
        if result[0] == 1:
            raise TurnInProgress(conversation_id)
        numbered = result[2:]
        summary = _decode_summary(result[1])
        first = int(numbered[0]) if numbered else (summary.message_count if summary else 0)
        return TurnHistory(
            messages=[_decode_message(raw) for raw in numbered[1::2]], first_index=first, summary=summary, lock=token
        )

    @_unavailable_on_redis_error
    async def abandon_turn(self, tenant: str, conversation_id: str, lock: str) -> None:
        await self._abandon_turn(keys=self._keys(tenant, conversation_id, "lock"), args=(lock,))

    @_unavailable_on_redis_error
    async def commit_turn(
        self,
        tenant: str,
        conversation_id: str,
        user_id: str,
        turn: CommittedTurn,
        *,
        new: bool,
        lock: str | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> None:
        idempotent: tuple[str | int, ...] = ("", "", "", "", "")
        if idempotency is not None:
            idempotent = (
                idempotency.key,
                idempotency.fingerprint,
                idempotency.replay,
                self._idempotency_ttl_ms,
                math.floor(time.time() * 1000),
            )
        record = f"turn:{idempotency.key}" if idempotency else "turn:"
        committed = await self._commit_turn(
            keys=[
                *self._keys(tenant, conversation_id, "meta", "lock", record, "turns"),
                self._user_conversations(tenant, user_id),
            ],
            args=(
                tenant,
                user_id,
                "1" if new else "0",
                repr(turn.messages[0].created_at),
                repr(turn.messages[-1].created_at),
                turn.input_tokens,
                turn.output_tokens,
                self._retention_ms,
                self._max_messages,
                lock or "",
                self._prefix(tenant, conversation_id),
                *idempotent,
                conversation_id,
                math.floor(time.time() * 1000),
                *(_encode_message(message) for message in turn.messages),
            ),
        )
        if committed == 2:
            raise TurnAlreadyCommitted(idempotency.key if idempotency else "")
        if committed == 3:
            raise TurnInProgress(conversation_id)
        if not committed:
            raise ConversationNotFound(conversation_id)

    @_unavailable_on_redis_error
    async def commit_summary(
        self, tenant: str, conversation_id: str, summary: Summary, *, replaces: int, covered_until: float
    ) -> bool:
        ttl_ms = "0"
        if self._retention_seconds is not None:
            remaining = math.floor((covered_until - time.time()) * 1000)
            if remaining <= 0:
                return False
            ttl_ms = str(remaining)
        return bool(
            await self._commit_summary(
                keys=self._keys(tenant, conversation_id, "meta", "summary"),
                args=(tenant, replaces, _encode_summary(summary), ttl_ms),
            )
        )

    @_unavailable_on_redis_error
    async def add_usage(self, tenant: str, conversation_id: str, input_tokens: int, output_tokens: int) -> None:
        await self._add_usage(
            keys=self._keys(tenant, conversation_id, "meta"), args=(tenant, input_tokens, output_tokens)
        )

    @_unavailable_on_redis_error
    async def get(
        self, tenant: str, conversation_id: str, user_id: str, *, start: int = 0, limit: int | None = None
    ) -> Conversation:
        result = await self._get(
            keys=self._keys(tenant, conversation_id, "meta", "summary"),
            args=(
                tenant,
                user_id,
                start,
                -1 if limit is None else max(0, limit),
                self._prefix(tenant, conversation_id),
            ),
        )
        if result[0] == 0:
            raise ConversationNotFound(conversation_id)
        _, flat_meta, raw_summary, stop, next_index, *numbered = result
        meta = dict(zip(flat_meta[::2], flat_meta[1::2], strict=True))
        return Conversation(
            tenant=tenant,
            conversation_id=conversation_id,
            user_id=user_id,
            created_at=float(meta["created_at"]),
            updated_at=float(meta["updated_at"]),
            messages=[_decode_message(raw) for raw in numbered[1::2]],
            input_tokens=int(meta["input_tokens"]),
            output_tokens=int(meta["output_tokens"]),
            summary=_decode_summary(raw_summary),
            first_index=int(numbered[0]) if numbered else int(stop),
            next_index=int(stop) if int(stop) < int(next_index) else None,
        )

    @_unavailable_on_redis_error
    async def delete(self, tenant: str, conversation_id: str, user_id: str) -> Erased:
        deleted, *counts = await self._delete(
            keys=[
                *self._keys(tenant, conversation_id, "meta", "turns", "lock", "summary"),
                self._user_conversations(tenant, user_id),
            ],
            args=(tenant, user_id, self._prefix(tenant, conversation_id), conversation_id),
        )
        if not deleted:
            raise ConversationNotFound(conversation_id)
        messages, summaries = counts
        return Erased(1, messages, summaries)

    @_unavailable_on_redis_error
    async def erase_user(self, tenant: str, user_id: str) -> Erased:
        # One conversation at a time, each atomic: a conversation the user starts meanwhile is not erased.
        index = self._user_conversations(tenant, user_id)
        erased = Erased()
        for conversation_id in await self._client.zrange(index, 0, -1):
            try:
                erased += await self.delete(tenant, conversation_id, user_id)
            except ConversationNotFound:
                # It expired (and its id may since have been taken by another user): only the index still named it.
                await self._client.zrem(index, conversation_id)
        return erased

    async def close(self) -> None:
        await self._client.aclose()


def _encode_message(message: StoredMessage) -> str:
    data: dict[str, object] = {"role": message.role, "content": message.content, "created_at": message.created_at}
    if message.refused:
        data["refused"] = True
    if message.encoding:
        data["tokens"] = message.tokens
        data["encoding"] = message.encoding
    if message.tool_calls:
        data["tool_calls"] = [_encode_tool_call(call) for call in message.tool_calls]
    if message.tool_call_id:
        data["tool_call_id"] = message.tool_call_id
    if message.tool_error:
        data["tool_error"] = True
    if message.placeholders:
        data["placeholders"] = dict(message.placeholders)
    if message.images:
        data["images"] = [
            {
                "url": image.url,
                "mime_type": image.mime_type,
                "data": base64.b64encode(image.data).decode("ascii"),
                "detail": image.detail,
            }
            for image in message.images
        ]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _encode_tool_call(call: StoredToolCall) -> dict[str, object]:
    data: dict[str, object] = {"id": call.id, "name": call.name, "arguments": call.arguments}
    if call.server_side:
        data["server_side"] = True
    return data


def _decode_message(raw: str) -> StoredMessage:
    data = json.loads(raw)
    return StoredMessage(
        role=data["role"],
        content=data["content"],
        created_at=float(data["created_at"]),
        placeholders=tuple(data.get("placeholders", {}).items()),
        refused=data.get("refused", False),
        tokens=data.get("tokens", 0),
        encoding=data.get("encoding", ""),
        images=tuple(
            StoredImage(
                url=image["url"],
                mime_type=image["mime_type"],
                data=base64.b64decode(image["data"]),
                detail=image["detail"],
            )
            for image in data.get("images", ())
        ),
        tool_calls=tuple(
            StoredToolCall(
                id=call["id"],
                name=call["name"],
                arguments=call["arguments"],
                server_side=call.get("server_side", False),
            )
            for call in data.get("tool_calls", ())
        ),
        tool_call_id=data.get("tool_call_id", ""),
        tool_error=data.get("tool_error", False),
    )


def _encode_summary(summary: Summary) -> str:
    return json.dumps(
        {"text": summary.text, "count": summary.message_count, "at": summary.updated_at},
        ensure_ascii=False,
        separators=(",", ":"),
    )


def _decode_summary(raw: str) -> Summary | None:
    if not raw:
        return None
    data = json.loads(raw)
    return Summary(text=data["text"], message_count=int(data["count"]), updated_at=float(data["at"]))


def _idempotency_ttl(ttl_seconds: float, retention_seconds: float | None) -> float:
    """Keys are remembered no longer than the conversation's text is kept."""
    return ttl_seconds if retention_seconds is None else min(ttl_seconds, retention_seconds)


def create_conversation_store(
    redis_url: str | None,
    *,
    retention_seconds: float | None = None,
    max_conversations: int | None = None,
    max_messages: int | None = None,
    idempotency_ttl_seconds: float = 86_400.0,
    options: Mapping[str, Any] | None = None,
) -> ConversationStore:
    """Redis when a URL is given (CHATMESH_REDIS_URL), the in-memory store otherwise (also for "").
    `max_conversations` bounds the in-memory store only; Redis is bounded by its own memory policy.
    `max_messages` bounds every conversation: past it, the oldest messages go first."""
    if redis_url:
        return RedisConversationStore.from_url(
            redis_url,
            retention_seconds=retention_seconds,
            max_messages=max_messages,
            idempotency_ttl_seconds=idempotency_ttl_seconds,
            options=options,
        )
    return MemoryConversationStore(
        retention_seconds=retention_seconds,
        max_conversations=max_conversations,
        max_messages=max_messages,
        idempotency_ttl_seconds=idempotency_ttl_seconds,
    )
