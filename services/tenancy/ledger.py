"""The usage ledger: every tenant's limits, held exactly across any number of gateway and dialogue replicas.

- The gateway admits each Chat/StreamChat call (`admit_request`): requests per minute, and a slot among
  the tenant's concurrent streams, released when the call ends (`release_requests`, or with a later
  admission of the same tenant: `admit_request(releasing=…)`).
- Dialogue, before it calls the model, reserves the call's worst case (`reserve`): its prompt plus
  max_tokens in the minute's tokens, priced at the model's price in the day's and month's spend. After the
  turn, however it ended, it settles (`settle`): the reservation is replaced by what the provider reported.
- Each of those is one atomic step (one Lua script in Redis): a check and its write never race.
- A replica that dies mid-turn cannot leak: stream slots and reservations carry an expiry, and expired
  ones are released by the next calls on that tenant.

Windows are UTC calendar minutes, days and months (`chatmesh.tenancy.limits.Windows`) by the calling
replica's clock: each window's count is exact; replicas should keep their clocks in sync (NTP), or a call
at a minute's edge counts in a neighbouring window. Spend is integer nano-USD.
"""

from __future__ import annotations

import abc
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from chatmesh.runtime.redis_errors import unavailable_on_redis_error
from chatmesh.tenancy.limits import NANO_USD_PER_USD, LimitName, Limits, Windows


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a call was refused: the limit, its value and what was used of it (USD for budgets), and the
    seconds until its window starts over (for concurrent streams, a short hint)."""

    limit: LimitName
    allowed: float
    used: float
    retry_after_seconds: float


class LimitExceeded(Exception):
    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.limit.value)
        self.rejection = rejection


class LedgerUnavailable(Exception):
    """The ledger's store could not be reached or did not answer; nothing is known to have been written."""


@dataclass(frozen=True, slots=True)
class QuotaUse:
    """One limit in its current window: None for `allowed` is no limit; `resets_at` is Unix seconds, None
    for concurrent streams."""

    limit: LimitName
    allowed: float | None
    used: float
    resets_at: float | None


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """A tenant's quotas (one per LimitName, in LimitName's order) and its month so far."""

    quotas: list[QuotaUse]
    month_requests: int
    month_input_tokens: int
    month_output_tokens: int
    month_cost_usd: float


# Concurrent streams have no window: a caller refused for them is told to retry after this many seconds.
CONCURRENT_STREAMS_RETRY_SECONDS = 1.0


class UsageLedger(abc.ABC):
    @abc.abstractmethod
    async def admit_request(
        self,
        tenant: str,
        limits: Limits,
        request_id: str,
        *,
        now: float,
        lease_seconds: float,
        releasing: Sequence[str] = (),
    ) -> None:
        """Admits one call, atomically. First frees the slots of `releasing` (calls of the tenant that ended,
        whose release the caller deferred to this admission). Then, if the minute's requests are at
        `limits.requests_per_minute`, or the tenant's streams in progress at `limits.concurrent_streams`,
        raises LimitExceeded and counts nothing. Otherwise counts the call in its minute and its month and,
        when the tenant has a concurrent-streams limit, holds a slot for `request_id` until it is released or
        `lease_seconds` have passed."""

    @abc.abstractmethod
    async def release_requests(self, tenant: str, request_ids: Sequence[str]) -> None:
        """Frees the calls' stream slots, those that hold one. Idempotent."""

    @abc.abstractmethod
    async def reserve(
        self,
        tenant: str,
        limits: Limits,
        request_id: str,
        *,
        tokens: int,
        cost_nano_usd: int,
        now: float,
        ttl_seconds: float,
    ) -> None:
        """Reserves a model call's worst case, atomically: `tokens` in the current minute, `cost_nano_usd`
        in the current day and month. If any of them would pass its limit, raises LimitExceeded naming the
        first such limit (tokens_per_minute, then daily_budget_usd, then monthly_budget_usd) and reserves
        nothing. A reservation not settled within `ttl_seconds` expires and its amounts are released. A
        second reservation under the same request id replaces the first."""

    @abc.abstractmethod
    async def settle(
        self,
        tenant: str,
        request_id: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_nano_usd: int,
        now: float,
    ) -> bool:
        """Records what a turn really used, atomically: replaces `request_id`'s reservation, if it still
        holds one, by these amounts in the windows the reservation was made in (else counts them in the
        current ones), and adds them to the month's usage. Idempotent per request id: a repeated call
        changes nothing and returns False."""

    @abc.abstractmethod
    async def usage(self, tenant: str, limits: Limits, *, now: float) -> TenantUsage:
        """The tenant's quotas in the windows that contain `now`, and its month so far."""

    async def close(self) -> None:  # noqa: B027 - optional hook; the memory ledger has nothing to release
        """Releases connections."""


