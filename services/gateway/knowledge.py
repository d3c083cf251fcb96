"""KnowledgeService on the gateway: the operators' calls on tenants' knowledge bases, behind the admin token.

The gateway checks the admin token and the request (every bad field named, INVALID_ARGUMENT), then forwards the
call to dialogue, which holds the knowledge base store and the embedding client and does the work. Dialogue's
answers pass through with their code and message; a dialogue that cannot be reached is UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from chatmesh.dialogue.knowledge.documents import MEDIA_TYPES, media_type_for
from chatmesh.dialogue.knowledge.names import NAME_RULE, is_valid_name
from chatmesh.gateway.admin import TENANT_NAME, AdminToken
from chatmesh.gateway.auth import DEFAULT_TENANT
from chatmesh.gateway.validation import Violations
from chatmesh.runtime.channels import downstream_timeout
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import GatewaySettings
from chatmesh.runtime.status import abort, abort_with, invalid_argument, is_deliberate
from chatmesh.tenancy.directory import DirectoryUnavailable, TenantDirectory
from chatmesh.v1 import knowledge_pb2, knowledge_pb2_grpc

log = get_logger(__name__)

Response = TypeVar("Response", bound=Message)

MAX_PATH_CHARS = 512
# Paths a pruning request may name to keep: a folder of this many documents is ingested in many requests.
MAX_KEEP_PATHS = 100_000
# Only the rich-status detail (a BadRequest) is passed on from dialogue's trailers.
_DETAILS_KEY = "grpc-status-details-bin"


class KnowledgeGateway(knowledge_pb2_grpc.KnowledgeServiceServicer):
    def __init__(
        self, settings: GatewaySettings, directory: TenantDirectory, knowledge: knowledge_pb2_grpc.KnowledgeServiceStub
    ) -> None:
        self._settings = settings
        self._admin_token = AdminToken(settings)
        self._directory = directory
        self._knowledge = knowledge
        # Without authentication, the tenant `default` need not be in the directory (see chatmesh.gateway.auth).
        self._default_tenant_implied = settings.auth == "off"

    async def IngestDocuments(
        self, request: knowledge_pb2.IngestDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.IngestDocumentsResponse:
        await self._admin_token.authorize(context)
        violations = check_names(request.tenant, request.knowledge_base) + self._check_documents(request)
        if violations:
            await abort_with(context, invalid_argument(violations))
        await self._existing_tenant(context, request.tenant)
        return await self._forward(self._knowledge.IngestDocuments, request, context)

    async def ListKnowledgeBases(
        self, request: knowledge_pb2.ListKnowledgeBasesRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.ListKnowledgeBasesResponse:
        await self._admin_token.authorize(context)
        violations = check_names(request.tenant, None)
        if violations:
            await abort_with(context, invalid_argument(violations))
        return await self._forward(self._knowledge.ListKnowledgeBases, request, context)

    async def DeleteKnowledgeBase(
        self, request: knowledge_pb2.DeleteKnowledgeBaseRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.DeleteKnowledgeBaseResponse:
        await self._admin_token.authorize(context)
        violations = check_names(request.tenant, request.knowledge_base)
        if violations:
            await abort_with(context, invalid_argument(violations))
        return await self._forward(self._knowledge.DeleteKnowledgeBase, request, context)

    async def DeleteDocument(
        self, request: knowledge_pb2.DeleteDocumentRequest, context: grpc.aio.ServicerContext
    ) -> knowledge_pb2.DeleteDocumentResponse:
        await self._admin_token.authorize(context)
        violations = check_names(request.tenant, request.knowledge_base) + _check_path("path", request.path)
        if violations:
            await abort_with(context, invalid_argument(violations))
        return await self._forward(self._knowledge.DeleteDocument, request, context)

    def _check_documents(self, request: knowledge_pb2.IngestDocumentsRequest) -> Violations:
        settings = self._settings
        violations: Violations = []
        if not request.documents and not request.prune:
            violations.append(("documents", "must name at least one document, unless prune is set"))
        if len(request.documents) > settings.knowledge_max_documents_per_request:
            violations.append(
                (
                    "documents",
                    f"must be at most {settings.knowledge_max_documents_per_request} documents per request "
                    "(CHATMESH_KNOWLEDGE_MAX_DOCUMENTS_PER_REQUEST); send the rest in further requests",
                )
            )
            return violations
        seen: dict[str, int] = {}
        for index, document in enumerate(request.documents):
            field = f"documents[{index}]"
            path_violations = _check_path(f"{field}.path", document.path)
            violations += path_violations
            if not path_violations:
                if document.path in seen:
                    violations.append((f"{field}.path", f"repeats documents[{seen[document.path]}].path"))
                seen.setdefault(document.path, index)
            if len(document.content) > settings.knowledge_max_document_bytes:
                violations.append(
                    (
                        f"{field}.content",
                        f"must be at most {settings.knowledge_max_document_bytes} bytes "
                        "(CHATMESH_KNOWLEDGE_MAX_DOCUMENT_BYTES)",
                    )
                )
            if document.media_type and document.media_type not in MEDIA_TYPES.values():
                violations.append((f"{field}.media_type", f"must be one of {', '.join(_media_types())}, or empty"))
            elif not document.media_type and not path_violations and media_type_for(document.path) is None:
                violations.append(
                    (
                        f"{field}.media_type",
                        f"is needed: the path's extension is none of {', '.join(sorted(MEDIA_TYPES))}",
                    )
                )
        if request.keep_paths and not request.prune:
            violations.append(("keep_paths", "is only for prune"))
        if len(request.keep_paths) > MAX_KEEP_PATHS:
            violations.append(("keep_paths", f"must be at most {MAX_KEEP_PATHS} paths"))
        else:
            for index, path in enumerate(request.keep_paths):
                violations += _check_path(f"keep_paths[{index}]", path)
        return violations

    async def _existing_tenant(self, context: grpc.aio.ServicerContext, tenant: str) -> None:
        """Ends the call with NOT_FOUND for a tenant the directory does not know, so that a misspelt tenant gets no
        knowledge base that no caller can reach."""
        if tenant == DEFAULT_TENANT and self._default_tenant_implied:
            return
        try:
            found = await self._directory.get_tenant(tenant)
        except DirectoryUnavailable:
            log.error("directory_unavailable")
            await abort(context, grpc.StatusCode.UNAVAILABLE, "the tenant directory is unavailable; retry with backoff")
        if found is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"tenant {tenant} not found; create it first (chatmesh tenants create {tenant})",
            )

    async def _forward(
        self, method: Callable[..., Awaitable[Response]], request: Message, context: grpc.aio.ServicerContext
    ) -> Response:
        """Dialogue's answer. Its own failures pass on with their code, message and details; a transport failure
        becomes UNAVAILABLE, or DEADLINE_EXCEEDED."""
        try:
            return await method(request, timeout=downstream_timeout(context, self._settings.default_deadline_seconds))
        except grpc.aio.AioRpcError as error:
            code = error.code()
            log.warning("dialogue_failed", extra={"grpc_code": code.name})
            if is_deliberate(error):
                details = tuple((key, value) for key, value in error.trailing_metadata() if key == _DETAILS_KEY)
                await abort(context, code, error.details(), details)
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                await abort(context, code, "the call did not complete within its deadline; ingesting again resumes it")
            await abort(context, grpc.StatusCode.UNAVAILABLE, "the dialogue service is unavailable; retry with backoff")
            raise


def check_names(tenant: str, knowledge_base: str | None) -> Violations:
    """The tenant's name, and the knowledge base's unless it is None."""
    violations: Violations = []
    if not TENANT_NAME.fullmatch(tenant):
        violations.append(
            ("tenant", "must be a tenant name: 1 to 63 of a-z 0-9 and -, starting with a letter or digit")
        )
    if knowledge_base is not None and not is_valid_name(knowledge_base):
        violations.append(("knowledge_base", f"must be {NAME_RULE}"))
    return violations


def _check_path(field: str, path: str) -> Violations:
    if not path or len(path) > MAX_PATH_CHARS or not path.isprintable():
        return [(field, f"must be 1 to {MAX_PATH_CHARS} printable characters")]
    return []


def _media_types() -> Sequence[str]:
    return sorted(set(MEDIA_TYPES.values()))
