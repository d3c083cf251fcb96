"""Starts the gateway process."""

import asyncio
import contextlib

from chatmesh.gateway.admin import AdminServicer
from chatmesh.gateway.admission import Admission
from chatmesh.gateway.auth import Authenticator
from chatmesh.gateway.knowledge import KnowledgeGateway
from chatmesh.gateway.review import ReviewServicer, sweep_periodically
from chatmesh.gateway.service import ChatGateway
from chatmesh.gateway.usage import UsageReader
from chatmesh.review.store import create_review_store
from chatmesh.runtime import redis_connection, tls
from chatmesh.runtime.channels import open_channel
from chatmesh.runtime.grpc_server import Servicer, is_loopback, serve
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import GatewaySettings
from chatmesh.tenancy.directory import create_tenant_directory
from chatmesh.tenancy.keys import KeyHasher
from chatmesh.tenancy.ledger import create_usage_ledger
from chatmesh.tenancy.metrics import TenantMetrics
from chatmesh.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    dialogue_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
    review_pb2,
    review_pb2_grpc,
)

log = get_logger(__name__)


def check_auth_settings(settings: GatewaySettings) -> None:
    """Refuses to serve unauthenticated callers beyond this machine."""
    if settings.auth == "off" and not is_loopback(settings.bind_host):
        raise SystemExit(
            f"CHATMESH_AUTH=off is allowed only when the gateway listens on loopback, not on {settings.bind_host}: "
            "set CHATMESH_AUTH=required"
        )


async def main(settings: GatewaySettings) -> None:
    check_auth_settings(settings)
    log.info(
        "auth",
        extra={
            "mode": settings.auth,
            "admin_api": "token" if settings.admin_token is not None else ("open" if settings.auth == "off" else "off"),
            "store": "redis" if settings.redis_url else "memory",
        },
    )
    dialogue_channel = open_channel(settings.dialogue_target, settings)
    dialogue = dialogue_pb2_grpc.DialogueServiceStub(dialogue_channel)
    redis_options = redis_connection.connection_options(settings, settings.redis_url or "")
    directory = create_tenant_directory(settings.redis_url, redis_options)
    ledger = create_usage_ledger(settings.redis_url, redis_options)
    hasher = KeyHasher(settings.api_key_pepper.get_secret_value())
    usage = UsageReader(settings, ledger, dialogue)
    admission = Admission(settings, ledger, TenantMetrics(settings.metrics_max_tenants))
    gateway = ChatGateway(settings, dialogue, Authenticator(settings, directory), admission, usage)
    admin = AdminServicer(settings, directory, usage, hasher, dialogue)
    knowledge = KnowledgeGateway(settings, directory, knowledge_pb2_grpc.KnowledgeServiceStub(dialogue_channel))
    review_store = create_review_store(settings)
    review = ReviewServicer(settings, review_store)
    sweeper = asyncio.create_task(sweep_periodically(review_store, settings.review_sweep_seconds))

    async def release() -> None:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await review_store.close()
        await admission.close()
        await dialogue_channel.close()
        await ledger.close()
        await directory.close()

    await serve(
        settings,
        port=settings.gateway_port,
        health_port=settings.gateway_health_port,
        public_tls=tls.public_pair(settings),
        servicers=[
            Servicer(
                chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name,
                lambda server: chat_pb2_grpc.add_ChatServiceServicer_to_server(gateway, server),
            ),
            Servicer(
                admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
                lambda server: admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server),
            ),
            Servicer(
                review_pb2.DESCRIPTOR.services_by_name["ReviewService"].full_name,
                lambda server: review_pb2_grpc.add_ReviewServiceServicer_to_server(review, server),
            ),
            Servicer(
                knowledge_pb2.DESCRIPTOR.services_by_name["KnowledgeService"].full_name,
                lambda server: knowledge_pb2_grpc.add_KnowledgeServiceServicer_to_server(knowledge, server),
            ),
        ],
        on_stopped=release,
    )