# --- In memory -------------------------------------------------------------------------------------------

# Windows are kept this long after they end: a late settlement or an expiring reservation may still touch them.
_WINDOW_KEEP_SECONDS = 3600.0
# A month's usage is kept this long after the month ends, as in Redis (`month:<yyyymm>`, 400 days).
_MONTH_USAGE_KEEP_SECONDS = 400 * 86400.0
# Settled request ids are remembered this long for idempotent settlement (as `settled:<id>` in Redis).
_SETTLED_KEEP_SECONDS = 86400.0
_PRUNE_EVERY_SECONDS = 60.0


@dataclass(slots=True)
class _Counter:
    ends_at: float
    value: int = 0


@dataclass(slots=True)
class _MonthUsage:
    ends_at: float
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nano_usd: int = 0


@dataclass(slots=True)
class _Reservation:
    tokens: int
    cost_nano_usd: int
    windows: Windows
    expires_at: float


@dataclass(slots=True)
class _TenantState:
    requests: dict[str, _Counter] = field(default_factory=dict)  # by minute id
    tokens: dict[str, _Counter] = field(default_factory=dict)  # by minute id
    day_spend: dict[str, _Counter] = field(default_factory=dict)  # nano-USD by day id
    month_spend: dict[str, _Counter] = field(default_factory=dict)  # nano-USD by month id
    months: dict[str, _MonthUsage] = field(default_factory=dict)
    streams: dict[str, float] = field(default_factory=dict)  # request id -> lease expiry
    reservations: dict[str, _Reservation] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (
            self.requests
            or self.tokens
            or self.day_spend
            or self.month_spend
            or self.months
            or self.streams
            or self.reservations
        )


def _value(counters: dict[str, _Counter], window: str) -> int:
    counter = counters.get(window)
    return 0 if counter is None else counter.value


def _add(counters: dict[str, _Counter], window: str, ends_at: float, amount: int) -> None:
    counters.setdefault(window, _Counter(ends_at)).value += amount


def _subtract(counters: dict[str, _Counter], window: str, amount: int) -> None:
    """Only from a window still kept, and never below 0 (as the Redis ledger does)."""
    counter = counters.get(window)
    if counter is not None:
        counter.value = max(0, counter.value - amount)


