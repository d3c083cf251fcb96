"""Safety processes for integration tests: a stub on a target, one more safety process beside a cluster's, and
waiting for a process to log an event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

from chatmesh.v1 import safety_pb2_grpc

from .cluster import Cluster, ServiceProcess, log_lines
from .ports import free_port

POLLS = 400  # at most 400 polls 50 ms apart (20 s)
POLL_SECONDS = 0.05


@asynccontextmanager
async def safety_stub(target: str) -> AsyncIterator[safety_pb2_grpc.SafetyServiceStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield safety_pb2_grpc.SafetyServiceStub(channel)


@asynccontextmanager
async def safety_process(cluster: Cluster, log_dir: Path, **env: str) -> AsyncIterator[ServiceProcess]:
    """One more safety process, with the cluster's settings changed by `env`, logging into `log_dir` (made if
    missing); stopped when done."""
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    port = free_port()
    ports = {"CHATMESH_SAFETY_PORT": str(port), "CHATMESH_SAFETY_METRICS_PORT": str(free_port())}
    process = ServiceProcess("safety", port, {**cluster.env, **ports, **env}, log_dir)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@asynccontextmanager
async def another_safety(
    cluster: Cluster, log_dir: Path, **env: str
) -> AsyncIterator[safety_pb2_grpc.SafetyServiceStub]:
    """A stub of one more safety process (see safety_process)."""
    async with safety_process(cluster, log_dir, **env) as process, safety_stub(f"127.0.0.1:{process.port}") as stub:
        yield stub


async def poll_log(process: ServiceProcess, event: str) -> dict:
    """The first line the process logged with this event, waiting for it (bounded)."""
    for _ in range(POLLS):
        for line in log_lines(process.log()):
            if line.get("event") == event:
                return line
        await asyncio.sleep(POLL_SECONDS)
    raise AssertionError(f"{process.name} did not log {event} within {POLLS} polls")
