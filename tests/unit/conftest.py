"""Fixtures shared by unit tests."""

from collections.abc import AsyncIterator

import pytest
from support.sim import Sim, running_sim


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    async with running_sim() as running:
        yield running
