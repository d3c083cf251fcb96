"""Where answers are kept: an in-process LRU bounded by bytes, Redis, and the two-tier AnswerCache over them.

Values are opaque bytes here (the service stores a serialized `CachedReply`). Every entry has a TTL,
in both tiers.

Erasure: a stored entry is also listed in indexes (sets of keys, named by chatmesh.cache.keys: one for the
conversation and one for the user it came from), in both tiers, so that `AnswerCache.erase(index)` finds every
entry stored from a conversation or a user. Every cache process keeps a memory tier of its own, and Redis
tells them all what was erased: the erasure publishes the index and its keys on ERASURES_CHANNEL, in the
same script that deletes them, and each process drops them from its memory (`AnswerCache.follow_announcements`).
A process that was not subscribed when a notice went out cannot know what it missed: every (re)subscription
empties its memory tier, and with Redis, memory entries live at most `memory_ttl_seconds` (one minute by
default) whatever happens to the subscription. That bound, rather than asking Redis on every memory hit
whether the entry still exists, keeps memory hits free of any network call.

An erasure also leaves a tombstone of the index, in every tier, for TOMBSTONE_SECONDS: a store that lists a
tombstoned index is refused (`IndexErased`) and writes nothing, checked in the same step as the write (one Lua
script in Redis, one synchronous call in memory). Dialogue stores an answer after its caller has the reply, so an
erasure asked for right after it can come first; without the tombstone, that store would put back what was erased.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from chatmesh.cache import metrics
from chatmesh.cache.keys import KEY_PREFIX, tombstone
from chatmesh.runtime import redis_connection
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import CacheSettings

log = get_logger(__name__)

# Where erasures are announced to every cache process: "<index>\n<key>\n<key>…".
ERASURES_CHANNEL = "chatmesh:cache-erasures"
# Where the semantic cache announces each question it stores: its key (chatmesh.cache.semantic).
ADDITIONS_CHANNEL = "chatmesh:cache-additions"
# The wait before subscribing again after the subscription failed (Redis down or restarting).
RESUBSCRIBE_SECONDS = 1.0
# How long an erased index refuses the stores that list it. It must outlive any store in flight when the erasure
# ran: dialogue gives a Store CHATMESH_CACHE_LOOKUP_TIMEOUT_SECONDS (0.5 s by default) as its deadline, and the
# cache's handler stops there (the multiplexed server stops it at the call's deadline, gRPC cancels a unary one);
# even without a deadline, each of its steps is bounded by the Redis and embedding timeouts, seconds in all. A
# minute outlives them by far, and costs only that the erased user's or conversation's answers are not cached
# for that minute.
TOMBSTONE_SECONDS = 60.0
# The most tombstones a memory tier keeps, the oldest going first: ten thousand erasures a minute per process.
MAX_TOMBSTONES = 10_000


class TierKind(enum.Enum):
    MEMORY = "memory"
    REDIS = "redis"


class IndexErased(Exception):
    """A store listed an index erased less than its tombstone's life ago (TOMBSTONE_SECONDS): nothing was written."""


@dataclass(frozen=True, slots=True)
class CachedValue:
    value: bytes
    ttl_seconds: float  # time left before the entry expires; math.inf if it has no expiry


