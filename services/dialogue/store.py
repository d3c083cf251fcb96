"""Where conversations live: the ConversationStore interface and its in-memory and Redis implementations.

A conversation belongs to the user of the tenant that started it. Every method takes that tenant and
user id, and a conversation of another tenant or of another user is reported exactly like one that
does not exist. Conversation ids are scoped by tenant: the same id in two tenants names two
independent conversations, and the same user id in two tenants names two different users.
A conversation comes into being with its first committed turn, so a turn that fails leaves nothing.
With a retention period, a conversation is erased that long after its last committed turn.

A turn sent with an idempotency key is claimed first (`claim_turn`): the claim says whether this attempt
runs it, another attempt still does, or it was committed, and then what the caller was answered, which
`commit_turn` keeps with the turn in the same atomic step. A claim whose turn fails is dropped
(`release_turn`); one whose process died lapses with its lease. Keys are remembered for
`idempotency_ttl_seconds` (within the retention period), and deleting the conversation forgets them.
"""

from __future__ import annotations

import abc
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

from redis.asyncio import Redis

from chatmesh.runtime.redis_errors import unavailable_on_redis_error

Role = Literal["user", "assistant"]


class ConversationNotFound(Exception):
    """The conversation does not exist, or belongs to another tenant or another user."""


class TurnAlreadyCommitted(Exception):
    """Another attempt with the same idempotency key committed the turn first; nothing was written."""


class StoreUnavailable(Exception):
    """The store could not be reached or did not answer; nothing was written."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    role: Role
    content: str
    created_at: float  # Unix seconds
    # Refused by safety policy: the content is not kept, and the model never sees the message.
    refused: bool = False


@dataclass(frozen=True, slots=True)
class CommittedTurn:
    """One turn as it is committed: the user's message, the reply, and what the model reported."""

    user_message: StoredMessage
    reply: StoredMessage
    input_tokens: int
    output_tokens: int


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


@dataclass(slots=True)
class Conversation:
    tenant: str
    conversation_id: str
    user_id: str
    created_at: float
    updated_at: float
    messages: list[StoredMessage] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0


class ConversationStore(abc.ABC):
    @abc.abstractmethod
    async def recent_messages(self, tenant: str, conversation_id: str, user_id: str, limit: int) -> list[StoredMessage]:
        """The last `limit` messages, oldest first. Raises ConversationNotFound."""

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
        idempotency: IdempotencyKey | None = None,
    ) -> None:
        """Appends both messages of a turn and adds its usage, all or nothing; with `idempotency`, keeps its
        replay under the key in the same step (raises TurnAlreadyCommitted if another attempt committed it).

        With `new`, creates the conversation owned by `user_id` of `tenant` (raises ConversationNotFound
        if the id is already taken within `tenant`; the same id in another tenant does not count).
        Without it, raises ConversationNotFound if the conversation no longer exists or belongs to
        another tenant or user, for example because it was deleted while the turn ran.
        """

    @abc.abstractmethod
    async def get(self, tenant: str, conversation_id: str, user_id: str) -> Conversation:
        """The whole conversation. Raises ConversationNotFound."""

    @abc.abstractmethod
    async def delete(self, tenant: str, conversation_id: str, user_id: str) -> None:
        """Erases the conversation at once. Raises ConversationNotFound."""

    async def close(self) -> None:  # noqa: B027 - optional hook; the memory store has nothing to release
        """Releases connections."""


