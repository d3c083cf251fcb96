"""Where conversations live: the ConversationStore interface and its in-memory and Redis implementations.

A conversation belongs to the user of the tenant that started it. Every method takes that tenant and
user id, and a conversation of another tenant or of another user is reported exactly like one that
does not exist. Conversation ids are scoped by tenant: the same id in two tenants names two
independent conversations, and the same user id in two tenants names two different users.
A conversation comes into being with its first committed turn, so a turn that fails leaves nothing.
With a retention period, a conversation is erased that long after its last committed turn.
"""

from __future__ import annotations

import abc
import functools
import json
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Literal, ParamSpec, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

Role = Literal["user", "assistant"]


class ConversationNotFound(Exception):
    """The conversation does not exist, or belongs to another tenant or another user."""


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
    async def commit_turn(
        self, tenant: str, conversation_id: str, user_id: str, turn: CommittedTurn, *, new: bool
    ) -> None:
        """Appends both messages of a turn and adds its usage, all or nothing.

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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._conversations: OrderedDict[tuple[str, str], Conversation] = OrderedDict()
        self._expires_at: dict[tuple[str, str], float] = {}
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

    async def recent_messages(self, tenant: str, conversation_id: str, user_id: str, limit: int) -> list[StoredMessage]:
        messages = self._owned(tenant, conversation_id, user_id).messages
        return messages[-limit:] if limit > 0 else []

    async def commit_turn(
        self, tenant: str, conversation_id: str, user_id: str, turn: CommittedTurn, *, new: bool
    ) -> None:
        key = (tenant, conversation_id)
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

# KEYS: meta, messages. ARGV: tenant, user_id, new ("1" or "0"), created_at, updated_at, input_tokens,
# output_tokens, user message, reply, retention in ms ("0": kept until deleted). Returns 1 when
# committed, 0 when the id is taken (new) or the owner check failed.
_COMMIT_TURN_LUA = """
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
return 1
"""

# KEYS: meta, messages. ARGV: tenant, user_id. Returns 1 when deleted, 0 when the owner check failed.
_DELETE_LUA = """
local owner = redis.call("HMGET", KEYS[1], "tenant", "user_id")
if owner[1] ~= ARGV[1] or owner[2] ~= ARGV[2] then return 0 end
redis.call("DEL", KEYS[1], KEYS[2])
return 1
"""


P = ParamSpec("P")
R = TypeVar("R")


def _unavailable_on_redis_error(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turns Redis' own connection and timeout errors into StoreUnavailable."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except RedisError as error:
            raise StoreUnavailable(type(error).__name__) from error

    return wrapper


class RedisConversationStore(ConversationStore):
    """Conversations in Redis: a hash `chatmesh:conv:{tenant/id}:meta` (tenant, user_id, created_at,
    updated_at, input_tokens, output_tokens) and a list `chatmesh:conv:{tenant/id}:messages`.

    The `{tenant/id}` hash tag covers both the tenant and the id, so both keys of a conversation sit
    in one Redis Cluster slot and the Lua scripts that check the owner and write may touch both
    atomically. Tenant names (`[a-z0-9][a-z0-9-]*`) hold no '/', so the first '/' always ends the tenant.
    """

    def __init__(self, client: Redis, *, retention_seconds: float | None = None) -> None:
        """Takes ownership of `client` (closed by `close`), which must decode responses; see `from_url`."""
        if not client.get_encoder().decode_responses:
            raise ValueError("RedisConversationStore needs a client created with decode_responses=True")
        self._client = client
        self._retention_ms = "0" if retention_seconds is None else str(max(1, round(retention_seconds * 1000)))
        self._commit_turn = client.register_script(_COMMIT_TURN_LUA)
        self._delete = client.register_script(_DELETE_LUA)

    @classmethod
    def from_url(cls, url: str, *, retention_seconds: float | None = None) -> RedisConversationStore:
        """A store with its own connection pool to `url`, e.g. `redis://localhost:6379/0`."""
        client = Redis.from_url(url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5)
        return cls(client, retention_seconds=retention_seconds)

    @staticmethod
    def _keys(tenant: str, conversation_id: str) -> tuple[str, str]:
        prefix = f"chatmesh:conv:{{{tenant}/{conversation_id}}}"
        return f"{prefix}:meta", f"{prefix}:messages"

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
        self, tenant: str, conversation_id: str, user_id: str, turn: CommittedTurn, *, new: bool
    ) -> None:
        committed = await self._commit_turn(
            keys=self._keys(tenant, conversation_id),
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
            ),
        )
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
        if not await self._delete(keys=self._keys(tenant, conversation_id), args=(tenant, user_id)):
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


def create_conversation_store(
    redis_url: str | None, *, retention_seconds: float | None = None, max_conversations: int | None = None
) -> ConversationStore:
    """Redis when a URL is given (CHATMESH_REDIS_URL), the in-memory store otherwise (also for "").
    `max_conversations` bounds the in-memory store only; Redis is bounded by its own memory policy."""
    if redis_url:
        return RedisConversationStore.from_url(redis_url, retention_seconds=retention_seconds)
    return MemoryConversationStore(retention_seconds=retention_seconds, max_conversations=max_conversations)
