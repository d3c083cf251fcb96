"""Where review cases live: the ReviewStore interface, and its Redis and in-memory implementations.

A case is a screened text that the review policy sent to a person: whose turn it was, the stage, the categories
and screen that matched, the action taken, and an excerpt (redacted and cut by the caller). It is opened once per
(tenant, request id, stage): opening it again gives the same id and no second case. Ids are 16 hex digits of a
hash of those three, so they are URL-safe and not guessable without the request id.

Lifecycle: OPEN -> CLAIMED (a reviewer holds a lease) -> DECIDED (approve or block), or -> ESCALATED (open again,
at the back of the queue, for a senior reviewer) -> CLAIMED -> ... A claim whose lease lapsed counts as not
claimed: the case reads as OPEN (or ESCALATED) again and any reviewer may claim it; only the holder of a live
lease may decide. A decision may add a keyword term (`terms`), which safety processes poll and enforce.

Every case is kept `retention_seconds` (at most the conversations' retention) from when it was opened, and
`erase` removes a user's or a conversation's cases at once.

Redis (one Redis, not Redis Cluster: the scripts touch a tenant's keys and the shared queue together):

    chatmesh:review:{T}:case:<id>     hash, the case record: the source of truth. PEXPIRE retention, set when
                                      opened and never extended. Holds the excerpt and the reviewer's note.
    chatmesh:review:id:<id>           string, the tenant of case <id> (ids alone name cases); same expiry.
    chatmesh:review:{T}:cases         sorted set of "T/<id>" by opening time (microseconds, unique): listing
    chatmesh:review:cases             the same for every tenant
    chatmesh:review:open              the same, only cases not decided: open_summary()
    chatmesh:review:{T}:user:<h>      set of the ids of a user's cases (h: SHA-1 of the user id): erasure
    chatmesh:review:{T}:conv:<h>      set of the ids of a conversation's cases (h: SHA-1 of its id): erasure
    chatmesh:review:queue             stream, consumer group `reviewers`: one entry {case: "T/<id>"} per case
                                      waiting for a reviewer, the consumer being the reviewer who claimed it.
    chatmesh:review:terms             hash "category<TAB>term" -> when added (ms): terms decisions added
    chatmesh:review:terms:version     counter, incremented on every change of the terms

The indexes hold ids only; each gets PEXPIRE retention again whenever an id is added, so none outlives the
newest record it lists, and members whose record expired are pruned (by opening time, or when found missing).
The stream holds case references only, never text, and has no TTL: it is a work queue, kept short by `sweep`.
The terms are operator data, like the chart's keyword lists, not a user's: they have no TTL and erasure does
not touch them.

The record wins over the stream, which only hands out work. `open_case` writes the record, its indexes and its
queue entry in one script, so a case is never recorded without being queued, nor queued twice. `claim` (one
script) first looks at the entries already handed out (the group's pending entries, oldest first) for a case
whose lease lapsed and moves that entry to the new holder (XCLAIM); then reads new entries (XREADGROUP,
consumer = reviewer). An entry whose case is decided, erased or expired, or which is not the case's current
entry, is acknowledged and deleted on the way; one whose case another reviewer holds by id stays pending. The
claim itself is set on the record (reviewer, lease end) after checking its state, in the same script. `decide`
acknowledges and deletes the entry; escalating replaces it with a new one at the back of the queue. Time in the
scripts is Redis's own (TIME), one clock for every replica.

Redis 7 streams lose pending entries that are trimmed or whose consumer is deleted, so `sweep` (one script, safe
to run from several gateways at once) acknowledges and deletes pending entries whose case is gone or decided,
trims with XTRIM MINID only below the oldest pending entry (or, with none pending, up to the last one handed
out), and deletes only consumers that have no pending entry and have been idle for a lease. Pending entries of a
lapsed claim are left where they are, not reclaimed with XAUTOCLAIM: that would reset the idle time of live
claims too, and `claim` finds lapsed ones by their record, which is what decides.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis

from chatmesh.runtime import redis_connection
from chatmesh.runtime.redis_errors import unavailable_on_redis_error
from chatmesh.runtime.settings import ServiceSettings
from chatmesh.v1 import chat_pb2, review_pb2, safety_pb2

OPEN = review_pb2.CASE_STATE_OPEN
CLAIMED = review_pb2.CASE_STATE_CLAIMED
DECIDED = review_pb2.CASE_STATE_DECIDED
ESCALATED = review_pb2.CASE_STATE_ESCALATED
# Without Redis, the most cases one process keeps (the oldest go first).
MEMORY_MAX_CASES = 10_000
# The most records one `list` call reads (when filtering by state, a page may come back short, with a token).
LIST_MAX_SCANNED = 2_000
# The most queue entries one `claim` or `sweep` looks at.
QUEUE_MAX_SCANNED = 1_000


class CaseNotFound(Exception):
    """No such case (never opened, expired or erased), or no case to claim."""


class CaseConflict(Exception):
    """The case is not in a state that allows this: held by another reviewer, not held, lease lapsed, decided."""


class ReviewStoreUnavailable(Exception):
    """The store could not be reached or did not answer."""


class InvalidPageToken(ValueError):
    """A page token that no `list` call returned."""


@dataclass(frozen=True, slots=True)
class NewCase:
    turn: safety_pb2.TurnRef  # tenant, user_id, conversation_id, request_id
    stage: chat_pb2.ContentFilter.Stage
    categories: tuple[str, ...]
    source: safety_pb2.ScreenSource
    action: review_pb2.ReviewAction
    excerpt: str  # already redacted and cut by the caller


def case_id(tenant: str, request_id: str, stage: int) -> str:
    """The id of the case of (tenant, request id, stage): the same for every call."""
    return hashlib.sha256(f"{tenant}\0{request_id}\0{stage}".encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class _Record:
    """A case as stored. `queued_state` is what the case is while no live lease holds it (OPEN or ESCALATED)."""

    id: str
    tenant: str
    user_id: str
    conversation_id: str
    request_id: str
    stage: int
    categories: tuple[str, ...]
    source: int
    action: int
    excerpt: str
    created_us: int
    state: int = OPEN
    queued_state: int = OPEN
    reviewer: str = ""
    lease_ms: int = 0
    decision: int = 0
    note: str = ""
    decided_ms: int = 0
    term_category: str = ""
    term: str = ""

    @classmethod
    def new(cls, case: NewCase, created_us: int) -> _Record:
        turn = case.turn
        return cls(
            id=case_id(turn.tenant, turn.request_id, case.stage),
            tenant=turn.tenant,
            user_id=turn.user_id,
            conversation_id=turn.conversation_id,
            request_id=turn.request_id,
            stage=case.stage,
            categories=tuple(case.categories),
            source=case.source,
            action=case.action,
            excerpt=case.excerpt,
            created_us=created_us,
        )

    def current(self, now_ms: int) -> _Record:
        """The record as it stands at `now_ms`: a lapsed claim is no claim."""
        if self.state == CLAIMED and self.lease_ms <= now_ms:
            return replace(self, state=self.queued_state, reviewer="", lease_ms=0)
        return self

    def message(self) -> review_pb2.ReviewCase:
        case = review_pb2.ReviewCase(
            id=self.id,
            turn=safety_pb2.TurnRef(
                tenant=self.tenant,
                user_id=self.user_id,
                conversation_id=self.conversation_id,
                request_id=self.request_id,
            ),
            stage=self.stage,
            categories=self.categories,
            source=self.source,
            action=self.action,
            excerpt=self.excerpt,
            state=self.state,
            reviewer=self.reviewer,
            decision=self.decision,
            note=self.note,
        )
        case.create_time.FromMicroseconds(self.created_us)
        if self.state == CLAIMED:
            case.lease_expire_time.FromMilliseconds(self.lease_ms)
        if self.decided_ms:
            case.decide_time.FromMilliseconds(self.decided_ms)
        if self.term:
            case.added_term.CopyFrom(review_pb2.KeywordTerm(category=self.term_category, term=self.term))
        return case

    def to_hash(self) -> dict[str, str]:
        """The record as a Redis hash: every field as text, the categories as JSON."""
        fields = {field.name: str(getattr(self, field.name)) for field in dataclasses.fields(self)}
        fields["categories"] = json.dumps(list(self.categories))
        return fields

    @classmethod
    def from_hash(cls, stored: Mapping[str, str]) -> _Record:
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            text = stored.get(field.name, "")
            if field.name == "categories":
                values[field.name] = tuple(json.loads(text or "[]"))
            else:
                values[field.name] = int(text or 0) if field.type == "int" else text
        return cls(**values)


def _term_field(term: review_pb2.KeywordTerm) -> str:
    return f"{term.category}\t{term.term}"


def _term_from_field(field: str) -> review_pb2.KeywordTerm:
    category, _, term = field.partition("\t")
    return review_pb2.KeywordTerm(category=category, term=term)


def _page_token(score: int) -> str:
    return base64.urlsafe_b64encode(str(score).encode()).decode()


def _page_start(token: str) -> int | None:
    """The opening time (µs) below which the page starts; None for the first page."""
    if not token:
        return None
    try:
        return int(base64.urlsafe_b64decode(token.encode()).decode())
    except ValueError as error:
        raise InvalidPageToken("page_token is not one a ListCases call returned") from error


class ReviewStore(abc.ABC):
    @abc.abstractmethod
    async def open_case(self, case: NewCase) -> str:
        """Opens the case and queues it for review; returns its id. Idempotent: the same (tenant, request_id,
        stage) gives the same id and no second case."""

    @abc.abstractmethod
    async def get(self, case_id: str) -> review_pb2.ReviewCase | None:
        """The case, or None."""

    @abc.abstractmethod
    async def list(
        self, *, tenant: str = "", state: int = 0, page_size: int = 50, page_token: str = ""
    ) -> tuple[list[review_pb2.ReviewCase], str]:
        """Cases newest first, of one tenant ("" every tenant's) in one state (0 every state): a page of at most
        `page_size`, and the token of the next page ("" at the end). InvalidPageToken for a token no call gave."""

    @abc.abstractmethod
    async def claim(self, reviewer: str, *, case_id: str = "", lease_seconds: float) -> review_pb2.ReviewCase:
        """Gives the reviewer a lease on the case, or on the oldest one waiting in the queue (escalated ones wait
        at its back). The holder may claim again to extend the lease. CaseNotFound: no such case, or none
        waiting; CaseConflict: another reviewer holds it, or it is decided."""

    @abc.abstractmethod
    async def decide(
        self, case_id: str, reviewer: str, decision: int, note: str, add_term: review_pb2.KeywordTerm | None
    ) -> review_pb2.ReviewCase:
        """Decides a case the reviewer holds: approve or block (DECIDED), or escalate (ESCALATED, back in the
        queue); `add_term` joins the terms. CaseNotFound; CaseConflict: not held by this reviewer, the lease
        lapsed, or already decided."""

    @abc.abstractmethod
    async def erase(self, tenant: str, *, user_id: str = "", conversation_id: str = "") -> int:
        """Removes every case of the tenant's user, or conversation (both given: that user's cases of that
        conversation), with everything that refers to them; returns how many."""

    @abc.abstractmethod
    async def open_summary(self) -> tuple[int, float | None]:
        """How many cases are not decided (open, claimed or escalated), and the oldest one's age in seconds."""

    @abc.abstractmethod
    async def sweep(self) -> None:
        """Housekeeping of the queue, run periodically by whoever serves it; safe to run concurrently."""

    @abc.abstractmethod
    async def terms(self) -> tuple[str, list[review_pb2.KeywordTerm]]:
        """The terms decisions added, sorted, and their version, which changes whenever they do."""

    @abc.abstractmethod
    async def add_term(self, term: review_pb2.KeywordTerm) -> None: ...

    @abc.abstractmethod
    async def remove_term(self, term: review_pb2.KeywordTerm) -> bool:
        """Whether the term was there."""

    async def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Releases the store's connections."""


