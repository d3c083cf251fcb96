"""A closed-loop load generator bounded by count and by time.

`concurrency` workers each send one call after another until `count` calls have been started or
`seconds` have passed; calls in flight then finish (each has its own timeout), so a segment always
ends. Failed calls are counted, not timed.

Throughput is taken while every worker is busy: calls completed by the moment the first worker stops,
over the time until then. The ramp-down after it (fewer and fewer calls in flight) would otherwise
make short segments at high concurrency look slower than the service is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.clients import Sample

Send = Callable[[int], Awaitable[Sample]]


@dataclass(slots=True)
class Segment:
    """What one run of one target in one round gave."""

    samples: list[Sample] = field(default_factory=list)
    issued: int = 0  # calls started, failed ones included
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    # Calls completed, and seconds elapsed, when the first worker stopped (all of them busy until then).
    saturated_calls: int = 0
    saturated_seconds: float = 0.0
    client_cpu_seconds: float = 0.0


async def run_segment(send: Send, *, concurrency: int, count: int, seconds: float, first_index: int = 0) -> Segment:
    """Runs `send(index)` for indexes first_index, first_index + 1, ... as described above."""
    segment = Segment()
    next_index = first_index
    last_index = first_index + count
    started = time.perf_counter()
    stop_at = started + seconds
    cpu_started = time.process_time()

    async def worker() -> None:
        nonlocal next_index
        await work()
        if not segment.saturated_seconds:
            segment.saturated_seconds = time.perf_counter() - started
            segment.saturated_calls = len(segment.samples)

    async def work() -> None:
        nonlocal next_index
        while next_index < last_index and time.perf_counter() < stop_at:
            index = next_index
            next_index += 1
            try:
                segment.samples.append(await send(index))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a failed call is data, not a reason to stop the run
                segment.errors += 1
                kind = type(error).__name__
                if hasattr(error, "code") and callable(error.code):
                    kind = f"{kind}({error.code().name})"
                segment.error_kinds[kind] = segment.error_kinds.get(kind, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    segment.issued = next_index - first_index
    segment.wall_seconds = time.perf_counter() - started
    segment.client_cpu_seconds = time.process_time() - cpu_started
    return segment
