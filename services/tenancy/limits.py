"""A tenant's limits, and the windows they are counted in."""

from __future__ import annotations

import calendar
import datetime as dt
import math
from dataclasses import dataclass, fields
from enum import StrEnum

from chatmesh.v1 import chat_pb2

# Spend is counted in integer nano-USD, so that sums are exact and comparisons never round.
NANO_USD_PER_USD = 1_000_000_000


class LimitName(StrEnum):
    """The kinds of limit, named as the TenantLimits fields (and the QuotaFailure and metric labels)."""

    REQUESTS_PER_MINUTE = "requests_per_minute"
    TOKENS_PER_MINUTE = "tokens_per_minute"
    CONCURRENT_STREAMS = "concurrent_streams"
    DAILY_BUDGET_USD = "daily_budget_usd"
    MONTHLY_BUDGET_USD = "monthly_budget_usd"


@dataclass(frozen=True, slots=True)
class Limits:
    """None is no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None
    monthly_budget_usd: float | None = None
    daily_budget_usd: float | None = None

    @property
    def limits_spend(self) -> bool:
        """Whether a model call must reserve its worst case first (a token or spend limit is set)."""
        return (
            self.tokens_per_minute is not None
            or self.monthly_budget_usd is not None
            or self.daily_budget_usd is not None
        )

    @property
    def daily_budget_nano_usd(self) -> int | None:
        return None if self.daily_budget_usd is None else usd_to_nano(self.daily_budget_usd)

    @property
    def monthly_budget_nano_usd(self) -> int | None:
        return None if self.monthly_budget_usd is None else usd_to_nano(self.monthly_budget_usd)

    @classmethod
    def from_proto(cls, message: chat_pb2.TenantLimits) -> Limits:
        return cls(
            **{
                field.name: getattr(message, field.name) if message.HasField(field.name) else None
                for field in fields(cls)
            }
        )

    def to_proto(self) -> chat_pb2.TenantLimits:
        message = chat_pb2.TenantLimits()
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                setattr(message, field.name, value)
        return message


def usd_to_nano(usd: float) -> int:
    """Rounded down for limits, so that a budget of 0.1 USD never admits 0.1000000001."""
    return math.floor(usd * NANO_USD_PER_USD + 1e-6)


def cost_to_nano(usd: float) -> int:
    """Rounded up for what is spent, so that spend is never under-counted."""
    return math.ceil(usd * NANO_USD_PER_USD - 1e-6)


@dataclass(frozen=True, slots=True)
class Windows:
    """The UTC calendar windows that contain one instant, as the ids that name them in the ledger, and
    the Unix seconds at which each ends."""

    minute: str
    day: str
    month: str
    minute_ends_at: float
    day_ends_at: float
    month_ends_at: float

    @classmethod
    def at(cls, unix_seconds: float) -> Windows:
        moment = dt.datetime.fromtimestamp(unix_seconds, dt.UTC)
        minute_start = math.floor(unix_seconds / 60) * 60
        day_start = dt.datetime(moment.year, moment.month, moment.day, tzinfo=dt.UTC)
        days_in_month = calendar.monthrange(moment.year, moment.month)[1]
        month_end = dt.datetime(moment.year, moment.month, 1, tzinfo=dt.UTC) + dt.timedelta(days=days_in_month)
        return cls(
            minute=str(minute_start // 60),
            day=moment.strftime("%Y%m%d"),
            month=moment.strftime("%Y%m"),
            minute_ends_at=minute_start + 60.0,
            day_ends_at=(day_start + dt.timedelta(days=1)).timestamp(),
            month_ends_at=month_end.timestamp(),
        )
