"""The clients behind `chatmesh tenants …`, `chatmesh keys …`, `chatmesh review …`, `chatmesh kb …` and
`chatmesh usage`: one gRPC call each (`kb ingest`: one per batch of documents), the answer printed as JSON
(protobuf's JSON mapping), errors as `error: CODE: message` with exit status 1."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The parser is built for every `chatmesh` command, gRPC processes included: gRPC and the generated code
# are imported only when a command of this module runs.
if TYPE_CHECKING:
    import grpc
    from google.protobuf.message import Message

    from chatmesh.dialogue.knowledge.documents import SourceDocument
    from chatmesh.v1 import admin_pb2_grpc, chat_pb2, knowledge_pb2_grpc, review_pb2_grpc

# The limit flags of `tenants create|update`, as (flag, TenantLimits field, type).
LIMIT_FLAGS: tuple[tuple[str, str, type], ...] = (
    ("--requests-per-minute", "requests_per_minute", int),
    ("--tokens-per-minute", "tokens_per_minute", int),
    ("--concurrent-streams", "concurrent_streams", int),
    ("--daily-budget-usd", "daily_budget_usd", float),
    ("--monthly-budget-usd", "monthly_budget_usd", float),
)
# What `tenants update --clear` and the update mask call a tenant's default knowledge bases.
KNOWLEDGE_BASES = "knowledge_bases"
# `kb ingest` sends the documents in requests of at most this many documents and bytes of content (a document
# larger than that goes alone), well within the server's limits (CHATMESH_KNOWLEDGE_MAX_DOCUMENTS_PER_REQUEST and
# CHATMESH_GRPC_MAX_MESSAGE_BYTES), so that each request is embedded and answered well within its timeout.
INGEST_BATCH_DOCUMENTS = 64
INGEST_BATCH_BYTES = 4 * 1024 * 1024


def gateway_options(default_target: str) -> argparse.ArgumentParser:
    """The flags of every command that calls the gateway: where it is, and how to trust its certificate."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--target", default=default_target, help="the gateway's host:port")
    options.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the gateway's certificate to the system's CAs"
    )
    options.add_argument("--tls-ca", metavar="FILE", help="connect with TLS, trusting this CA for the gateway")
    return options


def open_gateway_channel(args: argparse.Namespace) -> grpc.aio.Channel:
    """A channel to `args.target`: TLS with `--tls` or `--tls-ca`, else plaintext (for `make run`)."""
    import grpc

    if args.tls_ca:
        with open(args.tls_ca, "rb") as file:
            return grpc.aio.secure_channel(args.target, grpc.ssl_channel_credentials(file.read()))
    if args.tls:
        return grpc.aio.secure_channel(args.target, grpc.ssl_channel_credentials())
    return grpc.aio.insecure_channel(args.target)