class MemoryUsageLedger(UsageLedger):
    """The ledger in dicts, for one process. Never awaits, so every method is atomic on the event loop.

    Bounded: at most once per minute of `now`, windows that ended over an hour ago, expired stream slots
    and expired reservations (their amounts released) are dropped. Settled request ids are remembered for
    a day, and at most `max_settled_ids` of them.
    """

    def __init__(self, *, max_settled_ids: int = 100_000) -> None:
        self._tenants: dict[str, _TenantState] = {}
        # (tenant, request id) -> when it may be forgotten; in insertion order, so the oldest come first.
        self._settled: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._max_settled_ids = max_settled_ids
        self._next_prune_at = -math.inf

    def _state(self, tenant: str, now: float) -> _TenantState:
        if now >= self._next_prune_at:
            self._next_prune_at = now + _PRUNE_EVERY_SECONDS
            self._prune(now)
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _TenantState()
        return state

    def _prune(self, now: float) -> None:
        window_horizon = now - _WINDOW_KEEP_SECONDS
        for tenant, state in list(self._tenants.items()):
            _drop_expired_streams(state, now)
            _release_expired_reservations(state, now)
            for counters in (state.requests, state.tokens, state.day_spend, state.month_spend):
                for window in [window for window, counter in counters.items() if counter.ends_at < window_horizon]:
                    del counters[window]
            for month in [
                month for month, usage in state.months.items() if usage.ends_at < now - _MONTH_USAGE_KEEP_SECONDS
            ]:
                del state.months[month]
            if state.is_empty():
                del self._tenants[tenant]
        self._forget_settled(now)

    def _forget_settled(self, now: float) -> None:
        while self._settled and (
            len(self._settled) > self._max_settled_ids or next(iter(self._settled.values())) <= now
        ):
            self._settled.popitem(last=False)

    async def admit_request(
        self,
        tenant: str,
        limits: Limits,
        request_id: str,
        *,
        now: float,
        lease_seconds: float,
        releasing: Sequence[str] = (),
    ) -> None:
        state = self._state(tenant, now)
        for released in releasing:
            state.streams.pop(released, None)
        windows = Windows.at(now)
        requests = _value(state.requests, windows.minute)
        if limits.requests_per_minute is not None and requests >= limits.requests_per_minute:
            raise LimitExceeded(_rejection(LimitName.REQUESTS_PER_MINUTE, limits, windows, now, requests))
        if limits.concurrent_streams is not None:
            _drop_expired_streams(state, now)
            if len(state.streams) >= limits.concurrent_streams:
                raise LimitExceeded(_rejection(LimitName.CONCURRENT_STREAMS, limits, windows, now, len(state.streams)))
        _add(state.requests, windows.minute, windows.minute_ends_at, 1)
        _month_usage(state, windows).requests += 1
        if limits.concurrent_streams is not None:
            state.streams[request_id] = now + lease_seconds

    async def release_requests(self, tenant: str, request_ids: Sequence[str]) -> None:
        state = self._tenants.get(tenant)
        if state is not None:
            for request_id in request_ids:
                state.streams.pop(request_id, None)

    async def reserve(
        self,
        tenant: str,
        limits: Limits,
        request_id: str,
        *,
        tokens: int,
        cost_nano_usd: int,
        now: float,
        ttl_seconds: float,
    ) -> None:
        _check_amounts(tokens=tokens, cost_nano_usd=cost_nano_usd)
        state = self._state(tenant, now)
        _release_expired_reservations(state, now)
        windows = Windows.at(now)
        used = (
            _value(state.tokens, windows.minute),
            _value(state.day_spend, windows.day),
            _value(state.month_spend, windows.month),
        )
        amounts = (tokens, cost_nano_usd, cost_nano_usd)
        for limit, allowed, used_of_it, amount in zip(
            _RESERVATION_LIMITS, _reservation_limits(limits), used, amounts, strict=True
        ):
            if allowed is not None and used_of_it + amount > allowed:
                raise LimitExceeded(_rejection(limit, limits, windows, now, used_of_it))
        previous = state.reservations.pop(request_id, None)
        if previous is not None:  # a repeated reservation replaces the earlier one
            _release(state, previous)
        _add(state.tokens, windows.minute, windows.minute_ends_at, tokens)
        _add(state.day_spend, windows.day, windows.day_ends_at, cost_nano_usd)
        _add(state.month_spend, windows.month, windows.month_ends_at, cost_nano_usd)
        state.reservations[request_id] = _Reservation(tokens, cost_nano_usd, windows, now + ttl_seconds)

    async def settle(
        self,
        tenant: str,
        request_id: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_nano_usd: int,
        now: float,
    ) -> bool:
        _check_amounts(tokens=input_tokens, cost_nano_usd=cost_nano_usd, output_tokens=output_tokens)
        state = self._state(tenant, now)
        _release_expired_reservations(state, now)
        self._forget_settled(now)
        if (tenant, request_id) in self._settled:
            return False
        reservation = state.reservations.pop(request_id, None)
        if reservation is None:
            windows = Windows.at(now)
        else:
            _release(state, reservation)
            windows = reservation.windows
        _add(state.tokens, windows.minute, windows.minute_ends_at, input_tokens + output_tokens)
        _add(state.day_spend, windows.day, windows.day_ends_at, cost_nano_usd)
        _add(state.month_spend, windows.month, windows.month_ends_at, cost_nano_usd)
        month = _month_usage(state, windows)
        month.input_tokens += input_tokens
        month.output_tokens += output_tokens
        month.cost_nano_usd += cost_nano_usd
        self._settled[(tenant, request_id)] = now + _SETTLED_KEEP_SECONDS
        self._forget_settled(now)
        return True

    async def usage(self, tenant: str, limits: Limits, *, now: float) -> TenantUsage:
        state = self._state(tenant, now)
        _release_expired_reservations(state, now)
        windows = Windows.at(now)
        month = state.months.get(windows.month) or _MonthUsage(windows.month_ends_at)
        return _tenant_usage(
            limits,
            windows,
            requests=_value(state.requests, windows.minute),
            tokens=_value(state.tokens, windows.minute),
            streams=sum(1 for expires_at in state.streams.values() if expires_at > now),
            day_spend_nano_usd=_value(state.day_spend, windows.day),
            month_spend_nano_usd=_value(state.month_spend, windows.month),
            month_requests=month.requests,
            month_input_tokens=month.input_tokens,
            month_output_tokens=month.output_tokens,
            month_cost_nano_usd=month.cost_nano_usd,
        )