def _now_us() -> int:
    return time.time_ns() // 1000


class MemoryReviewStore(ReviewStore):
    """The queue of one process, for tests and `make run` without Redis: cases that another process opened are
    not seen here. At most `max_cases` cases (the oldest go first)."""

    def __init__(self, *, retention_seconds: float, max_cases: int = MEMORY_MAX_CASES) -> None:
        self._retention_us = round(retention_seconds * 1e6)
        self._max_cases = max_cases
        self._cases: OrderedDict[str, _Record] = OrderedDict()  # in opening order
        self._queue: OrderedDict[str, None] = OrderedDict()  # cases not decided, in queue order
        self._terms: dict[str, None] = {}
        self._terms_version = 0
        self._last_us = 0

    def _expire(self) -> None:
        horizon = _now_us() - self._retention_us
        while self._cases:
            oldest = next(iter(self._cases.values()))
            if oldest.created_us > horizon and len(self._cases) <= self._max_cases:
                return
            self._remove(oldest.id)

    def _remove(self, case_id: str) -> None:
        del self._cases[case_id]
        self._queue.pop(case_id, None)

    def _existing(self, case_id: str) -> _Record:
        self._expire()
        record = self._cases.get(case_id)
        if record is None:
            raise CaseNotFound(_not_found(case_id))
        return record

    async def open_case(self, case: NewCase) -> str:
        self._expire()
        self._last_us = max(_now_us(), self._last_us + 1)
        record = _Record.new(case, self._last_us)
        if record.id not in self._cases:
            self._cases[record.id] = record
            self._queue[record.id] = None
            self._expire()
        return record.id

    async def get(self, case_id: str) -> review_pb2.ReviewCase | None:
        self._expire()
        record = self._cases.get(case_id)
        return None if record is None else record.current(_now_us() // 1000).message()

    async def list(
        self, *, tenant: str = "", state: int = 0, page_size: int = 50, page_token: str = ""
    ) -> tuple[list[review_pb2.ReviewCase], str]:
        start = _page_start(page_token)
        self._expire()
        now_ms = _now_us() // 1000
        page: list[review_pb2.ReviewCase] = []
        scanned = 0
        for record in reversed(self._cases.values()):
            if start is not None and record.created_us >= start:
                continue
            if start is not None and (len(page) == page_size or scanned == LIST_MAX_SCANNED):
                return page, _page_token(start)
            scanned += 1
            start = record.created_us
            current = record.current(now_ms)
            if (not tenant or current.tenant == tenant) and (not state or current.state == state):
                page.append(current.message())
        return page, ""

    async def claim(self, reviewer: str, *, case_id: str = "", lease_seconds: float) -> review_pb2.ReviewCase:
        self._expire()
        now_ms = _now_us() // 1000
        if case_id:
            record = self._existing(case_id).current(now_ms)
            if record.state == DECIDED:
                raise CaseConflict(f"case {case_id} is already decided")
            if record.state == CLAIMED and record.reviewer != reviewer:
                raise CaseConflict(_held_by(case_id, record.reviewer))
        else:
            waiting = (self._cases[queued].current(now_ms) for queued in self._queue)
            record = next((record for record in waiting if record.state != CLAIMED), None)
            if record is None:
                raise CaseNotFound(NOTHING_WAITING)
        claimed = replace(record, state=CLAIMED, reviewer=reviewer, lease_ms=now_ms + math.ceil(lease_seconds * 1000))
        self._cases[claimed.id] = claimed
        return claimed.message()

    async def decide(
        self, case_id: str, reviewer: str, decision: int, note: str, add_term: review_pb2.KeywordTerm | None
    ) -> review_pb2.ReviewCase:
        stored = self._existing(case_id)
        now_ms = _now_us() // 1000
        _check_holder(case_id, stored.state, stored.reviewer, stored.lease_ms, reviewer, now_ms)
        decided = replace(stored, reviewer=reviewer, lease_ms=0, decision=decision, note=note, decided_ms=now_ms)
        if add_term is not None:
            decided = replace(decided, term_category=add_term.category, term=add_term.term)
        if decision == review_pb2.DECISION_ESCALATE:
            decided = replace(decided, state=ESCALATED, queued_state=ESCALATED)
            self._queue.move_to_end(case_id)
        else:
            decided = replace(decided, state=DECIDED)
            del self._queue[case_id]
        self._cases[case_id] = decided
        if add_term is not None:
            await self.add_term(add_term)
        return decided.message()

    async def erase(self, tenant: str, *, user_id: str = "", conversation_id: str = "") -> int:
        if not user_id and not conversation_id:
            raise ValueError("erase needs a user_id or a conversation_id")
        erased = [
            record.id
            for record in self._cases.values()
            if record.tenant == tenant
            and (not user_id or record.user_id == user_id)
            and (not conversation_id or record.conversation_id == conversation_id)
        ]
        for erased_id in erased:
            self._remove(erased_id)
        return len(erased)

    async def open_summary(self) -> tuple[int, float | None]:
        self._expire()
        if not self._queue:
            return 0, None
        oldest = min(self._cases[queued].created_us for queued in self._queue)
        return len(self._queue), max(0.0, (_now_us() - oldest) / 1e6)

    async def sweep(self) -> None:
        self._expire()

    async def terms(self) -> tuple[str, list[review_pb2.KeywordTerm]]:
        return str(self._terms_version), [_term_from_field(field) for field in sorted(self._terms)]

    async def add_term(self, term: review_pb2.KeywordTerm) -> None:
        field = _term_field(term)
        if field not in self._terms:
            self._terms[field] = None
            self._terms_version += 1

    async def remove_term(self, term: review_pb2.KeywordTerm) -> bool:
        field = _term_field(term)
        if field not in self._terms:
            return False
        del self._terms[field]
        self._terms_version += 1
        return True


NOTHING_WAITING = "no open or escalated case is waiting for review"


def _not_found(case_id: str) -> str:
    return f"case {case_id} not found (never opened, or expired, or erased)"


def _held_by(case_id: str, holder: str) -> str:
    return f"case {case_id} is held by {holder}; claim another case, or this one once that lease lapses"


def _check_holder(case_id: str, state: int, holder: str, lease_ms: int, reviewer: str, now_ms: int) -> None:
    """CaseConflict unless `reviewer` holds a live lease on the case."""
    if state == DECIDED:
        raise CaseConflict(f"case {case_id} is already decided; a decision is final")
    if state == CLAIMED and lease_ms > now_ms:
        if holder != reviewer:
            raise CaseConflict(f"case {case_id} is held by {holder}, not {reviewer}: only the holder decides")
    elif state == CLAIMED and holder == reviewer:
        raise CaseConflict(f"{reviewer}'s lease on case {case_id} lapsed; claim it again, then decide")
    else:
        raise CaseConflict(f"{reviewer} does not hold case {case_id}; claim it first, then decide")


QUEUE = "chatmesh:review:queue"
GROUP = "reviewers"
ALL_CASES = "chatmesh:review:cases"
OPEN_CASES = "chatmesh:review:open"
TERMS = "chatmesh:review:terms"
TERMS_VERSION = "chatmesh:review:terms:version"

# Pieces shared by the scripts. States as in review.proto: 1 open, 2 claimed, 3 decided, 4 escalated. Numbers
# go to Redis through int(): Lua would write a large one in exponent notation.
_LUA_COMMON = """
local function int(x) return string.format('%d', x) end
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local now_ms = math.floor(now_us / 1000)
local function record_key(ref)
  local tenant, id = string.match(ref, '^(.*)/(%x+)$')
  return 'chatmesh:review:{' .. tenant .. '}:case:' .. id
end
local function drop(queue, entry)
  redis.call('XACK', queue, 'reviewers', entry)
  redis.call('XDEL', queue, entry)
end
-- What a queue entry is worth: 'stale' (its case is gone or decided, or has another entry), 'held' (a live lease
-- holds its case) or 'claimable'; and its case's record key.
local function judge(entry, fields)
  local ref
  for i = 1, #(fields or {}), 2 do
    if fields[i] == 'case' then ref = fields[i + 1] end
  end
  if not ref then return 'stale', nil end
  local key = record_key(ref)
  local r = redis.call('HMGET', key, 'state', 'lease_ms', 'entry')
  if not r[1] or r[3] ~= entry or tonumber(r[1]) == 3 then return 'stale', key end
  if tonumber(r[1]) == 2 and tonumber(r[2]) > now_ms then return 'held', key end
  return 'claimable', key
end
-- The group's pending entries, oldest first, at most `limit`, each given to visit(entry, fields); stops at the
-- first for which visit returns a value, and returns that value.
local function each_pending(queue, limit, visit)
  local start, scanned = '-', 0
  while scanned < limit do
    local pending = redis.call('XPENDING', queue, 'reviewers', start, '+', 100)
    if #pending == 0 then return nil end
    for _, p in ipairs(pending) do
      local found = redis.call('XRANGE', queue, p[1], p[1])
      local result = visit(p[1], found[1] and found[1][2])
      if result then return result end
    end
    scanned = scanned + #pending
    start = '(' .. pending[#pending][1]
  end
  return nil
end
"""

# KEYS: record, id key, tenant's cases, all cases, open cases, user index, conversation index ('' for none),
# queue. ARGV: retention (ms), ref, tenant, then the record's fields as name, value pairs.
_OPEN_LUA = (
    _LUA_COMMON
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local created_us = now_us
local newest = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')
if newest[2] and tonumber(newest[2]) >= created_us then created_us = tonumber(newest[2]) + 1 end
local retention = tonumber(ARGV[1])
local entry = redis.call('XADD', KEYS[8], '*', 'case', ARGV[2])
redis.call('HSET', KEYS[1], 'created_us', int(created_us), 'entry', entry, unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], retention)
redis.call('SET', KEYS[2], ARGV[3], 'PX', retention)
for i = 3, 5 do
  redis.call('ZADD', KEYS[i], int(created_us), ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', '(' .. int(now_us - retention * 1000))
  redis.call('PEXPIRE', KEYS[i], retention)
end
local id = string.match(ARGV[2], '/(%x+)$')
for i = 6, 7 do
  if KEYS[i] ~= '' then
    redis.call('SADD', KEYS[i], id)
    redis.call('PEXPIRE', KEYS[i], retention)
  end
end
return 1
"""
)

# KEYS: record. ARGV: reviewer, lease (ms).
_CLAIM_CASE_LUA = (
    _LUA_COMMON
    + """
local r = redis.call('HMGET', KEYS[1], 'state', 'reviewer', 'lease_ms')
if not r[1] then return {'missing'} end
local state = tonumber(r[1])
if state == 3 then return {'decided'} end
if state == 2 and tonumber(r[3]) > now_ms and r[2] ~= ARGV[1] then return {'held', r[2]} end
redis.call('HSET', KEYS[1], 'state', 2, 'reviewer', ARGV[1], 'lease_ms', int(now_ms + tonumber(ARGV[2])))
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: queue. ARGV: reviewer, lease (ms), the most entries to look at.
_CLAIM_NEXT_LUA = (
    _LUA_COMMON
    + """
local queue, reviewer, limit = KEYS[1], ARGV[1], tonumber(ARGV[3])
redis.pcall('XGROUP', 'CREATE', queue, 'reviewers', '0', 'MKSTREAM')
local function claim(key)
  redis.call('HSET', key, 'state', 2, 'reviewer', reviewer, 'lease_ms', int(now_ms + tonumber(ARGV[2])))
  return redis.call('HGETALL', key)
end
-- Entries handed out before: a case whose lease lapsed is claimable again, and its entry moves to this reviewer.
local claimed = each_pending(queue, limit, function(entry, fields)
  local verdict, key = judge(entry, fields)
  if verdict == 'stale' then
    drop(queue, entry)
  elseif verdict == 'claimable' then
    redis.call('XCLAIM', queue, 'reviewers', reviewer, 0, entry, 'JUSTID')
    return claim(key)
  end
end)
if claimed then return claimed end
-- Then entries never handed out, in order. One whose case was claimed by id stays pending (and is found above
-- once that lease lapses).
for _ = 1, limit do
  local read = redis.call('XREADGROUP', 'GROUP', 'reviewers', reviewer, 'COUNT', 1, 'STREAMS', queue, '>')
  if not read then return false end
  local entry = read[1][2][1]
  local verdict, key = judge(entry[1], entry[2])
  if verdict == 'stale' then
    drop(queue, entry[1])
  elseif verdict == 'claimable' then
    return claim(key)
  end
end
return false
"""
)

# KEYS: record, open cases, queue, terms, terms version. ARGV: reviewer, decision, note, the term's category and
# term ('' for none), ref.
_DECIDE_LUA = (
    _LUA_COMMON
    + """
local r = redis.call('HMGET', KEYS[1], 'state', 'reviewer', 'lease_ms', 'entry')
if not r[1] then return {'missing'} end
local state, holder, lease = tonumber(r[1]), r[2], tonumber(r[3])
if state ~= 2 or holder ~= ARGV[1] or lease <= now_ms then
  return {'conflict', r[1], holder, r[3], int(now_ms)}
end
drop(KEYS[3], r[4])
redis.call('HSET', KEYS[1], 'reviewer', ARGV[1], 'lease_ms', 0, 'decision', ARGV[2], 'note', ARGV[3],
  'decided_ms', int(now_ms))
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'term_category', ARGV[4], 'term', ARGV[5])
  if redis.call('HSETNX', KEYS[4], ARGV[4] .. '\\t' .. ARGV[5], int(now_ms)) == 1 then redis.call('INCR', KEYS[5]) end
end
if ARGV[2] == '3' then
  local entry = redis.call('XADD', KEYS[3], '*', 'case', ARGV[6])
  redis.call('HSET', KEYS[1], 'state', 4, 'queued_state', 4, 'entry', entry)
else
  redis.call('HSET', KEYS[1], 'state', 3)
  redis.call('ZREM', KEYS[2], ARGV[6])
end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: the user's or the conversation's index, queue, tenant's cases, all cases, open cases.
# ARGV: tenant, user id, conversation id (either may be '').
_ERASE_LUA = (
    _LUA_COMMON
    + """
local tenant = ARGV[1]
local prefix = 'chatmesh:review:{' .. tenant .. '}:'
local erased = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = prefix .. 'case:' .. id
  local r = redis.call('HMGET', key, 'user_id', 'conversation_id', 'entry')
  if not r[1] then
    redis.call('SREM', KEYS[1], id)
  elseif (ARGV[2] == '' or r[1] == ARGV[2]) and (ARGV[3] == '' or r[2] == ARGV[3]) then
    drop(KEYS[2], r[3])
    redis.call('DEL', key, 'chatmesh:review:id:' .. id)
    for i = 3, 5 do redis.call('ZREM', KEYS[i], tenant .. '/' .. id) end
    if r[1] ~= '' then redis.call('SREM', prefix .. 'user:' .. redis.sha1hex(r[1]), id) end
    if r[2] ~= '' then redis.call('SREM', prefix .. 'conv:' .. redis.sha1hex(r[2]), id) end
    erased = erased + 1
  end
end
return erased
"""
)

# KEYS: open cases. ARGV: retention (ms). Returns the count, the oldest one's opening time (µs) if any, and now.
_OPEN_SUMMARY_LUA = (
    _LUA_COMMON
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. int(now_us - tonumber(ARGV[1]) * 1000))
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {redis.call('ZCARD', KEYS[1]), oldest[2] or '', int(now_us)}
"""
)

# KEYS: queue. ARGV: how long a consumer without pending entries stays (ms), the most pending entries to look at.
_SWEEP_LUA = (
    _LUA_COMMON
    + """
local queue, idle, limit = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
if redis.call('EXISTS', queue) == 0 then return 0 end
redis.pcall('XGROUP', 'CREATE', queue, 'reviewers', '0')
-- Pending entries whose case is gone or decided.
each_pending(queue, limit, function(entry, fields)
  if judge(entry, fields) == 'stale' then drop(queue, entry) end
end)
-- Trim only what was handed out and acknowledged: below the oldest pending entry, or with none pending up to the
-- last one handed out (the entries after it wait for a reviewer).
local summary = redis.call('XPENDING', queue, 'reviewers')
local minid = summary[2]
if summary[1] == 0 then
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', queue)) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    if info['name'] == 'reviewers' then
      local ms, seq = string.match(info['last-delivered-id'], '^(%d+)-(%d+)$')
      minid = ms .. '-' .. int(tonumber(seq) + 1)
    end
  end
end
local trimmed = redis.call('XTRIM', queue, 'MINID', minid)
-- Reviewers that hold nothing and have been idle; one with pending entries is never deleted (they would be lost).
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', queue, 'reviewers')) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] >= idle then
    redis.call('XGROUP', 'DELCONSUMER', queue, 'reviewers', info['name'])
  end
end
return trimmed
"""
)

# KEYS: terms, terms version. ARGV: field, now (ms).
_ADD_TERM_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then redis.call('INCR', KEYS[2]) end
"""

# KEYS: terms, terms version. ARGV: field.
_REMOVE_TERM_LUA = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('INCR', KEYS[2])
return 1
"""

_unavailable_on_redis_error = unavailable_on_redis_error(ReviewStoreUnavailable)


def _digest(value: str) -> str:
    # As the scripts compute it (redis.sha1hex): a key name, not a secret.
    return hashlib.sha1(value.encode()).hexdigest()


def _ref(tenant: str, case_id: str) -> str:
    return f"{tenant}/{case_id}"


def _record_key(tenant: str, case_id: str) -> str:
    return f"chatmesh:review:{{{tenant}}}:case:{case_id}"


def _id_key(case_id: str) -> str:
    return f"chatmesh:review:id:{case_id}"


def _tenant_cases(tenant: str) -> str:
    return f"chatmesh:review:{{{tenant}}}:cases"


def _user_index(tenant: str, user_id: str) -> str:
    return f"chatmesh:review:{{{tenant}}}:user:{_digest(user_id)}" if user_id else ""


def _conversation_index(tenant: str, conversation_id: str) -> str:
    return f"chatmesh:review:{{{tenant}}}:conv:{_digest(conversation_id)}" if conversation_id else ""


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisReviewStore(ReviewStore):
    """The queue in Redis, shared by every process (see the module's docstring for its keys)."""

    def __init__(self, client: Redis, *, retention_seconds: float, consumer_idle_seconds: float = 600.0) -> None:
        """Takes ownership of `client` (closed by `close`), which must decode responses; see `from_url`.
        `consumer_idle_seconds`: how long a reviewer holding nothing stays a consumer of the queue."""
        if not client.get_encoder().decode_responses:
            raise ValueError("RedisReviewStore needs a client created with decode_responses=True")
        self._client = client
        self._retention_ms = max(1, round(retention_seconds * 1000))
        self._consumer_idle_ms = round(consumer_idle_seconds * 1000)
        self._open = client.register_script(_OPEN_LUA)
        self._claim_case = client.register_script(_CLAIM_CASE_LUA)
        self._claim_next = client.register_script(_CLAIM_NEXT_LUA)
        self._decide = client.register_script(_DECIDE_LUA)
        self._erase = client.register_script(_ERASE_LUA)
        self._open_summary = client.register_script(_OPEN_SUMMARY_LUA)
        self._sweep = client.register_script(_SWEEP_LUA)
        self._add_term = client.register_script(_ADD_TERM_LUA)
        self._remove_term = client.register_script(_REMOVE_TERM_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        retention_seconds: float,
        consumer_idle_seconds: float = 600.0,
        options: Mapping[str, Any] | None = None,
    ) -> RedisReviewStore:
        """A store with its own connection pool to `url`; `options` are more arguments of `Redis.from_url`
        (credentials, TLS files)."""
        client = Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=2, socket_timeout=5, **(options or {})
        )
        return cls(client, retention_seconds=retention_seconds, consumer_idle_seconds=consumer_idle_seconds)

    @_unavailable_on_redis_error
    async def open_case(self, case: NewCase) -> str:
        record = _Record.new(case, 0)
        fields = record.to_hash()
        del fields["created_us"]
        tenant, ref = record.tenant, _ref(record.tenant, record.id)
        await self._open(
            keys=[
                _record_key(tenant, record.id),
                _id_key(record.id),
                _tenant_cases(tenant),
                ALL_CASES,
                OPEN_CASES,
                _user_index(tenant, record.user_id),
                _conversation_index(tenant, record.conversation_id),
                QUEUE,
            ],
            args=[self._retention_ms, ref, tenant, *(item for pair in fields.items() for item in pair)],
        )
        return record.id

    async def _tenant_of(self, case_id: str) -> str | None:
        return await self._client.get(_id_key(case_id))

    @_unavailable_on_redis_error
    async def get(self, case_id: str) -> review_pb2.ReviewCase | None:
        tenant = await self._tenant_of(case_id)
        if tenant is None:
            return None
        fields = await self._client.hgetall(_record_key(tenant, case_id))
        if not fields:
            return None
        return _Record.from_hash(fields).current(_now_us() // 1000).message()

    @_unavailable_on_redis_error
    async def list(
        self, *, tenant: str = "", state: int = 0, page_size: int = 50, page_token: str = ""
    ) -> tuple[list[review_pb2.ReviewCase], str]:
        below = _page_start(page_token)
        index = _tenant_cases(tenant) if tenant else ALL_CASES
        page: list[review_pb2.ReviewCase] = []
        scanned = 0
        while True:
            # One more than the page needs, to know whether there is a next page.
            batch = min(200, page_size - len(page), LIST_MAX_SCANNED - scanned) + 1
            upper = "+inf" if below is None else f"({below}"
            refs = await self._client.zrange(
                index, upper, "-inf", desc=True, byscore=True, offset=0, num=batch, withscores=True
            )
            if not refs:
                return page, ""
            async with self._client.pipeline(transaction=False) as pipe:
                for ref, _ in refs:
                    case_tenant, _, case_id = ref.partition("/")
                    pipe.hgetall(_record_key(case_tenant, case_id))
                records = await pipe.execute()
            now_ms = _now_us() // 1000
            gone = []
            for (ref, score), fields in zip(refs, records, strict=True):
                if below is not None and (len(page) == page_size or scanned == LIST_MAX_SCANNED):
                    return page, _page_token(below)
                scanned += 1
                below = int(score)
                if not fields:
                    gone.append(ref)  # expired
                    continue
                current = _Record.from_hash(fields).current(now_ms)
                if not state or current.state == state:
                    page.append(current.message())
            if gone:
                await self._client.zrem(index, *gone)

    @_unavailable_on_redis_error
    async def claim(self, reviewer: str, *, case_id: str = "", lease_seconds: float) -> review_pb2.ReviewCase:
        lease_ms = math.ceil(lease_seconds * 1000)
        if not case_id:
            fields = await self._claim_next(keys=[QUEUE], args=[reviewer, lease_ms, QUEUE_MAX_SCANNED])
            if not fields:
                raise CaseNotFound(NOTHING_WAITING)
            return _Record.from_hash(_pairs(fields)).message()
        tenant = await self._tenant_of(case_id)
        if tenant is None:
            raise CaseNotFound(_not_found(case_id))
        result = await self._claim_case(keys=[_record_key(tenant, case_id)], args=[reviewer, lease_ms])
        if result[0] == "missing":
            raise CaseNotFound(_not_found(case_id))
        if result[0] == "decided":
            raise CaseConflict(f"case {case_id} is already decided")
        if result[0] == "held":
            raise CaseConflict(_held_by(case_id, result[1]))
        return _Record.from_hash(_pairs(result[1])).message()

    @_unavailable_on_redis_error
    async def decide(
        self, case_id: str, reviewer: str, decision: int, note: str, add_term: review_pb2.KeywordTerm | None
    ) -> review_pb2.ReviewCase:
        tenant = await self._tenant_of(case_id)
        if tenant is None:
            raise CaseNotFound(_not_found(case_id))
        result = await self._decide(
            keys=[_record_key(tenant, case_id), OPEN_CASES, QUEUE, TERMS, TERMS_VERSION],
            args=[
                reviewer,
                decision,
                note,
                add_term.category if add_term else "",
                add_term.term if add_term else "",
                _ref(tenant, case_id),
            ],
        )
        if result[0] == "missing":
            raise CaseNotFound(_not_found(case_id))
        if result[0] == "conflict":
            _, state, holder, lease_ms, now_ms = result
            _check_holder(case_id, int(state), holder, int(lease_ms), reviewer, int(now_ms))
        return _Record.from_hash(_pairs(result[1])).message()

    @_unavailable_on_redis_error
    async def erase(self, tenant: str, *, user_id: str = "", conversation_id: str = "") -> int:
        if not user_id and not conversation_id:
            raise ValueError("erase needs a user_id or a conversation_id")
        index = _user_index(tenant, user_id) if user_id else _conversation_index(tenant, conversation_id)
        return await self._erase(
            keys=[index, QUEUE, _tenant_cases(tenant), ALL_CASES, OPEN_CASES], args=[tenant, user_id, conversation_id]
        )

    @_unavailable_on_redis_error
    async def open_summary(self) -> tuple[int, float | None]:
        count, oldest_us, now_us = await self._open_summary(keys=[OPEN_CASES], args=[self._retention_ms])
        if not oldest_us:
            return int(count), None
        return int(count), max(0.0, (int(now_us) - int(oldest_us)) / 1e6)

    @_unavailable_on_redis_error
    async def sweep(self) -> None:
        await self._sweep(keys=[QUEUE], args=[self._consumer_idle_ms, QUEUE_MAX_SCANNED])

    @_unavailable_on_redis_error
    async def terms(self) -> tuple[str, list[review_pb2.KeywordTerm]]:
        async with self._client.pipeline(transaction=True) as pipe:
            version, fields = await pipe.get(TERMS_VERSION).hkeys(TERMS).execute()
        return version or "0", [_term_from_field(field) for field in sorted(fields)]

    @_unavailable_on_redis_error
    async def add_term(self, term: review_pb2.KeywordTerm) -> None:
        await self._add_term(keys=[TERMS, TERMS_VERSION], args=[_term_field(term), _now_us() // 1000])

    @_unavailable_on_redis_error
    async def remove_term(self, term: review_pb2.KeywordTerm) -> bool:
        return bool(await self._remove_term(keys=[TERMS, TERMS_VERSION], args=[_term_field(term)]))

    async def close(self) -> None:
        await self._client.aclose()


def create_review_store(settings: ServiceSettings) -> ReviewStore:
    """Redis when CHATMESH_REDIS_URL is set, the in-memory store otherwise."""
    if settings.redis_url:
        return RedisReviewStore.from_url(
            settings.redis_url,
            retention_seconds=settings.review_retention_seconds,
            consumer_idle_seconds=settings.review_lease_seconds,
            options=redis_connection.connection_options(settings, settings.redis_url),
        )
    return MemoryReviewStore(retention_seconds=settings.review_retention_seconds)
