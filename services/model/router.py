"""The model router's state: a key pool and a circuit breaker per deployment, and the order of attempts.

Breakers and key pools are per process, not shared through Redis, on purpose:
- a model call asks them before every attempt; a Redis round trip there would add latency to every turn;
- each replica learns an outage on its own within `min_calls` of its own calls, which at any real traffic
  is a fraction of a second, so sharing would gain little;
- a shared breaker would fail along with Redis, and the model path must not depend on it.

ModelClient.stream_chat drives the attempts; this module only keeps score and says what is usable.
"""

from __future__ import annotations

import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from enum import IntEnum

from chatmesh.model import metrics
from chatmesh.model.deployments import BreakerSpec, Deployment, Deployments, ModelRoute
from chatmesh.runtime.logs import get_logger

log = get_logger(__name__)

# How long a key cools down after a 429 that said nothing about when to come back.
DEFAULT_COOLDOWN_SECONDS = 5.0
MAX_COOLDOWN_SECONDS = 600.0


class KeyState(IntEnum):
    USABLE = 0
    COOLING = 1
    RETIRED = 2


class BreakerState(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class KeyPool:
    """A deployment's keys: round robin among the usable ones; a 429 cools a key down, a 401 or 403 retires
    it for the process's life."""

    def __init__(self, deployment: str, keys: Iterable[str], clock: Callable[[], float]) -> None:
        self._deployment = deployment
        self._keys = tuple(keys)
        self._clock = clock
        self._cooling_until = [0.0] * len(self._keys)
        self._retired = [False] * len(self._keys)
        self._next = 0

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, index: int) -> str:
        return self._keys[index]

    def pick(self, exclude: Iterable[int] = ()) -> int | None:
        """The index of the next usable key (round robin) not in `exclude`, or None."""
        now = self._clock()
        excluded = set(exclude)
        count = len(self._keys)
        for step in range(count):
            index = (self._next + step) % count
            if index not in excluded and self._usable(index, now):
                self._next = index + 1
                return index
        return None

    def cool(self, index: int, seconds: float | None) -> None:
        seconds = DEFAULT_COOLDOWN_SECONDS if seconds is None else min(max(seconds, 0.0), MAX_COOLDOWN_SECONDS)
        self._cooling_until[index] = max(self._cooling_until[index], self._clock() + seconds)

    def retire(self, index: int) -> bool:
        """Takes the key out of use; True when it was not retired already."""
        if self._retired[index]:
            return False
        self._retired[index] = True
        return True

    def state(self, index: int) -> KeyState:
        if self._retired[index]:
            return KeyState.RETIRED
        return KeyState.COOLING if self._cooling_until[index] > self._clock() else KeyState.USABLE

    def has_usable(self) -> bool:
        now = self._clock()
        return any(self._usable(index, now) for index in range(len(self._keys)))

    def all_retired(self) -> bool:
        return all(self._retired)

    def usable_at(self) -> float | None:
        """When a key is usable again (now or later), or None when every key is retired."""
        times = [until for until, retired in zip(self._cooling_until, self._retired, strict=True) if not retired]
        return min(times) if times else None

    def _usable(self, index: int, now: float) -> bool:
        return not self._retired[index] and self._cooling_until[index] <= now


class CircuitBreaker:
    """Closed, then open when over the last `window` calls (at least `min_calls`) the failure rate reaches
    `failure_rate`; open deployments are skipped. After `open_seconds`, one probe call goes through
    (half-open): its success closes the breaker, its failure opens it again. Disabled, it never opens."""

    def __init__(self, deployment: str, spec: BreakerSpec, clock: Callable[[], float], enabled: bool = True) -> None:
        self._deployment = deployment
        self._spec = spec
        self._clock = clock
        self._enabled = enabled
        self._calls: deque[bool] = deque(maxlen=spec.window)  # True: a failure
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """As the metrics show it: an open breaker whose `open_seconds` have passed counts as half-open."""
        if self._state is BreakerState.OPEN and self._clock() >= self._opened_at + self._spec.open_seconds:
            return BreakerState.HALF_OPEN
        return self._state

    def allows(self) -> bool:
        """Whether a call may go now (closed, or an open breaker's probe is due and not yet taken)."""
        if self._state is BreakerState.CLOSED:
            return True
        return not self._probing and self._clock() >= self._opened_at + self._spec.open_seconds

    def open_until(self) -> float | None:
        """When a probe is due, for an open breaker; None when the breaker lets calls through."""
        if self._state is BreakerState.CLOSED:
            return None
        return self._opened_at + self._spec.open_seconds

    def begin(self) -> bool:
        """A call starts (after `allows`); True when it is the half-open probe."""
        if self._state is BreakerState.CLOSED:
            return False
        self._state = BreakerState.HALF_OPEN
        self._probing = True
        return True

    def success(self, probe: bool) -> None:
        if probe:
            self._probing = False
            self._state = BreakerState.CLOSED
            self._calls.clear()
            log.info("model_breaker_closed", extra={"deployment": self._deployment})
            return
        if self._state is BreakerState.CLOSED:
            self._calls.append(False)

    def failure(self, probe: bool) -> None:
        if not self._enabled:
            return
        if probe:
            self._probing = False
            self._open()
            return
        if self._state is not BreakerState.CLOSED:
            return
        self._calls.append(True)
        calls = len(self._calls)
        if calls >= self._spec.min_calls and sum(self._calls) / calls >= self._spec.failure_rate:
            self._open()

    def release(self, probe: bool) -> None:
        """A call ended without saying anything of the deployment (a 429, a cancelled call)."""
        if probe:
            self._probing = False

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._calls.clear()
        log.warning("model_breaker_opened", extra={"deployment": self._deployment, "open_s": self._spec.open_seconds})