def add_commands(commands: Any, default_target: str) -> None:
    """Adds the `tenants`, `keys`, `users`, `review` and `usage` commands to the CLI's subparsers."""
    admin = argparse.ArgumentParser(add_help=False, parents=[gateway_options(default_target)])
    admin.add_argument(
        "--admin-token",
        default=os.environ.get("CHATMESH_ADMIN_TOKEN"),
        help="the admin token (default: $CHATMESH_ADMIN_TOKEN; none is needed when the gateway runs with "
        "CHATMESH_AUTH=off and no token)",
    )

    tenants = commands.add_parser("tenants", help="create, show, list and change tenants (admin)")
    tenant_commands = tenants.add_subparsers(dest="action", required=True)
    create = tenant_commands.add_parser("create", parents=[admin], help="create a tenant, with optional limits")
    create.add_argument("name")
    update = tenant_commands.add_parser(
        "update", parents=[admin], help="change the limits named by the flags; the others stay as they are"
    )
    update.add_argument("name")
    update.add_argument(
        "--clear",
        action="append",
        default=[],
        choices=[*(field for _, field, _ in LIMIT_FLAGS), KNOWLEDGE_BASES],
        help="remove this limit, or the default knowledge bases (repeatable)",
    )
    for parser in (create, update):
        for flag, field, kind in LIMIT_FLAGS:
            parser.add_argument(flag, dest=field, type=kind, help=f"the tenant's {field} limit")
        parser.add_argument(
            "--knowledge-bases",
            type=_names,
            metavar="NAME,…",
            help="the knowledge bases a turn searches when its request names none (at most 8, comma-separated)",
        )
    get = tenant_commands.add_parser("get", parents=[admin], help="show a tenant")
    get.add_argument("name")
    tenant_commands.add_parser("list", parents=[admin], help="list the tenants")
    usage = tenant_commands.add_parser("usage", parents=[admin], help="a tenant's limits and what it has used")
    usage.add_argument("name")

    keys = commands.add_parser("keys", help="issue, list and revoke API keys (admin)")
    key_commands = keys.add_subparsers(dest="action", required=True)
    create_key = key_commands.add_parser("create", parents=[admin], help="issue a key; it is printed only once")
    create_key.add_argument("--tenant", required=True)
    create_key.add_argument("--description", default="", help="a note, e.g. which service holds the key")
    list_keys = key_commands.add_parser("list", parents=[admin], help="list keys (never their secrets)")
    list_keys.add_argument("--tenant", default="", help="only this tenant's")
    revoke = key_commands.add_parser("revoke", parents=[admin], help="revoke a key for good")
    revoke.add_argument("key_id", help="the 16 hex digits after cmk_ in the key")

    users = commands.add_parser("users", help="erase everything chatmesh holds of a tenant's user (admin)")
    user_commands = users.add_subparsers(dest="action", required=True)
    erase = user_commands.add_parser(
        "erase",
        parents=[admin],
        help="erase the user's conversations with their summaries, the replies cached from them and their review "
        "cases; prints what was removed (erasing again removes nothing)",
    )
    erase.add_argument("user_id")
    erase.add_argument("--tenant", required=True)

    _add_review_commands(commands, admin)
    _add_knowledge_commands(commands, admin)

    own = commands.add_parser(
        "usage",
        parents=[gateway_options(default_target)],
        help="the calling tenant's limits and what it has used (GetUsage)",
    )
    own.add_argument("--api-key", default=os.environ.get("CHATMESH_API_KEY"), help="default: $CHATMESH_API_KEY")


