"""Turns answered from a knowledge base, on a real cluster with Redis and modelsim: the best chunks go into the
window as numbered sources, the reply's citations come back in Completed, a cached answer keeps them and is shared
only under the same version of the knowledge base, and one tenant never reads another's. The model may also search
the turn's knowledge bases itself (the server-side tool knowledge_search), and cite what it found."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from support.cluster import Cluster
from support.knowledge import CORPUS
from support.redis_server import RedisServer

from chatmesh.dialogue.grounding import INSTRUCTION, SEARCH_INSTRUCTION
from chatmesh.dialogue.knowledge.documents import read_documents
from chatmesh.dialogue.server_tools import KNOWLEDGE_SEARCH, NO_KNOWLEDGE_BASES
from chatmesh.v1 import admin_pb2, admin_pb2_grpc, chat_pb2, chat_pb2_grpc, knowledge_pb2, knowledge_pb2_grpc

TENANT = "default"  # auth is off: every caller is the default tenant
KNOWLEDGE_BASE = "handbook"
QUESTION = "Can I get my money back for an annual subscription?"
ANSWERED_BY = ("en/plans-and-billing.md", "Plans and billing > Refunds")
CHINESE_QUESTION = "可以用公司的单点登录账号登录吗？"  # noqa: RUF001
CHINESE_ANSWERED_BY = ("zh/快速入门.md", "Kestrel 同步快速入门 > 登录账号")
ATTEMPTS = 100
# A numbered source's head, `[n] title (source)`, on a line of its own.
SOURCE_HEAD = re.compile(r"^\[(\d+)\] (.+) \(([^()\n]+)\)$", re.MULTILINE)


@pytest.fixture(scope="module")
def cluster(module_redis: RedisServer) -> Iterator[Cluster]:
    # A dialogue process sees a knowledge base's new version within this time (a second by default).
    with Cluster(redis_url=module_redis.url, env={"CHATMESH_KNOWLEDGE_VERSION_CHECK_SECONDS": "0.05"}) as running:
        yield running


def documents(root: Path) -> list[knowledge_pb2.KnowledgeDocument]:
    return [
        knowledge_pb2.KnowledgeDocument(
            path=document.path,
            content=document.content.encode() if isinstance(document.content, str) else document.content,
            media_type=document.media_type,
        )
        for document in read_documents(root)
    ]


async def ingest(
    knowledge: knowledge_pb2_grpc.KnowledgeServiceStub,
    tenant: str,
    name: str,
    docs: list[knowledge_pb2.KnowledgeDocument],
) -> knowledge_pb2.IngestDocumentsResponse:
    request = knowledge_pb2.IngestDocumentsRequest(tenant=tenant, knowledge_base=name, documents=docs)
    return await knowledge.IngestDocuments(request, timeout=60)


@pytest.fixture
async def stubs(
    cluster: Cluster,
) -> AsyncIterator[tuple[chat_pb2_grpc.ChatServiceStub, knowledge_pb2_grpc.KnowledgeServiceStub]]:
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        knowledge = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
        await ingest(knowledge, TENANT, KNOWLEDGE_BASE, documents(CORPUS))
        yield chat, knowledge


async def ask(
    chat: chat_pb2_grpc.ChatServiceStub, message: str, *knowledge_bases: str, user_id: str = "reader"
) -> chat_pb2.ChatResponse:
    request = chat_pb2.ChatRequest(
        user_id=user_id, message=message, options=chat_pb2.ChatOptions(knowledge_bases=knowledge_bases)
    )
    return await chat.Chat(request, timeout=30)


async def until_cached(
    chat: chat_pb2_grpc.ChatServiceStub, message: str, *knowledge_bases: str
) -> chat_pb2.ChatResponse:
    for _ in range(ATTEMPTS):
        response = await ask(chat, message, *knowledge_bases)
        if response.cached:
            return response
        await asyncio.sleep(0.05)
    return response


@pytest.mark.parametrize(
    ("question", "answered_by"), [(QUESTION, ANSWERED_BY), (CHINESE_QUESTION, CHINESE_ANSWERED_BY)]
)
async def test_the_chunk_that_answers_is_among_the_sources_and_completed_names_what_the_reply_cites(
    cluster: Cluster, stubs, question: str, answered_by: tuple[str, str]
) -> None:
    chat, _ = stubs
    cluster.sim_reset()

    reply = await ask(chat, question, KNOWLEDGE_BASE)

    sent = cluster.sim_requests(1)[0]["messages"]
    sources = [m["content"] for m in sent if m["role"] == "system" and m["content"].startswith(INSTRUCTION)]
    assert len(sources) == 1 and f"] {answered_by[1]} ({answered_by[0]})" in sources[0]
    assert sent[-1] == {"role": "user", "content": question}
    assert not reply.cached and len(reply.citations) == 1
    cited = reply.citations[0]
    assert cited.knowledge_base == KNOWLEDGE_BASE
    assert f"[{cited.number}] {cited.title} ({cited.source})\n" in sources[0]
    assert reply.text.endswith(f"[{cited.number}]")


async def test_without_knowledge_bases_the_window_has_no_sources_and_the_reply_no_citations(
    cluster: Cluster, stubs
) -> None:
    chat, _ = stubs
    cluster.sim_reset()

    reply = await ask(chat, QUESTION + " (plain)")

    assert not reply.citations
    assert all(m["role"] != "system" for m in cluster.sim_requests(1)[0]["messages"])


async def test_a_cached_answer_keeps_its_citations_and_a_new_version_is_not_answered_from_it(
    stubs, tmp_path: Path
) -> None:
    chat, knowledge = stubs
    first = await ask(chat, "How do refunds of a yearly plan work?", KNOWLEDGE_BASE)
    cached = await until_cached(chat, "How do refunds of a yearly plan work?", KNOWLEDGE_BASE)
    assert cached.cached and list(cached.citations) == list(first.citations) and first.citations

    changed = tmp_path / "changed.md"
    changed.write_text("# Changelog\n\nVersion 2 adds shared links.\n", encoding="utf-8")
    await ingest(knowledge, TENANT, KNOWLEDGE_BASE, documents(changed))
    await asyncio.sleep(0.1)

    after_change = await ask(chat, "How do refunds of a yearly plan work?", KNOWLEDGE_BASE)
    assert not after_change.cached


async def test_a_tenant_never_answers_from_another_tenants_knowledge_base(
    cluster: Cluster, stubs, tmp_path: Path
) -> None:
    chat, knowledge = stubs
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        await admin_pb2_grpc.AdminServiceStub(channel).CreateTenant(
            admin_pb2.CreateTenantRequest(name="another-tenant"), timeout=10
        )
    secret = tmp_path / "secret.md"
    secret.write_text("# Launch codes\n\nThe launch code of the money back plan is 0000.\n", encoding="utf-8")
    await ingest(knowledge, "another-tenant", "secrets", documents(secret))

    reply = await ask(chat, "What is the launch code of the money back plan?", "secrets")

    assert not reply.citations
    assert "0000" not in reply.text


def numbered_sources(text: str) -> dict[int, tuple[str, str]]:
    """The sources a text numbers: number -> (source, title)."""
    return {int(number): (source, title) for number, title, source in SOURCE_HEAD.findall(text)}


async def ask_searching(
    chat: chat_pb2_grpc.ChatServiceStub, message: str, *knowledge_bases: str
) -> chat_pb2.ChatResponse:
    request = chat_pb2.ChatRequest(
        user_id="reader",
        message=message,
        options=chat_pb2.ChatOptions(knowledge_bases=knowledge_bases, server_tools=[KNOWLEDGE_SEARCH]),
    )
    return await chat.Chat(request, timeout=30)


async def test_knowledge_search_gives_the_model_more_sources_numbered_after_the_windows_and_the_reply_cites_them(
    cluster: Cluster, stubs
) -> None:
    chat, _ = stubs
    cluster.sim_reset()
    # The window's sources are found for the whole message; the model searches for the Chinese question alone.
    arguments = json.dumps({"query": CHINESE_QUESTION, "k": 6}, ensure_ascii=False)

    reply = await ask_searching(chat, f"{QUESTION} call {KNOWLEDGE_SEARCH} {arguments}", KNOWLEDGE_BASE)

    (call,) = reply.tool_calls
    assert (call.name, call.server_side) == (KNOWLEDGE_SEARCH, True)
    (result,) = reply.tool_results
    assert result.call_id == call.id and not result.is_error
    assert result.content.startswith(SEARCH_INSTRUCTION + "\n\n")
    first_call = cluster.sim_requests(2)[0]["messages"]
    (window_message,) = [m["content"] for m in first_call if m["role"] == "system"]
    in_window = numbered_sources(window_message)
    found = numbered_sources(result.content)
    assert len(found) == 6 and CHINESE_ANSWERED_BY in found.values()
    # A passage the window numbers keeps its number; the others are numbered after the window's, in order.
    kept = {number: head for number, head in found.items() if head in in_window.values()}
    added = sorted(number for number in found if number not in kept)
    assert all(in_window[number] == head for number, head in kept.items())
    assert kept and added and added == list(range(len(in_window) + 1, len(in_window) + 1 + len(added)))
    # modelsim answers tool results by repeating them: the reply cites every passage the search gave it.
    assert reply.text == f"tool results: {call.id}={result.content}"
    assert [(c.number, c.knowledge_base, c.source, c.title) for c in reply.citations] == [
        (number, KNOWLEDGE_BASE, *found[number]) for number in sorted(found)
    ]


async def test_knowledge_search_in_a_turn_without_knowledge_bases_tells_the_model_there_are_none(stubs) -> None:
    chat, _ = stubs

    reply = await ask_searching(chat, f'call {KNOWLEDGE_SEARCH} {{"query": "refunds"}}')

    (result,) = reply.tool_results
    assert result.is_error and result.content == NO_KNOWLEDGE_BASES
    assert not reply.citations