def _month_usage(state: _TenantState, windows: Windows) -> _MonthUsage:
    usage = state.months.get(windows.month)
    if usage is None:
        usage = state.months[windows.month] = _MonthUsage(windows.month_ends_at)
    return usage


def _drop_expired_streams(state: _TenantState, now: float) -> None:
    for request_id in [request_id for request_id, expires_at in state.streams.items() if expires_at <= now]:
        del state.streams[request_id]


def _release(state: _TenantState, reservation: _Reservation) -> None:
    _subtract(state.tokens, reservation.windows.minute, reservation.tokens)
    _subtract(state.day_spend, reservation.windows.day, reservation.cost_nano_usd)
    _subtract(state.month_spend, reservation.windows.month, reservation.cost_nano_usd)


def _release_expired_reservations(state: _TenantState, now: float) -> None:
    expired = [request_id for request_id, reservation in state.reservations.items() if reservation.expires_at <= now]
    for request_id in expired:
        _release(state, state.reservations.pop(request_id))


# --- Shared by both ledgers --------------------------------------------------------------------------------


def _check_amounts(*, tokens: int, cost_nano_usd: int, output_tokens: int = 0) -> None:
    if tokens < 0 or output_tokens < 0 or cost_nano_usd < 0:
        raise ValueError("token counts and costs must not be negative")


def _rejection(limit: LimitName, limits: Limits, windows: Windows, now: float, used: int) -> Rejection:
    """The refusal of `limit`, of which `used` (nano-USD for budgets) was used."""
    if limit is LimitName.DAILY_BUDGET_USD or limit is LimitName.MONTHLY_BUDGET_USD:
        daily = limit is LimitName.DAILY_BUDGET_USD
        allowed = limits.daily_budget_nano_usd if daily else limits.monthly_budget_nano_usd
        return Rejection(
            limit,
            (allowed or 0) / NANO_USD_PER_USD,
            used / NANO_USD_PER_USD,
            (windows.day_ends_at if daily else windows.month_ends_at) - now,
        )
    if limit is LimitName.CONCURRENT_STREAMS:
        return Rejection(limit, limits.concurrent_streams or 0, used, CONCURRENT_STREAMS_RETRY_SECONDS)
    allowed_count = limits.requests_per_minute if limit is LimitName.REQUESTS_PER_MINUTE else limits.tokens_per_minute
    return Rejection(limit, allowed_count or 0, used, windows.minute_ends_at - now)


