"""The gateway's turn: a request that names no knowledge bases goes to dialogue with its tenant's defaults."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from chatmesh.gateway.admission import Admission
from chatmesh.gateway.auth import DEFAULT_TENANT, Authenticator
from chatmesh.gateway.service import ChatGateway
from chatmesh.runtime.settings import GatewaySettings
from chatmesh.tenancy.directory import MemoryTenantDirectory
from chatmesh.tenancy.ledger import create_usage_ledger
from chatmesh.tenancy.limits import Limits
from chatmesh.tenancy.metrics import TenantMetrics
from chatmesh.v1 import chat_pb2, dialogue_pb2


class RecordingDialogue:
    """Dialogue's stub, keeping each TurnRequest and answering with no events."""

    def __init__(self) -> None:
        self.turns: list[dialogue_pb2.TurnRequest] = []

    def RunTurn(self, request: dialogue_pb2.TurnRequest, timeout: float) -> NoEvents:
        self.turns.append(request)
        return NoEvents()


class NoEvents:
    def __aiter__(self) -> NoEvents:
        return self

    async def __anext__(self) -> chat_pb2.ChatEvent:
        raise StopAsyncIteration

    def cancel(self) -> None:
        pass


class CallContext:
    """A call without metadata, with time to run; an abort fails the test."""

    def invocation_metadata(self) -> tuple:
        return ()

    def time_remaining(self) -> float:
        return 10.0

    async def send_initial_metadata(self, metadata: Any) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, message: str, trailing_metadata: Any = ()) -> None:
        raise AssertionError(f"aborted: {code.name}: {message}")


@pytest.fixture
async def gateway_and_dialogue() -> tuple[ChatGateway, RecordingDialogue]:
    """A gateway without authentication (so calls are the tenant `default`), whose tenant has default knowledge
    bases."""
    settings = GatewaySettings(auth="off", auth_cache_seconds=0.0)
    directory = MemoryTenantDirectory()
    await directory.create_tenant(DEFAULT_TENANT, Limits(), now=1.0, knowledge_bases=["help", "billing"])
    dialogue = RecordingDialogue()
    admission = Admission(settings, create_usage_ledger(None), TenantMetrics(0))
    gateway = ChatGateway(settings, dialogue, Authenticator(settings, directory), admission, usage=None)  # type: ignore[arg-type]
    return gateway, dialogue


async def turn_options(gateway: ChatGateway, dialogue: RecordingDialogue, **options: Any) -> chat_pb2.ChatOptions:
    request = chat_pb2.ChatRequest(user_id="u1", message="hello", options=chat_pb2.ChatOptions(**options))
    assert [event async for event in gateway.StreamChat(request, CallContext())] == []  # type: ignore[arg-type]
    return dialogue.turns[-1].request.options


async def test_a_request_that_names_no_knowledge_bases_searches_its_tenants_defaults(
    gateway_and_dialogue: tuple[ChatGateway, RecordingDialogue],
) -> None:
    gateway, dialogue = gateway_and_dialogue
    assert list((await turn_options(gateway, dialogue)).knowledge_bases) == ["help", "billing"]


async def test_a_request_that_names_knowledge_bases_searches_those_alone(
    gateway_and_dialogue: tuple[ChatGateway, RecordingDialogue],
) -> None:
    gateway, dialogue = gateway_and_dialogue
    options = await turn_options(gateway, dialogue, knowledge_bases=["faq"])
    assert list(options.knowledge_bases) == ["faq"]