async def run(args: argparse.Namespace) -> int:
    from chatmesh.v1 import admin_pb2_grpc, chat_pb2, chat_pb2_grpc, knowledge_pb2_grpc, review_pb2_grpc

    async with open_gateway_channel(args) as channel:
        if args.command == "usage":
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            return await _call(stub.GetUsage, chat_pb2.GetUsageRequest(), bearer_metadata(args.api_key))
        metadata = bearer_metadata(args.admin_token)
        if args.command == "kb":
            knowledge = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
            if args.action == "ingest":
                return await _ingest(knowledge, args, metadata)
            method, request = _knowledge_request(knowledge, args)
        elif args.command == "review":
            method, request = _review_request(review_pb2_grpc.ReviewServiceStub(channel), args)
        else:
            method, request = _admin_request(admin_pb2_grpc.AdminServiceStub(channel), args)
        return await _call(method, request, metadata, every_field=args.command == "users")


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _admin_request(admin: admin_pb2_grpc.AdminServiceStub, args: argparse.Namespace) -> tuple[Any, Message]:
    from google.protobuf import field_mask_pb2

    from chatmesh.v1 import admin_pb2

    if args.command == "users":
        return admin.EraseUser, admin_pb2.EraseTenantUserRequest(tenant=args.tenant, user_id=args.user_id)
    if args.command == "keys":
        if args.action == "create":
            return admin.CreateKey, admin_pb2.CreateKeyRequest(tenant=args.tenant, description=args.description)
        if args.action == "list":
            return admin.ListKeys, admin_pb2.ListKeysRequest(tenant=args.tenant)
        return admin.RevokeKey, admin_pb2.RevokeKeyRequest(key_id=args.key_id)
    if args.action == "create":
        return admin.CreateTenant, admin_pb2.CreateTenantRequest(
            name=args.name, limits=_limits(args), knowledge_bases=args.knowledge_bases or []
        )
    if args.action == "update":
        named = [field for _, field, _ in LIMIT_FLAGS if getattr(args, field) is not None]
        paths = [f"limits.{field}" for field in (*named, *args.clear) if field != KNOWLEDGE_BASES]
        if args.knowledge_bases is not None or KNOWLEDGE_BASES in args.clear:
            paths.append(KNOWLEDGE_BASES)
        return admin.UpdateTenant, admin_pb2.UpdateTenantRequest(
            name=args.name,
            limits=_limits(args),
            knowledge_bases=args.knowledge_bases or [],
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
    if args.action == "get":
        return admin.GetTenant, admin_pb2.GetTenantRequest(name=args.name)
    if args.action == "usage":
        return admin.GetTenantUsage, admin_pb2.GetTenantUsageRequest(tenant=args.name)
    return admin.ListTenants, admin_pb2.ListTenantsRequest()


def _names(text: str) -> list[str]:
    """`a,b,c`, as --knowledge-bases takes it."""
    return [name.strip() for name in text.split(",") if name.strip()]


CASE_STATES = ("open", "claimed", "decided", "escalated")
DECISIONS = ("approve", "block", "escalate")


def _keyword_term(text: str) -> tuple[str, str]:
    """`CATEGORY:TERM`, as --add-term and `review terms remove` take it."""
    category, colon, term = text.partition(":")
    if not colon or not category or not term:
        raise argparse.ArgumentTypeError(f"expected CATEGORY:TERM, e.g. fraud:wire me bitcoin, not {text!r}")
    return category, term


def _add_review_commands(commands: Any, admin: argparse.ArgumentParser) -> None:
    review = commands.add_parser(
        "review", help="work the human-review queue: list, show, claim and decide cases (admin)"
    )
    actions = review.add_subparsers(dest="action", required=True)
    listed = actions.add_parser("list", parents=[admin], help="cases, newest first")
    listed.add_argument("--tenant", default="", help="only this tenant's")
    listed.add_argument("--state", choices=CASE_STATES, help="only cases in this state")
    listed.add_argument("--page-size", type=int, default=0, help="at most this many (1 to 200; default 50)")
    listed.add_argument("--page-token", default="", help="the next_page_token of the previous page")
    show = actions.add_parser("show", parents=[admin], help="show a case")
    show.add_argument("id")
    claim = actions.add_parser(
        "claim", parents=[admin], help="take a case for a lease: the given one, or the oldest waiting one"
    )
    claim.add_argument("id", nargs="?", default="", help="the case (default: the oldest open or escalated one)")
    claim.add_argument("--reviewer", required=True, help="who claims it")
    claim.add_argument(
        "--lease-seconds", type=int, default=0, help="how long the claim holds (default: the server's setting)"
    )
    decide = actions.add_parser("decide", parents=[admin], help="decide a case you hold")
    decide.add_argument("id")
    decide.add_argument("--reviewer", required=True, help="who decides: the holder of the lease")
    decide.add_argument("--decision", required=True, choices=DECISIONS, help="escalate sends it to a senior reviewer")
    decide.add_argument("--note", default="", help="why (at most 2,000 characters)")
    decide.add_argument(
        "--add-term",
        type=_keyword_term,
        metavar="CATEGORY:TERM",
        help="add a term to the keyword lists, enforced by every safety process without a restart",
    )
    terms = actions.add_parser("terms", help="the terms decisions added to the keyword lists")
    term_actions = terms.add_subparsers(dest="terms_action", required=True)
    term_actions.add_parser("list", parents=[admin], help="list them")
    remove = term_actions.add_parser("remove", parents=[admin], help="remove one")
    remove.add_argument("term", type=_keyword_term, metavar="CATEGORY:TERM")


def _review_request(review: review_pb2_grpc.ReviewServiceStub, args: argparse.Namespace) -> tuple[Any, Message]:
    from chatmesh.v1 import review_pb2

    if args.action == "list":
        state = review_pb2.CaseState.Value(f"CASE_STATE_{args.state.upper()}") if args.state else 0
        return review.ListCases, review_pb2.ListCasesRequest(
            tenant=args.tenant, state=state, page_size=args.page_size, page_token=args.page_token
        )
    if args.action == "show":
        return review.GetCase, review_pb2.GetCaseRequest(id=args.id)
    if args.action == "claim":
        return review.ClaimCase, review_pb2.ClaimCaseRequest(
            reviewer=args.reviewer, id=args.id, lease_seconds=args.lease_seconds
        )
    if args.action == "decide":
        request = review_pb2.DecideCaseRequest(
            id=args.id,
            reviewer=args.reviewer,
            decision=review_pb2.Decision.Value(f"DECISION_{args.decision.upper()}"),
            note=args.note,
        )
        if args.add_term:
            request.add_term.CopyFrom(review_pb2.KeywordTerm(category=args.add_term[0], term=args.add_term[1]))
        return review.DecideCase, request
    if args.terms_action == "list":
        return review.ListTerms, review_pb2.ListTermsRequest()
    category, term = args.term
    return review.RemoveTerm, review_pb2.RemoveTermRequest(term=review_pb2.KeywordTerm(category=category, term=term))


def _add_knowledge_commands(commands: Any, admin: argparse.ArgumentParser) -> None:
    kb = commands.add_parser(
        "kb", help="ingest documents into a tenant's knowledge bases, list and delete them (admin)"
    )
    actions = kb.add_subparsers(dest="action", required=True)
    ingest = actions.add_parser(
        "ingest",
        parents=[admin],
        help="add a file or a folder's files to a knowledge base (creating it); changed files are replaced, "
        "unchanged ones skipped; prints what happened to each",
    )
    ingest.add_argument(
        "path",
        type=Path,
        help="a file, or a folder: every .md .markdown .txt .text .html .htm .pdf under it, hidden ones left out; "
        "a document is named by its path relative to the folder",
    )
    ingest.add_argument("--kb", required=True, help="the knowledge base: 1 to 64 of A-Z a-z 0-9 _ . -")
    ingest.add_argument("--tenant", required=True)
    ingest.add_argument(
        "--prune", action="store_true", help="also delete the knowledge base's documents that are not at PATH"
    )
    ingest.add_argument(
        "--timeout", type=float, default=300.0, help="seconds each request may take (default 300: it embeds)"
    )
    listed = actions.add_parser("list", parents=[admin], help="the tenant's knowledge bases")
    listed.add_argument("--tenant", required=True)
    delete = actions.add_parser(
        "delete", parents=[admin], help="delete a knowledge base (its documents, chunks and vectors), or one document"
    )
    delete.add_argument("name")
    delete.add_argument("--tenant", required=True)
    delete.add_argument("--document", metavar="PATH", help="delete only this document (its path as ingested)")


def _knowledge_request(
    knowledge: knowledge_pb2_grpc.KnowledgeServiceStub, args: argparse.Namespace
) -> tuple[Any, Message]:
    from chatmesh.v1 import knowledge_pb2

    if args.action == "list":
        return knowledge.ListKnowledgeBases, knowledge_pb2.ListKnowledgeBasesRequest(tenant=args.tenant)
    if args.document is not None:
        return knowledge.DeleteDocument, knowledge_pb2.DeleteDocumentRequest(
            tenant=args.tenant, knowledge_base=args.name, path=args.document
        )
    return knowledge.DeleteKnowledgeBase, knowledge_pb2.DeleteKnowledgeBaseRequest(
        tenant=args.tenant, knowledge_base=args.name
    )


async def _ingest(
    knowledge: knowledge_pb2_grpc.KnowledgeServiceStub,
    args: argparse.Namespace,
    metadata: tuple[tuple[str, str], ...],
) -> int:
    """Sends the documents at `args.path` in batches, pruning (with --prune) in the last one, which names every
    path; prints the batches' answers as one."""
    import grpc
    from google.protobuf import json_format

    from chatmesh.dialogue.knowledge.documents import DocumentError
    from chatmesh.v1 import knowledge_pb2

    try:
        documents = await asyncio.to_thread(_documents_at, args.path)
    except (DocumentError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    batches = list(_batches(documents))
    report = knowledge_pb2.IngestDocumentsResponse()
    sent = 0
    for number, batch in enumerate(batches, start=1):
        request = knowledge_pb2.IngestDocumentsRequest(
            tenant=args.tenant,
            knowledge_base=args.kb,
            documents=[
                knowledge_pb2.KnowledgeDocument(
                    path=document.path, content=document.content_bytes, media_type=document.media_type
                )
                for document in batch
            ],
        )
        if args.prune and number == len(batches):
            request.prune = True
            request.keep_paths.extend(document.path for document in documents[:sent])
        try:
            answer = await knowledge.IngestDocuments(request, metadata=metadata, timeout=args.timeout)
        except grpc.aio.AioRpcError as error:
            done = f" (after {sent} of {len(documents)} documents; ingesting again skips those)" if sent else ""
            print(f"error: {error.code().name}: {error.details()}{done}", file=sys.stderr)
            return 1
        sent += len(batch)
        for field in ("added", "replaced", "unchanged", "removed"):
            getattr(report, field).extend(getattr(answer, field))
        report.chunks += answer.chunks
        report.version = answer.version
    print(
        json_format.MessageToJson(
            report,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            ensure_ascii=False,
        )
    )
    return 0


def _documents_at(path: Path) -> list[SourceDocument]:
    """The documents `kb ingest` reads at `path`: at least one. Raises DocumentError or OSError."""
    from chatmesh.dialogue.knowledge.documents import MEDIA_TYPES, DocumentError, read_documents

    if not path.exists():
        raise DocumentError(f"{path}: no such file or folder")
    documents = read_documents(path)
    if not documents:
        raise DocumentError(f"{path}: no files of a type ingestion reads ({' '.join(sorted(MEDIA_TYPES))})")
    return documents


def _batches(documents: Sequence[SourceDocument]) -> Iterator[list[SourceDocument]]:
    batch: list[SourceDocument] = []
    size = 0
    for document in documents:
        length = len(document.content_bytes)
        if batch and (len(batch) == INGEST_BATCH_DOCUMENTS or size + length > INGEST_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(document)
        size += length
    yield batch


def _limits(args: argparse.Namespace) -> chat_pb2.TenantLimits:
    from chatmesh.v1 import chat_pb2

    limits = chat_pb2.TenantLimits()
    for _, field, _ in LIMIT_FLAGS:
        value = getattr(args, field)
        if value is not None:
            setattr(limits, field, value)
    return limits


async def _call(
    method: Callable[..., Awaitable[Message]],
    request: Message,
    metadata: tuple[tuple[str, str], ...],
    *,
    every_field: bool = False,
) -> int:
    """Prints the answer; with `every_field`, zeros too (where a count of 0 says something)."""
    import grpc
    from google.protobuf import json_format

    try:
        response = await method(request, metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(
        json_format.MessageToJson(
            response,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=every_field,
            # Chinese paths and names as they are, not as \u escapes.
            ensure_ascii=False,
        )
    )
    return 0
