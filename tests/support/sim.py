"""modelsim in the test's own event loop, for tests of what talks to it over HTTP (fixture `sim` in
tests/unit/conftest.py)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from chatmesh.modelsim.server import SimConfig, build_app
from chatmesh.runtime.settings import ModelSettings


@dataclass
class Sim:
    base_url: str
    config: SimConfig
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: object = None, *, key: str | None = "x") -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with self.http.request(method, f"{self.base_url}{path}", json=body, headers=headers) as response:
            return response.status, await response.json()

    def settings(self, **fields: object) -> ModelSettings:
        return ModelSettings(
            OPENAI_API_KEY="test-key",
            OPENAI_BASE_URL=f"{self.base_url}/v1",
            model_backoff_initial_seconds=0.01,
            **fields,
        )


@asynccontextmanager
async def running_sim() -> AsyncIterator[Sim]:
    """modelsim on a free loopback port until the block ends."""
    config = SimConfig()
    runner = web.AppRunner(build_app(config))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    http = aiohttp.ClientSession()
    try:
        yield Sim(f"http://127.0.0.1:{runner.addresses[0][1]}", config, http)
    finally:
        await http.close()
        await runner.cleanup()
