"""Knowledge bases as an operator runs them: KnowledgeService and `chatmesh kb` on a real gateway, dialogue and Redis,
with modelsim's embeddings.

One cluster for the module, keys required; each test makes tenants of its own, so that their knowledge bases never
meet.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from redis.asyncio import Redis
from support.cli import chatmesh_cli
from support.cluster import Cluster
from support.knowledge import CORPUS, DIMENSIONS, EMBEDDING_MODEL
from support.redis_server import RedisServer

from chatmesh.dialogue.knowledge.chunking import Chunk
from chatmesh.dialogue.knowledge.store import RedisKnowledgeStore
from chatmesh.v1 import admin_pb2, admin_pb2_grpc, chat_pb2, chat_pb2_grpc, knowledge_pb2, knowledge_pb2_grpc

ADMIN_TOKEN = "knowledge-admin-token"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
CORPUS_PATHS = sorted(path.relative_to(CORPUS).as_posix() for path in CORPUS.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def cluster(module_redis: RedisServer) -> Iterator[Cluster]:
    with Cluster(
        redis_url=module_redis.url,
        env={"CHATMESH_AUTH": "required", "CHATMESH_ADMIN_TOKEN": ADMIN_TOKEN},
    ) as running:
        yield running


@pytest.fixture
async def admin(cluster: Cluster) -> AsyncIterator[admin_pb2_grpc.AdminServiceStub]:
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


@pytest.fixture
async def knowledge(cluster: Cluster) -> AsyncIterator[knowledge_pb2_grpc.KnowledgeServiceStub]:
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        yield knowledge_pb2_grpc.KnowledgeServiceStub(channel)


@pytest.fixture
async def redis(module_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(module_redis.url)
    try:
        yield client
    finally:
        await client.aclose()


async def new_tenant(admin: admin_pb2_grpc.AdminServiceStub) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=name), metadata=ADMIN)
    return name


@pytest.fixture
async def tenant(admin: admin_pb2_grpc.AdminServiceStub) -> str:
    return await new_tenant(admin)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A copy of the shipped corpus (English and Chinese), for a test to change."""
    return Path(shutil.copytree(CORPUS, tmp_path / "corpus"))


