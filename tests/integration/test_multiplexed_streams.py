"""Dialogue's multiplexed streams to cache replicas (chatmesh.runtime.multiplex), over real processes: a replica killed,
restarted or stopped under load makes its calls fail over, or fail with UNAVAILABLE, and none hangs."""

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from support.cache_calls import answer_context, cache_process

from chatmesh.dialogue.main import cache_client
from chatmesh.runtime.channels import open_channel
from chatmesh.runtime.settings import DialogueSettings
from chatmesh.v1 import cache_pb2, cache_pb2_grpc

CALL_SECONDS = 2.0
# Every call ends within its deadline, and a failed-over one within two attempts of it.
BOUND_SECONDS = 2 * CALL_SECONDS + 1


@pytest.fixture
def replicas() -> Iterator[list]:
    processes = [cache_process(None), cache_process(None)]
    for process in processes:
        process.start()
    yield processes
    for process in processes:
        process.stop()


@pytest.fixture
async def cache(replicas) -> AsyncIterator[cache_pb2_grpc.CacheServiceStub]:
    """The cache stub dialogue uses: one channel over both replicas, lookups on four multiplexed streams."""
    settings = DialogueSettings(multiplex_streams=4)
    channel = open_channel(f"ipv4:{','.join(f'127.0.0.1:{process.port}' for process in replicas)}", settings)
    stub, streams = cache_client(channel, settings)
    yield stub
    await streams.close()
    await channel.close()


async def lookups_until(stub, stop: asyncio.Event, concurrency: int = 8) -> list[grpc.StatusCode]:
    """Lookups from `concurrency` callers until `stop` is set (at most 60 s); the status each call ended with."""
    codes: list[grpc.StatusCode] = []
    give_up = time.monotonic() + 60

    async def caller() -> None:
        while not stop.is_set() and time.monotonic() < give_up:
            started = time.monotonic()
            try:
                await stub.Lookup(
                    cache_pb2.LookupRequest(context=answer_context(uuid.uuid4().hex)), timeout=CALL_SECONDS
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as error:
                codes.append(error.code())
                await asyncio.sleep(0.01)
            assert time.monotonic() - started < BOUND_SECONDS, "a call outlived its deadline"

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return codes


async def test_a_replica_killed_under_load_fails_its_calls_over_or_with_unavailable_and_its_restart_serves(
    replicas, cache
):
    stop = asyncio.Event()
    load = asyncio.ensure_future(lookups_until(cache, stop))
    await asyncio.sleep(0.5)
    # In threads: the load must go on meanwhile.
    await asyncio.to_thread(replicas[0].kill)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(replicas[0].start)
    await asyncio.sleep(1.0)
    stop.set()
    codes = await asyncio.wait_for(load, 30)

    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    assert codes.count(grpc.StatusCode.OK) > 100
    # After the restart every call is answered.
    answered = await asyncio.gather(
        *(cache.Lookup(cache_pb2.LookupRequest(context=answer_context()), timeout=CALL_SECONDS) for _ in range(20))
    )
    assert len(answered) == 20


async def test_a_replica_stopped_with_sigterm_under_load_loses_no_call(replicas, cache):
    stop = asyncio.Event()
    load = asyncio.ensure_future(lookups_until(cache, stop))
    await asyncio.sleep(0.5)
    replicas[1].signal(signal.SIGTERM)
    await asyncio.sleep(1.5)
    stop.set()
    codes = await asyncio.wait_for(load, 30)

    # The draining replica answered what it had read and ended its streams; the rest went to the other one.
    assert set(codes) == {grpc.StatusCode.OK}
