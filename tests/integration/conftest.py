"""Integration fixtures: a real cluster on free loopback ports, and a client of its gateway."""

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from support.cluster import Cluster
from support.redis_server import RedisServer

from chatmesh.v1 import chat_pb2_grpc


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One cluster (memory store) shared by the tests of a module; the simulator is reset per test."""
    with Cluster() as running:
        yield running


@pytest.fixture
def sim(cluster: Cluster) -> Iterator[Cluster]:
    cluster.sim_reset()
    cluster.sim_config(first_token_latency_seconds=0, token_delay_seconds=0, reply_tokens=12)
    yield cluster
    cluster.sim_reset()


@pytest.fixture
async def chat(cluster: Cluster) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    """A Redis of the module's own, for a cluster shared by its tests (the session's Redis is emptied before
    each test that asks for `redis_url`)."""
    server = RedisServer.start()
    try:
        yield server
    finally:
        server.stop()