class Tier(abc.ABC):
    """One place to keep values under keys, each with a TTL."""

    kind: ClassVar[TierKind]

    @abc.abstractmethod
    async def get(self, key: str) -> CachedValue | None:
        """The value and its remaining TTL, or None when missing or expired."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, ttl_seconds: float, indexes: Sequence[str] = ()) -> bool:
        """Keeps `value` under `key` for `ttl_seconds`, replacing what was there, and lists `key` in each of
        `indexes` (narrowest first: a conversation's, then its user's). False when not kept. Raises IndexErased,
        writing nothing, when one of `indexes` has a tombstone."""

    @abc.abstractmethod
    async def erase(self, index: str) -> int:
        """Removes every entry listed in `index`, and the index, and leaves a tombstone of it; returns how many
        entries there were."""

    async def close(self) -> None:  # noqa: B027 - optional hook; the memory tier has nothing to release
        """Releases connections."""


class MemoryTier(Tier):
    """An LRU in this process, bounded by the bytes of its keys and values.

    Storing evicts least recently used entries until the total is within `max_bytes`; an entry larger
    than the bound on its own is not stored (and replaces nothing). An entry leaves its indexes when it
    leaves the tier, so they never outgrow it. Tombstones live `tombstone_seconds`, at most MAX_TOMBSTONES of them.
    Never awaits, so every method is atomic on the event loop. `clock` is injectable for tests.
    """

    kind = TierKind.MEMORY

    def __init__(
        self,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        tombstone_seconds: float = TOMBSTONE_SECONDS,
    ) -> None:
        self._max_bytes = max_bytes
        self._clock = clock
        self._tombstone_seconds = tombstone_seconds
        # key -> (value, expires at, the indexes that list it)
        self._entries: OrderedDict[str, tuple[bytes, float, frozenset[str]]] = OrderedDict()
        self._indexes: dict[str, set[str]] = {}
        # index -> when its tombstone expires, the soonest first (all live equally long)
        self._tombstones: OrderedDict[str, float] = OrderedDict()
        self._bytes = 0

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def entry_size(key: str, value: bytes) -> int:
        """What an entry counts against `max_bytes`."""
        return len(key.encode()) + len(value)

    async def get(self, key: str) -> CachedValue | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires_at, _ = entry
        remaining = expires_at - self._clock()
        if remaining <= 0:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return CachedValue(value, remaining)

    async def put(self, key: str, value: bytes, ttl_seconds: float, indexes: Sequence[str] = ()) -> bool:
        now = self._clock()
        if any(self._tombstones.get(index, now) > now for index in indexes):
            raise IndexErased
        size = self.entry_size(key, value)
        if ttl_seconds <= 0 or size > self._max_bytes:
            return False
        # Stored again from another conversation, it stays listed under the first one too (as in Redis).
        previous = self._entries.get(key)
        listed = frozenset(indexes) | (previous[2] if previous is not None else frozenset())
        self._remove(key)
        self._entries[key] = (value, now + ttl_seconds, listed)
        for index in listed:
            self._indexes.setdefault(index, set()).add(key)
        self._bytes += size
        while self._bytes > self._max_bytes:
            self._remove(next(iter(self._entries)))
        return True

    async def erase(self, index: str) -> int:
        removed, _ = self.erase_keys(index)
        return removed

    def erase_keys(self, index: str) -> tuple[int, set[str]]:
        """`erase`, and the keys the index listed."""
        self._bury(index)
        listed = self._indexes.get(index, set()).copy()
        return self.delete(listed), listed

    def delete(self, keys: Iterable[str]) -> int:
        """Removes these entries; returns how many were answers (chatmesh.cache.keys.KEY_PREFIX) not expired."""
        now = self._clock()
        removed = 0
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                removed += entry[1] > now and key.startswith(KEY_PREFIX)
                self._remove(key)
        return removed

    def clear(self) -> None:
        """Empties the tier of its entries; its tombstones stay (what was erased still is)."""
        self._entries.clear()
        self._indexes.clear()
        self._bytes = 0

    def _bury(self, index: str) -> None:
        """Leaves a tombstone of `index`, dropping the expired ones and, past MAX_TOMBSTONES, the oldest."""
        now = self._clock()
        self._tombstones.pop(index, None)
        self._tombstones[index] = now + self._tombstone_seconds
        while self._tombstones and (
            len(self._tombstones) > MAX_TOMBSTONES or next(iter(self._tombstones.values())) <= now
        ):
            self._tombstones.popitem(last=False)

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._bytes -= self.entry_size(key, entry[0])
        for index in entry[2]:
            listed = self._indexes[index]
            listed.discard(key)
            if not listed:
                del self._indexes[index]


# KEYS: the index, its tombstone. ARGV: the erasures channel, the answers' prefix, the tombstone's life in ms.
# Deletes what the index lists (answers, the semantic cache's questions, and a user's conversation indexes) and the
# index, leaves the tombstone, and announces it; returns {answers that were there, {members}}. The members are not
# declared as KEYS: the cache's Redis is one server, not a cluster.
_ERASE_LUA = """
local members = redis.call("SMEMBERS", KEYS[1])
local removed = 0
for _, member in ipairs(members) do
  local deleted = redis.call("DEL", member)
  if string.sub(member, 1, #ARGV[2]) == ARGV[2] then removed = removed + deleted end
end
redis.call("DEL", KEYS[1])
redis.call("SET", KEYS[2], "1", "PX", ARGV[3])
redis.call("PUBLISH", ARGV[1], KEYS[1] .. "\\n" .. table.concat(members, "\\n"))
return {removed, members}
"""

# KEYS: the entry's key, its n indexes (narrowest first), then their n tombstones. ARGV: the value, its TTL in ms.
# Writes nothing and returns 0 if any tombstone exists; else sets the value and lists its key in each index (a
# wider index also lists the narrower ones), each index living as long as its newest entry, and returns 1. One
# script, so that an entry is never in Redis without its indexes, nor stored after an erasure of one of them.
_PUT_LUA = """
local count = (#KEYS - 1) / 2
for position = 1, count do
  if redis.call("EXISTS", KEYS[1 + count + position]) == 1 then return 0 end
end
redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
for position = 1, count do
  redis.call("SADD", KEYS[1 + position], KEYS[1], unpack(KEYS, 2, position))
  redis.call("PEXPIRE", KEYS[1 + position], ARGV[2])
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Erasure:
    """An erasure announced by some cache process: the index and the keys it listed."""

    index: str
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Addition:
    """A semantic cache question stored by some cache process, under `key`."""

    key: str


class CacheWatcher(Protocol):
    """Told what changes in the tiers besides this process's own stores (see `AnswerCache.watch`)."""

    def erased(self, keys: Iterable[str]) -> None:
        """These keys were erased, by this process or another."""

    def added(self, key: str) -> None:
        """A process (maybe this one) announced a key it stored (`Addition`)."""

    def missed_announcements(self) -> None:
        """Other processes' announcements may have been missed: the subscription (re)started."""


class RedisTier(Tier):
    """Values in Redis under their keys, written with `SET key value PX ttl`. An index is a set of keys with
    the TTL of the newest entry it lists (each store sets it again); a wider index also lists the narrower
    ones stored with the same entry (a user's index its conversations'), which erasing it deletes too. An erased
    index's tombstone (chatmesh.cache.keys.tombstone) is a key that lives `tombstone_seconds`."""

    kind = TierKind.REDIS

    def __init__(self, client: Redis, *, tombstone_seconds: float = TOMBSTONE_SECONDS) -> None:
        """Takes ownership of `client` (closed by `close`), which must return bytes; see `from_url`."""
        if client.get_encoder().decode_responses:
            raise ValueError("RedisTier needs a client created with decode_responses=False")
        self._client = client
        self._tombstone_ms = math.ceil(tombstone_seconds * 1000)
        self._put = client.register_script(_PUT_LUA)
        self._erase = client.register_script(_ERASE_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_seconds: float,
        options: Mapping[str, Any] | None = None,
        tombstone_seconds: float = TOMBSTONE_SECONDS,
    ) -> RedisTier:
        """A tier with its own connection pool to `url`.

        A cache must fail fast: connects and replies are bounded by `timeout_seconds`, and a failed
        command is retried once at once (a pooled connection may have died with a Redis restart)
        instead of redis-py's default of ten retries with backoff.
        """
        return cls(
            Redis.from_url(
                url,
                socket_timeout=timeout_seconds,
                socket_connect_timeout=timeout_seconds,
                retry=Retry(NoBackoff(), 1),
                **(options or {}),
            ),
            tombstone_seconds=tombstone_seconds,
        )

    async def get(self, key: str) -> CachedValue | None:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            value, pttl = await pipe.execute()
        if value is None:
            return None
        # PTTL is -1 for a key without expiry, and -2 if it expired right after the GET.
        remaining = math.inf if pttl == -1 else max(pttl, 0) / 1000
        return CachedValue(value, remaining)

    async def put(self, key: str, value: bytes, ttl_seconds: float, indexes: Sequence[str] = ()) -> bool:
        milliseconds = math.ceil(ttl_seconds * 1000)
        if milliseconds <= 0:
            return False
        keys = [key, *indexes, *(tombstone(index) for index in indexes)]
        if not await self._put(keys=keys, args=[value, milliseconds]):
            raise IndexErased
        return True

    async def erase(self, index: str) -> int:
        removed, _ = await self.erase_keys(index)
        return removed

    async def erase_keys(self, index: str) -> tuple[int, list[str]]:
        """`erase`, and what the index listed (whether or not it was still there)."""
        removed, keys = await self._erase(
            keys=[index, tombstone(index)], args=[ERASURES_CHANNEL, KEY_PREFIX, self._tombstone_ms]
        )
        return int(removed), [key.decode() for key in keys]

    @property
    def client(self) -> Redis:
        """The connection pool, for the semantic cache's scope lists in the same Redis."""
        return self._client

    async def announcements(self) -> AsyncIterator[Erasure | Addition | None]:
        """Every erasure and addition announced from now on, by any process, until the subscription fails
        (raises). None each time the subscription starts, or restarts after a lost connection: announcements
        made before it may have been missed."""
        async with self._client.pubsub() as pubsub:
            await pubsub.subscribe(ERASURES_CHANNEL, ADDITIONS_CHANNEL)
            async for message in pubsub.listen():
                if message["type"] == "subscribe" and message["channel"] == ERASURES_CHANNEL.encode():
                    # Both channels are (re)subscribed by one command, each confirmed: one confirmation per start.
                    yield None
                elif message["type"] == "message" and message["channel"] == ADDITIONS_CHANNEL.encode():
                    yield Addition(message["data"].decode())
                elif message["type"] == "message":
                    index, *keys = message["data"].decode().split("\n")
                    yield Erasure(index, tuple(key for key in keys if key))

    async def close(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True, slots=True)
class CacheHit:
    value: bytes
    tier: TierKind


class EraseFailed(Exception):
    """Redis could not be reached: what it holds was not erased (this process's memory was)."""


class AnswerCache:
    """Memory first, then Redis; a Redis hit fills memory for what is left of its TTL. Stores write both.

    A Redis failure never fails a lookup or a store: it is logged (error type only, no key or content) and
    the lookup is a miss, or the store keeps the value in memory only. It does fail an erasure.

    With Redis, memory keeps an entry at most `memory_ttl_seconds` (see the module's doc on erasure).
    """

    def __init__(
        self,
        memory: MemoryTier,
        redis: RedisTier | None,
        ttl_seconds: float,
        *,
        memory_ttl_seconds: float = math.inf,
    ) -> None:
        self._memory = memory
        self._redis = redis
        self._ttl_seconds = ttl_seconds
        self._memory_ttl_seconds = ttl_seconds if redis is None else min(ttl_seconds, memory_ttl_seconds)
        self._follower: asyncio.Task[None] | None = None
        self._watchers: list[CacheWatcher] = []
        # Erasures this process has finished or heard of (and resubscriptions, after which it cannot know): a
        # lookup fills memory with what it read from Redis only if none came meanwhile, since an erasure that
        # deleted the entry right after the read would otherwise see it put back in memory after dropping it there.
        self._erasures = 0

    @classmethod
    def from_settings(cls, settings: CacheSettings) -> AnswerCache:
        """Redis when `CHATMESH_CACHE_REDIS_URL` (by default `CHATMESH_REDIS_URL`) is set and not empty,
        memory alone otherwise."""
        url = settings.cache_redis_url
        redis = (
            RedisTier.from_url(
                url,
                timeout_seconds=settings.cache_redis_timeout_seconds,
                options=redis_connection.connection_options(settings, url),
            )
            if url
            else None
        )
        return cls(
            MemoryTier(settings.cache_memory_max_bytes),
            redis,
            settings.cache_ttl_seconds,
            memory_ttl_seconds=settings.cache_memory_ttl_seconds,
        )

    async def lookup(self, key: str) -> CacheHit | None:
        found = await self._memory.get(key)
        if found is not None:
            return CacheHit(found.value, TierKind.MEMORY)
        if self._redis is None:
            return None
        erasures = self._erasures
        try:
            found = await self._redis.get(key)
        except Exception as error:
            _log_redis_failure("lookup", error)
            return None
        if found is None:
            return None
        if self._erasures == erasures:
            await self._memory.put(key, found.value, min(found.ttl_seconds, self._memory_ttl_seconds))
        return CacheHit(found.value, TierKind.REDIS)

    async def store(self, key: str, value: bytes, indexes: Sequence[str]) -> list[TierKind]:
        """The tiers that kept the value, listed in each of `indexes` (narrowest first; see chatmesh.cache.keys).
        Raises IndexErased when one of `indexes` was erased moments ago. Redis, whose tombstones every process
        shares, is written first, so that its refusal leaves memory untouched; memory refuses too when this process
        heard of the erasure before its own write (the erasure then deleted what Redis kept, if it reached Redis)."""
        in_redis = False
        if self._redis is not None:
            try:
                in_redis = await self._redis.put(key, value, self._ttl_seconds, indexes)
            except IndexErased:
                raise
            except Exception as error:
                _log_redis_failure("store", error)
        kept = []
        if await self._memory.put(key, value, self._memory_ttl_seconds, indexes):
            kept.append(TierKind.MEMORY)
        if in_redis:
            kept.append(TierKind.REDIS)
        return kept

    @property
    def redis(self) -> RedisTier | None:
        return self._redis

    @property
    def ttl_seconds(self) -> float:
        return self._ttl_seconds

    def watch(self, watcher: CacheWatcher) -> None:
        """Tells `watcher` of every erasure, and (with Redis) of what other processes announce."""
        self._watchers.append(watcher)

    async def erase(self, index: str) -> int:
        """Removes the entries listed in `index` from this process's memory and from Redis, which announces it
        to every other cache process; both leave a tombstone of `index` (see the module's doc). Returns the
        answers removed from Redis (from memory, without Redis). Raises EraseFailed when Redis cannot be reached."""
        removed, listed = self._memory.erase_keys(index)
        self._tell_erased(listed)
        if self._redis is None:
            return removed
        try:
            removed, keys = await self._redis.erase_keys(index)
        except Exception as error:
            _log_redis_failure("erase", error)
            raise EraseFailed from error
        # Filled from Redis, they are in memory without this process's own indexes; the announcement would
        # drop them too, but only once it arrives.
        self._erasures += 1
        self._memory.delete(keys)
        self._tell_erased(keys)
        return removed

    def follow_announcements(self) -> None:
        """With Redis, starts dropping from memory what other processes erase, and telling the watchers what
        they announce, until `close`."""
        if self._redis is not None and self._follower is None:
            self._follower = asyncio.create_task(self._follow(self._redis), name="cache_announcements")

    async def _follow(self, redis: RedisTier) -> None:
        while True:
            try:
                async for announcement in redis.announcements():
                    if announcement is None:
                        # (Re)subscribed: whatever was erased while this process was not listening is unknown.
                        self._erasures += 1
                        self._memory.clear()
                        for watcher in self._watchers:
                            watcher.missed_announcements()
                    elif isinstance(announcement, Addition):
                        for watcher in self._watchers:
                            watcher.added(announcement.key)
                    else:
                        self._erasures += 1
                        _, listed = self._memory.erase_keys(announcement.index)
                        self._memory.delete(announcement.keys)
                        self._tell_erased((*listed, *announcement.keys))
            except Exception as error:
                _log_redis_failure("subscribe", error)
            await asyncio.sleep(RESUBSCRIBE_SECONDS)

    def _tell_erased(self, keys: Iterable[str]) -> None:
        keys = tuple(keys)
        if keys:
            for watcher in self._watchers:
                watcher.erased(keys)

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if self._redis is not None:
            await self._redis.close()


def _log_redis_failure(operation: str, error: Exception) -> None:
    # The error's type only: its message could quote the command, and so the key or the value.
    log.warning("cache_redis_failed", extra={"operation": operation, "error": type(error).__name__})
    metrics.cache_redis_error(operation)
