"""One way for every Redis-backed store to report that Redis could not be reached or did not answer."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from redis.exceptions import RedisError

P = ParamSpec("P")
R = TypeVar("R")


def unavailable_on_redis_error(
    unavailable: type[Exception],
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Decorates a store method so that Redis' own connection and timeout errors raise `unavailable`."""

    def decorate(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(method)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await method(*args, **kwargs)
            except RedisError as error:
                raise unavailable(type(error).__name__) from error

        return wrapper

    return decorate
