"""Fixtures shared by unit tests."""

from collections.abc import AsyncIterator

import pytest
from support.sim import Sim, running_sim

from chatmesh.model.client import ModelClient


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    async with running_sim() as running:
        yield running


@pytest.fixture
async def model_client(sim: Sim) -> AsyncIterator[ModelClient]:
    """chatmesh's model client, pointed at `sim`."""
    client = ModelClient(sim.settings())
    try:
        yield client
    finally:
        await client.close()