def kb(cluster: Cluster, *args: str, token: str | None = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    """`chatmesh kb ARGS…` against the cluster's gateway, with the admin token (or `token`)."""
    env = {"CHATMESH_ADMIN_TOKEN": token or ""}
    return chatmesh_cli("kb", *args, "--target", cluster.gateway_target, env=env)


def answer(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ingest(cluster: Cluster, path: Path, tenant: str, *flags: str, name: str = "help") -> dict:
    return answer(kb(cluster, "ingest", str(path), "--kb", name, "--tenant", tenant, *flags))


def listed(cluster: Cluster, tenant: str) -> dict[str, dict]:
    return {base["name"]: base for base in answer(kb(cluster, "list", "--tenant", tenant)).get("knowledge_bases", [])}


async def keys_of(redis: Redis, tenant: str) -> list[str]:
    return sorted([key.decode() async for key in redis.scan_iter(match=f"chatmesh:kb:{{{tenant}}}:*", count=1000)])


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    request = error_details_pb2.BadRequest()
    status.details[0].Unpack(request)
    return [violation.field for violation in request.field_violations]


async def failure_of(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    return raised.value


def document(
    path: str, content: bytes = b"# Title\n\nSome text.\n", media_type: str = ""
) -> knowledge_pb2.KnowledgeDocument:
    return knowledge_pb2.KnowledgeDocument(path=path, content=content, media_type=media_type)


async def test_the_corpus_is_ingested_through_the_cli_and_kept_in_redis_without_expiry(
    cluster: Cluster, tenant: str, corpus: Path, redis: Redis
) -> None:
    report = ingest(cluster, corpus, tenant)

    assert report["added"] == CORPUS_PATHS
    assert report["replaced"] == report["unchanged"] == report["removed"] == []
    assert report["chunks"] >= len(CORPUS_PATHS) and report["version"]
    base = listed(cluster, tenant)["help"]
    assert base["documents"] == len(CORPUS_PATHS) and base["chunks"] == report["chunks"]
    assert base["version"] == report["version"]
    assert (base["embedding_model"], base["dimensions"]) == (EMBEDDING_MODEL, DIMENSIONS)
    assert base["update_time"]
    keys = await keys_of(redis, tenant)
    assert keys == sorted([RedisKnowledgeStore.names_key(tenant), *RedisKnowledgeStore.keys(tenant, "help")])
    # Operator data: kept until deleted.
    assert [await redis.ttl(key) for key in keys] == [-1] * len(keys)


async def test_ingesting_again_replaces_what_changed_adds_what_is_new_and_embeds_nothing_else(
    cluster: Cluster, tenant: str, corpus: Path
) -> None:
    first = ingest(cluster, corpus, tenant)
    sharing = corpus / "en" / "sharing.md"
    sharing.write_text(sharing.read_text() + "\n## Transfers\n\nAn owner can hand a shared folder to a member.\n")
    (corpus / "zh" / "新功能.md").write_text("# 新功能\n\n离线文件夹现在可以在手机上使用。\n", encoding="utf-8")
    before = cluster.sim_stats()["embedding_requests"]

    second = ingest(cluster, corpus, tenant)

    assert second["replaced"] == ["en/sharing.md"] and second["added"] == ["zh/新功能.md"]
    assert second["unchanged"] == [path for path in CORPUS_PATHS if path != "en/sharing.md"]
    assert second["removed"] == [] and second["version"] != first["version"]
    # The two documents that changed are embedded in one request; the others are skipped by digest.
    assert cluster.sim_stats()["embedding_requests"] == before + 1
    assert listed(cluster, tenant)["help"]["documents"] == len(CORPUS_PATHS) + 1

    unchanged = ingest(cluster, corpus, tenant)
    assert unchanged["added"] == unchanged["replaced"] == [] and unchanged["chunks"] == 0
    assert unchanged["version"] == second["version"]
    assert cluster.sim_stats()["embedding_requests"] == before + 1


async def test_prune_deletes_the_documents_no_longer_there_across_every_batch(
    cluster: Cluster, tenant: str, tmp_path: Path
) -> None:
    # 70 documents: more than the CLI sends in one request (64), so that pruning sees the paths of both.
    folder = tmp_path / "notes"
    folder.mkdir()
    for number in range(70):
        (folder / f"note-{number:02d}.md").write_text(f"# Note {number}\n\nThe note about topic {number}.\n")
    assert len(ingest(cluster, folder, tenant)["added"]) == 70
    (folder / "note-03.md").unlink()
    (folder / "note-66.md").unlink()

    without_prune = ingest(cluster, folder, tenant)
    assert without_prune["removed"] == [] and listed(cluster, tenant)["help"]["documents"] == 70

    pruned = ingest(cluster, folder, tenant, "--prune")
    assert pruned["removed"] == ["note-03.md", "note-66.md"]
    assert len(pruned["unchanged"]) == 68 and pruned["version"] != without_prune["version"]
    assert listed(cluster, tenant)["help"]["documents"] == 68


async def test_a_document_and_then_the_knowledge_base_are_deleted_with_every_key(
    cluster: Cluster, tenant: str, corpus: Path, redis: Redis
) -> None:
    ingest(cluster, corpus, tenant)
    ingest(cluster, corpus / "en", tenant, name="english")

    deleted = answer(kb(cluster, "delete", "help", "--tenant", tenant, "--document", "en/sharing.md"))
    assert deleted["version"] == listed(cluster, tenant)["help"]["version"]
    assert listed(cluster, tenant)["help"]["documents"] == len(CORPUS_PATHS) - 1
    assert "NOT_FOUND" in kb(cluster, "delete", "help", "--tenant", tenant, "--document", "en/sharing.md").stderr

    assert answer(kb(cluster, "delete", "help", "--tenant", tenant)) == {}
    assert list(listed(cluster, tenant)) == ["english"]
    assert not [key for key in await keys_of(redis, tenant) if key.startswith(f"chatmesh:kb:{{{tenant}}}:help:")]
    assert await redis.smembers(RedisKnowledgeStore.names_key(tenant)) == {b"english"}
    again = kb(cluster, "delete", "help", "--tenant", tenant)
    assert again.returncode == 1 and f"error: NOT_FOUND: tenant {tenant} has no knowledge base help" in again.stderr


async def test_another_tenant_neither_lists_nor_deletes_a_knowledge_base(
    cluster: Cluster, admin: admin_pb2_grpc.AdminServiceStub, tenant: str, corpus: Path
) -> None:
    ingest(cluster, corpus / "zh", tenant)
    other = await new_tenant(admin)

    assert listed(cluster, other) == {}
    refused = kb(cluster, "delete", "help", "--tenant", other)
    assert refused.returncode == 1 and "NOT_FOUND" in refused.stderr
    assert "NOT_FOUND" in kb(cluster, "delete", "help", "--tenant", other, "--document", "zh/快速入门.md").stderr
    # Its own knowledge base of the same name is another one.
    ingest(cluster, corpus / "en", other)
    assert listed(cluster, tenant)["help"]["documents"] == 4 and listed(cluster, other)["help"]["documents"] == 5


async def test_every_call_needs_the_admin_token(
    cluster: Cluster,
    admin: admin_pb2_grpc.AdminServiceStub,
    knowledge: knowledge_pb2_grpc.KnowledgeServiceStub,
    tenant: str,
    corpus: Path,
) -> None:
    created = await admin.CreateKey(admin_pb2.CreateKeyRequest(tenant=tenant), metadata=ADMIN)
    for token in (None, "not-the-token", created.api_key):
        result = kb(cluster, "ingest", str(corpus), "--kb", "help", "--tenant", tenant, token=token)
        assert result.returncode == 1 and "error: UNAUTHENTICATED" in result.stderr
        assert "UNAUTHENTICATED" in kb(cluster, "list", "--tenant", tenant, token=token).stderr
    for call in (
        knowledge.DeleteKnowledgeBase(knowledge_pb2.DeleteKnowledgeBaseRequest(tenant=tenant, knowledge_base="help")),
        knowledge.DeleteDocument(
            knowledge_pb2.DeleteDocumentRequest(tenant=tenant, knowledge_base="help", path="a.md")
        ),
    ):
        assert (await failure_of(call)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert listed(cluster, tenant) == {}


async def test_bad_names_and_documents_are_refused_naming_each_field(
    knowledge: knowledge_pb2_grpc.KnowledgeServiceStub, tenant: str
) -> None:
    refused = await failure_of(
        knowledge.IngestDocuments(
            knowledge_pb2.IngestDocumentsRequest(
                tenant="Not A Tenant",
                knowledge_base="bad name!",
                documents=[
                    document("a.md"),
                    document("a.md"),
                    document("notes.docx"),
                    document("b.md", media_type="application/msword"),
                    document(""),
                ],
                keep_paths=["a.md"],
            ),
            metadata=ADMIN,
        )
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(refused) == [
        "tenant",
        "knowledge_base",
        "documents[1].path",
        "documents[2].media_type",
        "documents[3].media_type",
        "documents[4].path",
        "keep_paths",
    ]
    empty = await failure_of(
        knowledge.IngestDocuments(
            knowledge_pb2.IngestDocumentsRequest(tenant=tenant, knowledge_base="help"), metadata=ADMIN
        )
    )
    assert bad_fields(empty) == ["documents"]
    for call in (
        knowledge.ListKnowledgeBases(knowledge_pb2.ListKnowledgeBasesRequest(tenant=""), metadata=ADMIN),
        knowledge.DeleteKnowledgeBase(
            knowledge_pb2.DeleteKnowledgeBaseRequest(tenant=tenant, knowledge_base="-dash"), metadata=ADMIN
        ),
    ):
        assert (await failure_of(call)).code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_document_that_cannot_be_read_is_refused_by_its_path_and_nothing_is_written(
    cluster: Cluster, knowledge: knowledge_pb2_grpc.KnowledgeServiceStub, tenant: str
) -> None:
    refused = await failure_of(
        knowledge.IngestDocuments(
            knowledge_pb2.IngestDocumentsRequest(
                tenant=tenant,
                knowledge_base="help",
                documents=[document("good.md"), document("broken.txt", b"caf\xe9 latin-1, not UTF-8\n")],
            ),
            metadata=ADMIN,
        )
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "broken.txt: not valid utf-8" in refused.details().lower() and bad_fields(refused) == ["documents"]
    assert listed(cluster, tenant) == {}


async def test_an_unknown_tenant_gets_no_knowledge_base(cluster: Cluster, corpus: Path) -> None:
    result = kb(cluster, "ingest", str(corpus), "--kb", "help", "--tenant", "nobody-here")
    assert result.returncode == 1 and "error: NOT_FOUND: tenant nobody-here not found" in result.stderr


async def test_a_knowledge_base_embedded_with_another_model_is_refused_until_deleted(
    cluster: Cluster, module_redis: RedisServer, tenant: str, corpus: Path
) -> None:
    store = RedisKnowledgeStore.from_url(module_redis.url)
    try:
        chunk = Chunk("old.md", "Old", 0, "embedded elsewhere", 3)
        await store.upsert_document(tenant, "help", "old.md", "d", [chunk], [[1.0] * 8], embedding_model="other-model")
    finally:
        await store.close()

    refused = kb(cluster, "ingest", str(corpus), "--kb", "help", "--tenant", tenant)
    assert refused.returncode == 1 and "error: FAILED_PRECONDITION" in refused.stderr
    assert "delete it and ingest its documents again" in refused.stderr

    answer(kb(cluster, "delete", "help", "--tenant", tenant))
    assert ingest(cluster, corpus, tenant)["added"] == CORPUS_PATHS


async def test_an_embedding_endpoint_that_fails_is_unavailable_and_ingesting_again_finishes(
    cluster: Cluster, tenant: str, corpus: Path
) -> None:
    cluster.sim_config(embedding_error_status=500)
    try:
        failed = kb(cluster, "ingest", str(corpus), "--kb", "help", "--tenant", tenant)
    finally:
        cluster.sim_config(embedding_error_status=0)
    assert failed.returncode == 1 and "error: UNAVAILABLE: the embedding endpoint failed" in failed.stderr

    cluster.sim_config(embedding_error_status=404)
    try:
        rejected = kb(cluster, "ingest", str(corpus), "--kb", "help", "--tenant", tenant)
    finally:
        cluster.sim_config(embedding_error_status=0)
    assert "error: FAILED_PRECONDITION: the embedding endpoint refused the request" in rejected.stderr

    assert ingest(cluster, corpus, tenant)["added"] == CORPUS_PATHS


def tenants(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return chatmesh_cli("tenants", *args, "--target", cluster.gateway_target, env={"CHATMESH_ADMIN_TOKEN": ADMIN_TOKEN})


async def test_a_tenants_default_knowledge_bases_are_stored_changed_and_cleared_apart_from_its_limits(
    cluster: Cluster,
) -> None:
    name = f"t-{uuid.uuid4().hex[:12]}"
    created = answer(
        tenants(cluster, "create", name, "--requests-per-minute", "60", "--knowledge-bases", "help,billing")
    )
    assert created["tenant"]["knowledge_bases"] == ["help", "billing"]
    assert answer(tenants(cluster, "get", name))["tenant"]["knowledge_bases"] == ["help", "billing"]

    changed = answer(tenants(cluster, "update", name, "--knowledge-bases", "faq"))["tenant"]
    assert changed["knowledge_bases"] == ["faq"] and changed["limits"] == {"requests_per_minute": "60"}
    limited = answer(tenants(cluster, "update", name, "--requests-per-minute", "5"))["tenant"]
    assert limited["knowledge_bases"] == ["faq"] and limited["limits"] == {"requests_per_minute": "5"}
    listed_tenant = next(t for t in answer(tenants(cluster, "list"))["tenants"] if t["name"] == name)
    assert listed_tenant["knowledge_bases"] == ["faq"]

    cleared = answer(tenants(cluster, "update", name, "--clear", "knowledge_bases"))["tenant"]
    assert "knowledge_bases" not in cleared and cleared["limits"] == {"requests_per_minute": "5"}


async def test_bad_default_knowledge_bases_are_refused_naming_each(
    cluster: Cluster, admin: admin_pb2_grpc.AdminServiceStub, tenant: str
) -> None:
    refused = tenants(cluster, "update", tenant, "--knowledge-bases", "help,bad name,help")
    assert refused.returncode == 1 and "error: INVALID_ARGUMENT" in refused.stderr
    too_many = await failure_of(
        admin.CreateTenant(
            admin_pb2.CreateTenantRequest(name=f"{tenant}-2", knowledge_bases=[f"kb{n}" for n in range(9)]),
            metadata=ADMIN,
        )
    )
    assert bad_fields(too_many) == ["knowledge_bases"]
    repeated = await failure_of(
        admin.UpdateTenant(
            admin_pb2.UpdateTenantRequest(
                name=tenant,
                knowledge_bases=["help", "bad name", "help"],
                update_mask=field_mask_pb2.FieldMask(paths=["knowledge_bases"]),
            ),
            metadata=ADMIN,
        )
    )
    assert bad_fields(repeated) == ["knowledge_bases[1]", "knowledge_bases[2]"]
    assert "knowledge_bases" not in answer(tenants(cluster, "get", tenant))["tenant"]


async def test_a_turn_that_names_no_knowledge_bases_is_answered_from_its_tenants_defaults(
    cluster: Cluster, corpus: Path
) -> None:
    name = f"t-{uuid.uuid4().hex[:12]}"
    answer(tenants(cluster, "create", name, "--knowledge-bases", "help"))
    ingest(cluster, corpus, name)
    api_key = json.loads(
        chatmesh_cli(
            "keys",
            "create",
            "--tenant",
            name,
            "--target",
            cluster.gateway_target,
            env={"CHATMESH_ADMIN_TOKEN": ADMIN_TOKEN},
        ).stdout
    )["api_key"]
    async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)

        async def ask(*knowledge_bases: str) -> chat_pb2.ChatResponse:
            request = chat_pb2.ChatRequest(
                user_id="reader",
                message="Can I get my money back for an annual subscription?",
                options=chat_pb2.ChatOptions(knowledge_bases=knowledge_bases),
            )
            return await chat.Chat(request, metadata=(("authorization", f"Bearer {api_key}"),), timeout=30)

        defaults = await ask()
        assert defaults.citations and {citation.knowledge_base for citation in defaults.citations} == {"help"}
        # A request's own knowledge bases replace the defaults (this one does not exist: nothing to cite).
        assert not (await ask("other")).citations
