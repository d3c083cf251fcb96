"""ModelClient.embed: the openai SDK's embeddings call against an OpenAI-compatible endpoint (modelsim here)."""

import asyncio

import numpy as np
import pytest
from support.sim import Sim

from chatmesh.model.client import ModelClient
from chatmesh.model.errors import ModelError, ModelErrorKind
from chatmesh.modelsim.embeddings import embed


def deadline(seconds: float = 10) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_each_text_gets_the_providers_vector_in_order_as_unit_float32(model_client: ModelClient) -> None:
    texts = ["How do I reset my password?", "怎么重置密码？"]  # noqa: RUF001

    vectors = await model_client.embed(texts, model="text-embedding-3-small", dimensions=256, deadline=deadline())

    assert [vector.dtype for vector in vectors] == [np.float32, np.float32]
    assert [vector.shape for vector in vectors] == [(256,), (256,)]
    for text, vector in zip(texts, vectors, strict=True):
        np.testing.assert_allclose(vector, np.array(embed(text, 256), dtype=np.float32), rtol=1e-5, atol=1e-6)
        assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5)


async def test_dimensions_zero_asks_for_the_models_own(model_client: ModelClient) -> None:
    (vector,) = await model_client.embed(["hello"], model="text-embedding-3-small", dimensions=0, deadline=deadline())

    assert vector.shape == (1536,)


async def test_a_failing_endpoint_is_a_model_error_at_once_without_retries(sim: Sim, model_client: ModelClient) -> None:
    sim.config.embedding_error_status = 500

    with pytest.raises(ModelError) as failure:
        await model_client.embed(["hello"], model="text-embedding-3-small", dimensions=256, deadline=deadline())

    assert failure.value.kind is ModelErrorKind.UNAVAILABLE
    _, stats = await sim.call("GET", "/sim/stats")
    assert stats["embedding_requests"] == 1


async def test_an_unknown_model_is_rejected(model_client: ModelClient) -> None:
    with pytest.raises(ModelError) as failure:
        await model_client.embed(["hello"], model="no-such-embedder", dimensions=0, deadline=deadline())

    assert failure.value.kind is ModelErrorKind.REJECTED


async def test_a_slow_endpoint_misses_the_deadline(sim: Sim, model_client: ModelClient) -> None:
    sim.config.embedding_latency_seconds = 1

    with pytest.raises(ModelError) as failure:
        await model_client.embed(["hello"], model="text-embedding-3-small", dimensions=256, deadline=deadline(0.2))

    assert failure.value.kind is ModelErrorKind.TIMEOUT


async def test_a_deadline_already_past_sends_nothing(sim: Sim, model_client: ModelClient) -> None:
    with pytest.raises(ModelError) as failure:
        await model_client.embed(["hello"], model="text-embedding-3-small", dimensions=256, deadline=deadline(-1))

    assert failure.value.kind is ModelErrorKind.TIMEOUT
    _, stats = await sim.call("GET", "/sim/stats")
    assert stats["embedding_requests"] == 0