# What a reservation is checked against, in order: the first it would pass is the one named.
_RESERVATION_LIMITS = (LimitName.TOKENS_PER_MINUTE, LimitName.DAILY_BUDGET_USD, LimitName.MONTHLY_BUDGET_USD)


def _reservation_limits(limits: Limits) -> tuple[int | None, int | None, int | None]:
    """The limits in `_RESERVATION_LIMITS`' order, budgets in nano-USD."""
    return limits.tokens_per_minute, limits.daily_budget_nano_usd, limits.monthly_budget_nano_usd


def _tenant_usage(
    limits: Limits,
    windows: Windows,
    *,
    requests: int,
    tokens: int,
    streams: int,
    day_spend_nano_usd: int,
    month_spend_nano_usd: int,
    month_requests: int,
    month_input_tokens: int,
    month_output_tokens: int,
    month_cost_nano_usd: int,
) -> TenantUsage:
    return TenantUsage(
        quotas=[
            QuotaUse(LimitName.REQUESTS_PER_MINUTE, limits.requests_per_minute, requests, windows.minute_ends_at),
            QuotaUse(LimitName.TOKENS_PER_MINUTE, limits.tokens_per_minute, tokens, windows.minute_ends_at),
            QuotaUse(LimitName.CONCURRENT_STREAMS, limits.concurrent_streams, streams, None),
            QuotaUse(
                LimitName.DAILY_BUDGET_USD,
                limits.daily_budget_usd,
                day_spend_nano_usd / NANO_USD_PER_USD,
                windows.day_ends_at,
            ),
            QuotaUse(
                LimitName.MONTHLY_BUDGET_USD,
                limits.monthly_budget_usd,
                month_spend_nano_usd / NANO_USD_PER_USD,
                windows.month_ends_at,
            ),
        ],
        month_requests=month_requests,
        month_input_tokens=month_input_tokens,
        month_output_tokens=month_output_tokens,
        month_cost_usd=month_cost_nano_usd / NANO_USD_PER_USD,
    )


# --- In Redis ----------------------------------------------------------------------------------------------

# Every key of a tenant starts with `chatmesh:usage:{<tenant>}:`; the hash tag puts them all in one Redis
# Cluster slot, so that one script may touch any of them. Keys of the windows a reservation was made in are
# built inside the scripts from the prefix (ARGV[1]); the current windows' keys are passed as KEYS.
# Numbers are passed as decimal strings and handed to Redis as such; Lua compares them as doubles, exact up
# to 2^53 (nano-USD: 9 million USD).

# ARGV[1] prefix, ARGV[2] now in ms. TTLs in seconds: tpm 3600, spend:day 3 days, spend:month 70 days.
_COMMON_LUA = """
local prefix = ARGV[1]
local now_ms = ARGV[2]

local function add(key, amount, ttl)
  redis.call("INCRBY", key, amount)
  redis.call("EXPIRE", key, ttl)
end

-- Only from a window whose key still exists (else DECRBY would create it without a TTL), never below 0.
local function subtract(key, amount)
  if redis.call("EXISTS", key) == 1 and redis.call("DECRBY", key, amount) < 0 then
    redis.call("SET", key, "0", "KEEPTTL")
  end
end

-- A reservation is "tokens:cost_nano:minute:day:month".
local function parse(record)
  return string.match(record, "^(%d+):(%d+):(%d+):(%d+):(%d+)$")
end

local function release(request_id, record)
  local tokens, cost, minute, day, month = parse(record)
  subtract(prefix .. "tpm:" .. minute, tokens)
  subtract(prefix .. "spend:day:" .. day, cost)
  subtract(prefix .. "spend:month:" .. month, cost)
  redis.call("HDEL", prefix .. "reservations", request_id)
  redis.call("ZREM", prefix .. "reservation_expiry", request_id)
end

-- Releases expired reservations, at most 100 per call so that one call's work stays bounded.
local function sweep()
  local expired = redis.call("ZRANGEBYSCORE", prefix .. "reservation_expiry", "-inf", now_ms, "LIMIT", 0, 100)
  for _, request_id in ipairs(expired) do
    local record = redis.call("HGET", prefix .. "reservations", request_id)
    if record then
      release(request_id, record)
    else
      redis.call("ZREM", prefix .. "reservation_expiry", request_id)
    end
  end
end
"""

