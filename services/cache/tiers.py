"""Where answers are kept: an in-process LRU bounded by bytes, Redis, and the two-tier AnswerCache over them.

Values are opaque bytes here (the service stores a serialized `CachedReply`). Every entry has a TTL,
in both tiers.
"""

from __future__ import annotations

import abc
import enum
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from chatmesh.runtime import metrics, redis_connection
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import Settings

log = get_logger(__name__)


class TierKind(enum.Enum):
    MEMORY = "memory"
    REDIS = "redis"


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
    async def put(self, key: str, value: bytes, ttl_seconds: float) -> bool:
        """Keeps `value` under `key` for `ttl_seconds`, replacing what was there. False when not kept."""

    async def close(self) -> None:  # noqa: B027 - optional hook; the memory tier has nothing to release
        """Releases connections."""


class MemoryTier(Tier):
    """An LRU in this process, bounded by the bytes of its keys and values.

    Storing evicts least recently used entries until the total is within `max_bytes`; an entry larger
    than the bound on its own is not stored (and replaces nothing). Never awaits, so every method is
    atomic on the event loop. `clock` is injectable for tests.
    """

    kind = TierKind.MEMORY

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # key -> (value, expires at)
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
        value, expires_at = entry
        remaining = expires_at - self._clock()
        if remaining <= 0:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return CachedValue(value, remaining)

    async def put(self, key: str, value: bytes, ttl_seconds: float) -> bool:
        size = self.entry_size(key, value)
        if ttl_seconds <= 0 or size > self._max_bytes:
            return False
        self._remove(key)
        self._entries[key] = (value, self._clock() + ttl_seconds)
        self._bytes += size
        while self._bytes > self._max_bytes:
            self._remove(next(iter(self._entries)))
        return True

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= self.entry_size(key, entry[0])


class RedisTier(Tier):
    """Values in Redis under their keys, written with `SET key value PX ttl`."""

    kind = TierKind.REDIS

    def __init__(self, client: Redis) -> None:
        """Takes ownership of `client` (closed by `close`), which must return bytes; see `from_url`."""
        if client.get_encoder().decode_responses:
            raise ValueError("RedisTier needs a client created with decode_responses=False")
        self._client = client

    @classmethod
    def from_url(cls, url: str, *, timeout_seconds: float, options: Mapping[str, Any] | None = None) -> RedisTier:
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
            )
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

    async def put(self, key: str, value: bytes, ttl_seconds: float) -> bool:
        milliseconds = math.ceil(ttl_seconds * 1000)
        if milliseconds <= 0:
            return False
        await self._client.set(key, value, px=milliseconds)
        return True

    async def close(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True, slots=True)
class CacheHit:
    value: bytes
    tier: TierKind


class AnswerCache:
    """Memory first, then Redis; a Redis hit fills memory for what is left of its TTL. Stores write both.

    A Redis failure never fails a call: it is logged (error type only, no key or content) and the
    lookup is a miss, or the store keeps the value in memory only.
    """

    def __init__(self, memory: MemoryTier, redis: RedisTier | None, ttl_seconds: float) -> None:
        self._memory = memory
        self._redis = redis
        self._ttl_seconds = ttl_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> AnswerCache:
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
        return cls(MemoryTier(settings.cache_memory_max_bytes), redis, settings.cache_ttl_seconds)

    async def lookup(self, key: str) -> CacheHit | None:
        found = await self._memory.get(key)
        if found is not None:
            return CacheHit(found.value, TierKind.MEMORY)
        if self._redis is None:
            return None
        try:
            found = await self._redis.get(key)
        except Exception as error:
            _log_redis_failure("lookup", error)
            return None
        if found is None:
            return None
        await self._memory.put(key, found.value, min(found.ttl_seconds, self._ttl_seconds))
        return CacheHit(found.value, TierKind.REDIS)

    async def store(self, key: str, value: bytes) -> list[TierKind]:
        """The tiers that kept the value."""
        kept = []
        if await self._memory.put(key, value, self._ttl_seconds):
            kept.append(TierKind.MEMORY)
        if self._redis is not None:
            try:
                if await self._redis.put(key, value, self._ttl_seconds):
                    kept.append(TierKind.REDIS)
            except Exception as error:
                _log_redis_failure("store", error)
        return kept

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()


def _log_redis_failure(operation: str, error: Exception) -> None:
    # The error's type only: its message could quote the command, and so the key or the value.
    log.warning("cache_redis_failed", extra={"operation": operation, "error": type(error).__name__})
    metrics.cache_redis_error(operation)