class Router:
    """The key pools and breakers of every deployment of `deployments`, and the order of a call's attempts."""

    def __init__(
        self,
        deployments: Deployments,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.deployments = deployments
        self._clock = clock
        self._rng = rng or random.Random()
        self.pools: dict[str, KeyPool] = {}
        self.breakers: dict[str, CircuitBreaker] = {}
        for deployment in deployments.deployments():
            self.pools[deployment.name] = KeyPool(deployment.name, deployment.keys, clock)
            self.breakers[deployment.name] = CircuitBreaker(
                deployment.name, deployments.breaker, clock, enabled=deployments.from_file
            )
        metrics.watch_model_router(self)

    def chain(self, model: str) -> list[ModelRoute] | None:
        """The routes a call to `model` may use, in order: its own, then its fallback models (each once); None
        when no entry serves `model`."""
        route = self.deployments.route(model)
        if route is None:
            return None
        routes = [route]
        while route.fallback_model is not None and route.fallback_model not in {r.name for r in routes}:
            route = self.deployments.models[route.fallback_model]
            routes.append(route)
        return routes

    def order(self, route: ModelRoute) -> list[Deployment]:
        """A round's deployments of `route`: first one chosen by weight among the usable ones, then the others
        in the file's order."""
        usable = [deployment for deployment in route.deployments if self.usable(deployment)]
        if not usable:
            return list(route.deployments)
        first = self._rng.choices(usable, weights=[deployment.weight for deployment in usable])[0]
        return [first, *(deployment for deployment in route.deployments if deployment is not first)]

    def usable(self, deployment: Deployment) -> bool:
        return self.breakers[deployment.name].allows() and self.pools[deployment.name].has_usable()

    def healthy(self, deployment: Deployment) -> bool:
        """For the metrics: its breaker is not open and it has a key not retired (a cooling key is only busy)."""
        return (
            self.breakers[deployment.name].state is not BreakerState.OPEN
            and not self.pools[deployment.name].all_retired()
        )

    def healthy_count(self, route: ModelRoute) -> int:
        return sum(self.healthy(deployment) for deployment in route.deployments)

    def cooling_until(self, routes: Iterable[ModelRoute]) -> float | None:
        """The earliest time a deployment of `routes` that only waits for a cooling key (its breaker lets calls
        through) has one again; None when none is in that case."""
        times = []
        for route in routes:
            for deployment in route.deployments:
                if not self.breakers[deployment.name].allows():
                    continue
                at = self.pools[deployment.name].usable_at()
                if at is not None:
                    times.append(at)
        return min(times) if times else None

    def open_until(self, routes: Iterable[ModelRoute]) -> float | None:
        """The earliest time an open breaker of `routes` (of a deployment with a key left) lets a probe through."""
        times = []
        for route in routes:
            for deployment in route.deployments:
                at = self.breakers[deployment.name].open_until()
                if at is not None and not self.pools[deployment.name].all_retired():
                    times.append(at)
        return min(times) if times else None

    def retire_key(self, deployment: Deployment, index: int, status: int | None) -> None:
        if self.pools[deployment.name].retire(index):
            log.error(
                "model_key_retired",
                extra={"deployment": deployment.name, "key_index": index, "http_status": status},
            )

    def now(self) -> float:
        return self._clock()


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset(value: str | None) -> float | None:
    """Seconds of an `x-ratelimit-reset-*` header ("1s", "6m0s", "20ms", "1h2m3.5s", or a bare number of
    seconds); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            return None
        number, unit = float(match.group(1)), match.group(2)
        total += number * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        position = match.end()
    return total if position == len(value) and position > 0 else None