# KEYS: rpm:<minute>, streams, month:<month>. ARGV: rpm limit ("-1": none), streams limit ("-1": none),
# now ms, request id, lease ms, lease expiry ms, then the request ids whose slots to free first.
# Returns {0} when admitted, else {1 (rpm) or 2 (streams), used}.
_ADMIT_LUA = """
if #ARGV > 6 then redis.call("ZREM", KEYS[2], unpack(ARGV, 7)) end
local rpm_limit = tonumber(ARGV[1])
local streams_limit = tonumber(ARGV[2])
if rpm_limit >= 0 then
  local used = tonumber(redis.call("GET", KEYS[1]) or "0")
  if used >= rpm_limit then return {1, used} end
end
if streams_limit >= 0 then
  redis.call("ZREMRANGEBYSCORE", KEYS[2], "-inf", ARGV[3])
  local used = redis.call("ZCARD", KEYS[2])
  if used >= streams_limit then return {2, used} end
end
redis.call("INCR", KEYS[1])
redis.call("EXPIRE", KEYS[1], 120)
redis.call("HINCRBY", KEYS[3], "requests", 1)
redis.call("EXPIRE", KEYS[3], 34560000)
if streams_limit >= 0 then
  redis.call("ZADD", KEYS[2], ARGV[6], ARGV[4])
  -- The set lives as long as its longest lease (PTTL is -1 when it has no TTL yet).
  if redis.call("PTTL", KEYS[2]) < tonumber(ARGV[5]) then redis.call("PEXPIRE", KEYS[2], ARGV[5]) end
end
return {0}
"""

# KEYS: tpm:<minute>, spend:day:<day>, spend:month:<month>, reservations, reservation_expiry.
# ARGV: prefix, now ms, request id, tokens, cost, tpm limit, daily limit, monthly limit (nano-USD; "-1":
# none), reservation record, expiry ms. Returns {0} when reserved, else {1, 2 or 3 (the limit), used}.
_RESERVE_LUA = (
    _COMMON_LUA
    + """
sweep()
local amounts = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[5])}
for i = 1, 3 do
  local limit = tonumber(ARGV[5 + i])
  if limit >= 0 then
    local used = tonumber(redis.call("GET", KEYS[i]) or "0")
    if used + amounts[i] > limit then return {i, used} end
  end
end
-- A repeated reservation replaces the earlier one.
local previous = redis.call("HGET", KEYS[4], ARGV[3])
if previous then release(ARGV[3], previous) end
add(KEYS[1], ARGV[4], 3600)
add(KEYS[2], ARGV[5], 259200)
add(KEYS[3], ARGV[5], 6048000)
redis.call("HSET", KEYS[4], ARGV[3], ARGV[9])
redis.call("ZADD", KEYS[5], ARGV[10], ARGV[3])
-- Kept as long as the longest window a reservation may be released from.
redis.call("EXPIRE", KEYS[4], 6048000)
redis.call("EXPIRE", KEYS[5], 6048000)
return {0}
"""
)

# KEYS: settled:<request id>, then the current windows: tpm:<minute>, spend:day:<day>, spend:month:<month>,
# month:<month>; then reservations. ARGV: prefix, now ms, request id, input tokens, output tokens, their
# sum, cost. Returns 1 when settled, 0 when the request id was already settled.
_SETTLE_LUA = (
    _COMMON_LUA
    + """
sweep()
if redis.call("EXISTS", KEYS[1]) == 1 then return 0 end
local tpm, day_spend, month_spend, month = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local record = redis.call("HGET", KEYS[6], ARGV[3])
if record then
  local _, _, minute, day, month_id = parse(record)
  release(ARGV[3], record)
  tpm = prefix .. "tpm:" .. minute
  day_spend = prefix .. "spend:day:" .. day
  month_spend = prefix .. "spend:month:" .. month_id
  month = prefix .. "month:" .. month_id
end
add(tpm, ARGV[6], 3600)
add(day_spend, ARGV[7], 259200)
add(month_spend, ARGV[7], 6048000)
redis.call("HINCRBY", month, "input_tokens", ARGV[4])
redis.call("HINCRBY", month, "output_tokens", ARGV[5])
redis.call("HINCRBY", month, "cost_nano_usd", ARGV[7])
redis.call("EXPIRE", month, 34560000)
redis.call("SET", KEYS[1], "1", "EX", 86400)
return 1
"""
)