class MemoryConversationStore(ConversationStore):
    """Conversations in a dict, for one process. Never awaits, so every method is atomic on the event loop.

    Keyed by (tenant, conversation_id). Bounded: past `max_conversations` (over all tenants together),
    the least recently used conversation is dropped, so that a long-running process without Redis does
    not grow without end.
    """

    def __init__(
        self,
        *,
        retention_seconds: float | None = None,
        max_conversations: int | None = None,
        idempotency_ttl_seconds: float = 86_400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._conversations: OrderedDict[tuple[str, str], Conversation] = OrderedDict()
        self._expires_at: dict[tuple[str, str], float] = {}
        # By conversation, then key: (state "R" or "C", fingerprint, lease end or replay, forgotten at).
        self._turns: dict[tuple[str, str], dict[str, tuple[str, str, float | str, float]]] = {}
        self._idempotency_ttl = _idempotency_ttl(idempotency_ttl_seconds, retention_seconds)
        self._retention_seconds = retention_seconds
        self._max_conversations = max_conversations
        self._clock = clock

    def _owned(self, tenant: str, conversation_id: str, user_id: str) -> Conversation:
        key = (tenant, conversation_id)
        conversation = self._conversations.get(key)
        if conversation is not None and self._clock() >= self._expires_at.get(key, math.inf):
            self._forget(key)
            conversation = None
        if conversation is None or conversation.tenant != tenant or conversation.user_id != user_id:
            raise ConversationNotFound(conversation_id)
        self._conversations.move_to_end(key)
        return conversation

    def _forget(self, key: tuple[str, str]) -> None:
        del self._conversations[key]
        self._expires_at.pop(key, None)
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

    async def recent_messages(self, tenant: str, conversation_id: str, user_id: str, limit: int) -> list[StoredMessage]:
        messages = self._owned(tenant, conversation_id, user_id).messages
        return messages[-limit:] if limit > 0 else []

    async def commit_turn(
        self,
        tenant: str,
        conversation_id: str,
        user_id: str,
        turn: CommittedTurn,
        *,
        new: bool,
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
            conversation = Conversation(
                tenant=tenant,
                conversation_id=conversation_id,
                user_id=user_id,
                created_at=turn.user_message.created_at,
                updated_at=turn.reply.created_at,
            )
            self._conversations[key] = conversation
        else:
            conversation = self._owned(tenant, conversation_id, user_id)
        conversation.messages += (turn.user_message, turn.reply)
        conversation.input_tokens += turn.input_tokens
        conversation.output_tokens += turn.output_tokens
        conversation.updated_at = turn.reply.created_at
        if self._retention_seconds is not None:
            self._expires_at[key] = self._clock() + self._retention_seconds
        if idempotency is not None:
            self._turn_records(key)[idempotency.key] = (
                "C",
                idempotency.fingerprint,
                idempotency.replay,
                self._clock() + self._idempotency_ttl,
            )

    async def get(self, tenant: str, conversation_id: str, user_id: str) -> Conversation:
        # StoredMessage is frozen, so copying the list is enough to keep callers off the stored state.
        conversation = self._owned(tenant, conversation_id, user_id)
        return replace(conversation, messages=list(conversation.messages))

    async def delete(self, tenant: str, conversation_id: str, user_id: str) -> None:
        self._owned(tenant, conversation_id, user_id)
        self._forget((tenant, conversation_id))


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

# KEYS: meta, messages, the key's record, the turns set. ARGV: tenant, user_id, new ("1" or "0"), created_at,
# updated_at, input_tokens, output_tokens, user message, reply, retention in ms ("0": kept until deleted);
# then, for an idempotent turn, key, fingerprint, replay, TTL ms, now ms. Returns 1 when committed, 0 when
# the id is taken (new) or the owner check failed, 2 when another attempt committed the key's turn.
_COMMIT_TURN_LUA = """
if ARGV[11] and string.sub(redis.call("GET", KEYS[3]) or "", 1, 2) == "C|" then return 2 end
if ARGV[3] == "1" then
  if redis.call("EXISTS", KEYS[1]) == 1 then return 0 end
  redis.call("HSET", KEYS[1], "tenant", ARGV[1], "user_id", ARGV[2], "created_at", ARGV[4],
    "input_tokens", 0, "output_tokens", 0)
else
  local owner = redis.call("HMGET", KEYS[1], "tenant", "user_id")
  if owner[1] ~= ARGV[1] or owner[2] ~= ARGV[2] then return 0 end
end
redis.call("RPUSH", KEYS[2], ARGV[8], ARGV[9])
redis.call("HINCRBY", KEYS[1], "input_tokens", ARGV[6])
redis.call("HINCRBY", KEYS[1], "output_tokens", ARGV[7])
redis.call("HSET", KEYS[1], "updated_at", ARGV[5])
if ARGV[10] ~= "0" then
  redis.call("PEXPIRE", KEYS[1], ARGV[10])
  redis.call("PEXPIRE", KEYS[2], ARGV[10])
end
if ARGV[11] then
  redis.call("SET", KEYS[3], "C|" .. ARGV[12] .. "|" .. ARGV[13], "PX", ARGV[14])
  redis.call("ZADD", KEYS[4], tonumber(ARGV[15]) + tonumber(ARGV[14]), ARGV[11])
  redis.call("PEXPIRE", KEYS[4], ARGV[14])
end
return 1
"""

# KEYS: meta, messages, the turns set. ARGV: tenant, user_id, the prefix of the keys' records. Returns 1 when
# deleted (with every idempotency record), 0 when the owner check failed.
_DELETE_LUA = """
local owner = redis.call("HMGET", KEYS[1], "tenant", "user_id")
if owner[1] ~= ARGV[1] or owner[2] ~= ARGV[2] then return 0 end
for _, key in ipairs(redis.call("ZRANGE", KEYS[3], 0, -1)) do
  redis.call("DEL", ARGV[3] .. key)
end
redis.call("DEL", KEYS[1], KEYS[2], KEYS[3])
return 1
"""


_unavailable_on_redis_error = unavailable_on_redis_error(StoreUnavailable)


class RedisConversationStore(ConversationStore):
    """Conversations in Redis: a hash `chatmesh:conv:{tenant/id}:meta` (tenant, user_id, created_at,
    updated_at, input_tokens, output_tokens) and a list `chatmesh:conv:{tenant/id}:messages`.

    The `{tenant/id}` hash tag covers both the tenant and the id, so both keys of a conversation sit
    in one Redis Cluster slot and the Lua scripts that check the owner and write may touch both
    atomically. Tenant names (`[a-z0-9][a-z0-9-]*`) hold no '/', so the first '/' always ends the tenant.
    """

    def __init__(
        self, client: Redis, *, retention_seconds: float | None = None, idempotency_ttl_seconds: float = 86_400.0
    ) -> None:
        """Takes ownership of `client` (closed by `close`), which must decode responses; see `from_url`."""
        if not client.get_encoder().decode_responses:
            raise ValueError("RedisConversationStore needs a client created with decode_responses=True")
        self._client = client
        self._retention_ms = "0" if retention_seconds is None else str(max(1, round(retention_seconds * 1000)))
        self._idempotency_ttl_ms = str(
            max(1, round(_idempotency_ttl(idempotency_ttl_seconds, retention_seconds) * 1000))
        )
        self._claim_turn = client.register_script(_CLAIM_TURN_LUA)
        self._release_turn = client.register_script(_RELEASE_TURN_LUA)
        self._commit_turn = client.register_script(_COMMIT_TURN_LUA)
        self._delete = client.register_script(_DELETE_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        retention_seconds: float | None = None,
        idempotency_ttl_seconds: float = 86_400.0,
        options: Mapping[str, Any] | None = None,
    ) -> RedisConversationStore:
        """A store with its own connection pool to `url`, e.g. `redis://localhost:6379/0`; `options` are
        more arguments of `Redis.from_url` (credentials, TLS files)."""
        client = Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5, **(options or {})
        )
        return cls(client, retention_seconds=retention_seconds, idempotency_ttl_seconds=idempotency_ttl_seconds)

    @staticmethod
    def _prefix(tenant: str, conversation_id: str) -> str:
        return f"chatmesh:conv:{{{tenant}/{conversation_id}}}"

    @classmethod
    def _keys(cls, tenant: str, conversation_id: str) -> tuple[str, str]:
        prefix = cls._prefix(tenant, conversation_id)
        return f"{prefix}:meta", f"{prefix}:messages"

    @classmethod
    def _turn_keys(cls, tenant: str, conversation_id: str, key: str) -> tuple[str, str]:
        prefix = cls._prefix(tenant, conversation_id)
        return f"{prefix}:turn:{key}", f"{prefix}:turns"

    @_unavailable_on_redis_error
    async def claim_turn(
        self, tenant: str, conversation_id: str, key: IdempotencyKey, *, lease_seconds: float
    ) -> TurnClaim:
        now_ms = math.floor(time.time() * 1000)
        state, replay = await self._claim_turn(
            keys=self._turn_keys(tenant, conversation_id, key.key),
            args=(key.key, key.fingerprint, now_ms, now_ms + math.ceil(lease_seconds * 1000), self._idempotency_ttl_ms),
        )
        return TurnClaim(ClaimState(state), replay)

    @_unavailable_on_redis_error
    async def release_turn(self, tenant: str, conversation_id: str, key: IdempotencyKey) -> None:
        await self._release_turn(
            keys=self._turn_keys(tenant, conversation_id, key.key), args=(key.key, key.fingerprint)
        )

    @_unavailable_on_redis_error
    async def recent_messages(self, tenant: str, conversation_id: str, user_id: str, limit: int) -> list[StoredMessage]:
        meta_key, messages_key = self._keys(tenant, conversation_id)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hmget(meta_key, "tenant", "user_id")
            if limit > 0:  # LRANGE -0 -1 would return the whole list
                pipe.lrange(messages_key, -limit, -1)
            results = await pipe.execute()
        if results[0] != [tenant, user_id]:
            raise ConversationNotFound(conversation_id)
        return [_decode_message(raw) for raw in results[1]] if limit > 0 else []

    @_unavailable_on_redis_error
    async def commit_turn(
        self,
        tenant: str,
        conversation_id: str,
        user_id: str,
        turn: CommittedTurn,
        *,
        new: bool,
        idempotency: IdempotencyKey | None = None,
    ) -> None:
        idempotent: tuple[str | int, ...] = ()
        turn_keys = self._turn_keys(tenant, conversation_id, idempotency.key if idempotency else "")
        if idempotency is not None:
            idempotent = (
                idempotency.key,
                idempotency.fingerprint,
                idempotency.replay,
                self._idempotency_ttl_ms,
                math.floor(time.time() * 1000),
            )
        committed = await self._commit_turn(
            keys=(*self._keys(tenant, conversation_id), *turn_keys),
            args=(
                tenant,
                user_id,
                "1" if new else "0",
                repr(turn.user_message.created_at),
                repr(turn.reply.created_at),
                turn.input_tokens,
                turn.output_tokens,
                _encode_message(turn.user_message),
                _encode_message(turn.reply),
                self._retention_ms,
                *idempotent,
            ),
        )
        if committed == 2:
            raise TurnAlreadyCommitted(idempotency.key if idempotency else "")
        if not committed:
            raise ConversationNotFound(conversation_id)

    @_unavailable_on_redis_error
    async def get(self, tenant: str, conversation_id: str, user_id: str) -> Conversation:
        meta_key, messages_key = self._keys(tenant, conversation_id)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hgetall(meta_key)
            pipe.lrange(messages_key, 0, -1)
            meta, raw_messages = await pipe.execute()
        if meta.get("tenant") != tenant or meta.get("user_id") != user_id:
            raise ConversationNotFound(conversation_id)
        return Conversation(
            tenant=tenant,
            conversation_id=conversation_id,
            user_id=user_id,
            created_at=float(meta["created_at"]),
            updated_at=float(meta["updated_at"]),
            messages=[_decode_message(raw) for raw in raw_messages],
            input_tokens=int(meta["input_tokens"]),
            output_tokens=int(meta["output_tokens"]),
        )

    @_unavailable_on_redis_error
    async def delete(self, tenant: str, conversation_id: str, user_id: str) -> None:
        prefix = self._prefix(tenant, conversation_id)
        if not await self._delete(
            keys=(*self._keys(tenant, conversation_id), f"{prefix}:turns"), args=(tenant, user_id, f"{prefix}:turn:")
        ):
            raise ConversationNotFound(conversation_id)

    async def close(self) -> None:
        await self._client.aclose()


def _encode_message(message: StoredMessage) -> str:
    data: dict[str, object] = {"role": message.role, "content": message.content, "created_at": message.created_at}
    if message.refused:
        data["refused"] = True
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _decode_message(raw: str) -> StoredMessage:
    data = json.loads(raw)
    return StoredMessage(
        role=data["role"],
        content=data["content"],
        created_at=float(data["created_at"]),
        refused=data.get("refused", False),
    )


def _idempotency_ttl(ttl_seconds: float, retention_seconds: float | None) -> float:
    """Keys are remembered no longer than the conversation's text is kept."""
    return ttl_seconds if retention_seconds is None else min(ttl_seconds, retention_seconds)


def create_conversation_store(
    redis_url: str | None,
    *,
    retention_seconds: float | None = None,
    max_conversations: int | None = None,
    idempotency_ttl_seconds: float = 86_400.0,
    options: Mapping[str, Any] | None = None,
) -> ConversationStore:
    """Redis when a URL is given (CHATMESH_REDIS_URL), the in-memory store otherwise (also for "").
    `max_conversations` bounds the in-memory store only; Redis is bounded by its own memory policy."""
    if redis_url:
        return RedisConversationStore.from_url(
            redis_url,
            retention_seconds=retention_seconds,
            idempotency_ttl_seconds=idempotency_ttl_seconds,
            options=options,
        )
    return MemoryConversationStore(
        retention_seconds=retention_seconds,
        max_conversations=max_conversations,
        idempotency_ttl_seconds=idempotency_ttl_seconds,
    )