# KEYS: rpm:<minute>, tpm:<minute>, spend:day:<day>, spend:month:<month>, streams, month:<month>.
# ARGV: prefix, now ms. Returns {rpm, tpm, day spend, month spend, streams, month's requests, input tokens,
# output tokens, cost}.
_USAGE_LUA = (
    _COMMON_LUA
    + """
sweep()
local function get(key) return tonumber(redis.call("GET", key) or "0") end
local month = redis.call("HMGET", KEYS[6], "requests", "input_tokens", "output_tokens", "cost_nano_usd")
return {
  get(KEYS[1]), get(KEYS[2]), get(KEYS[3]), get(KEYS[4]),
  redis.call("ZCOUNT", KEYS[5], "(" .. now_ms, "+inf"),
  tonumber(month[1] or "0"), tonumber(month[2] or "0"), tonumber(month[3] or "0"), tonumber(month[4] or "0"),
}
"""
)

_ADMIT_LIMITS = (LimitName.REQUESTS_PER_MINUTE, LimitName.CONCURRENT_STREAMS)


_unavailable_on_redis_error = unavailable_on_redis_error(LedgerUnavailable)


def _ms(unix_seconds: float) -> str:
    return str(math.floor(unix_seconds * 1000))


def _limit_arg(limit: int | None) -> str:
    return "-1" if limit is None else str(limit)


class RedisUsageLedger(UsageLedger):
    """The ledger in Redis, shared by every replica: each method is one Lua script (release one ZREM), so a
    check and its write never race. The windows and `now` are the caller's; Redis' clock only runs the TTLs."""

    def __init__(self, client: Redis) -> None:
        """Takes ownership of `client` (closed by `close`), which must decode responses; see `from_url`."""
        if not client.get_encoder().decode_responses:
            raise ValueError("RedisUsageLedger needs a client created with decode_responses=True")
        self._client = client
        self._admit = client.register_script(_ADMIT_LUA)
        self._reserve = client.register_script(_RESERVE_LUA)
        self._settle = client.register_script(_SETTLE_LUA)
        self._usage = client.register_script(_USAGE_LUA)

    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any] | None = None) -> RedisUsageLedger:
        """A ledger with its own connection pool to `url`, e.g. `redis://localhost:6379/0`."""
        return cls(
            Redis.from_url(url, decode_responses=True, socket_connect_timeout=2, socket_timeout=2, **(options or {}))
        )

    @staticmethod
    def _prefix(tenant: str) -> str:
        return f"chatmesh:usage:{{{tenant}}}:"

    @_unavailable_on_redis_error
    async def admit_request(
        self,
        tenant: str,
        limits: Limits,
        request_id: str,
        *,
        now: float,
        lease_seconds: float,
        releasing: Sequence[str] = (),
    ) -> None:
        prefix = self._prefix(tenant)
        windows = Windows.at(now)
        lease_ms = max(1, math.ceil(lease_seconds * 1000))
        result = await self._admit(
            keys=(f"{prefix}rpm:{windows.minute}", f"{prefix}streams", f"{prefix}month:{windows.month}"),
            args=(
                _limit_arg(limits.requests_per_minute),
                _limit_arg(limits.concurrent_streams),
                _ms(now),
                request_id,
                str(lease_ms),
                _ms(now + lease_seconds),
                *releasing,
            ),
        )
        if result[0] != 0:
            raise LimitExceeded(_rejection(_ADMIT_LIMITS[int(result[0]) - 1], limits, windows, now, int(result[1])))

    @_unavailable_on_redis_error
    async def release_requests(self, tenant: str, request_ids: Sequence[str]) -> None:
        if not request_ids:
            return
        # One command, atomic on its own.
        await self._client.zrem(f"{self._prefix(tenant)}streams", *request_ids)

    @_unavailable_on_redis_error
    async def reserve(
        self,
        tenant: str,
        limits: Limits,
        request_id: str,
        *,
        tokens: int,
        cost_nano_usd: int,
        now: float,
        ttl_seconds: float,
    ) -> None:
        _check_amounts(tokens=tokens, cost_nano_usd=cost_nano_usd)
        prefix = self._prefix(tenant)
        windows = Windows.at(now)
        tpm_limit, daily_limit, monthly_limit = _reservation_limits(limits)
        result = await self._reserve(
            keys=(
                f"{prefix}tpm:{windows.minute}",
                f"{prefix}spend:day:{windows.day}",
                f"{prefix}spend:month:{windows.month}",
                f"{prefix}reservations",
                f"{prefix}reservation_expiry",
            ),
            args=(
                prefix,
                _ms(now),
                request_id,
                str(tokens),
                str(cost_nano_usd),
                _limit_arg(tpm_limit),
                _limit_arg(daily_limit),
                _limit_arg(monthly_limit),
                f"{tokens}:{cost_nano_usd}:{windows.minute}:{windows.day}:{windows.month}",
                _ms(now + ttl_seconds),
            ),
        )
        if result[0] != 0:
            raise LimitExceeded(
                _rejection(_RESERVATION_LIMITS[int(result[0]) - 1], limits, windows, now, int(result[1]))
            )

    @_unavailable_on_redis_error
    async def settle(
        self,
        tenant: str,
        request_id: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cost_nano_usd: int,
        now: float,
    ) -> bool:
        _check_amounts(tokens=input_tokens, cost_nano_usd=cost_nano_usd, output_tokens=output_tokens)
        prefix = self._prefix(tenant)
        windows = Windows.at(now)
        settled = await self._settle(
            keys=(
                f"{prefix}settled:{request_id}",
                f"{prefix}tpm:{windows.minute}",
                f"{prefix}spend:day:{windows.day}",
                f"{prefix}spend:month:{windows.month}",
                f"{prefix}month:{windows.month}",
                f"{prefix}reservations",
            ),
            args=(
                prefix,
                _ms(now),
                request_id,
                str(input_tokens),
                str(output_tokens),
                str(input_tokens + output_tokens),
                str(cost_nano_usd),
            ),
        )
        return bool(settled)

    @_unavailable_on_redis_error
    async def usage(self, tenant: str, limits: Limits, *, now: float) -> TenantUsage:
        prefix = self._prefix(tenant)
        windows = Windows.at(now)
        values = await self._usage(
            keys=(
                f"{prefix}rpm:{windows.minute}",
                f"{prefix}tpm:{windows.minute}",
                f"{prefix}spend:day:{windows.day}",
                f"{prefix}spend:month:{windows.month}",
                f"{prefix}streams",
                f"{prefix}month:{windows.month}",
            ),
            args=(prefix, _ms(now)),
        )
        requests, tokens, day_spend, month_spend, streams, month_requests, input_tokens, output_tokens, cost = (
            int(value) for value in values
        )
        return _tenant_usage(
            limits,
            windows,
            requests=requests,
            tokens=tokens,
            streams=streams,
            day_spend_nano_usd=day_spend,
            month_spend_nano_usd=month_spend,
            month_requests=month_requests,
            month_input_tokens=input_tokens,
            month_output_tokens=output_tokens,
            month_cost_nano_usd=cost,
        )

    async def close(self) -> None:
        await self._client.aclose()


def create_usage_ledger(redis_url: str | None, options: Mapping[str, Any] | None = None) -> UsageLedger:
    """Redis when a URL is given (CHATMESH_REDIS_URL), the in-memory ledger otherwise (also for "")."""
    if redis_url:
        return RedisUsageLedger.from_url(redis_url, options)
    return MemoryUsageLedger()
