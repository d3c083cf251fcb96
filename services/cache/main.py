"""Starts the cache process."""

from chatmesh.cache.service import CacheServicer
from chatmesh.cache.tiers import AnswerCache
from chatmesh.runtime.grpc_server import Servicer, serve
from chatmesh.runtime.multiplex import multiplex_servicer
from chatmesh.runtime.settings import CacheSettings
from chatmesh.v1 import cache_pb2, cache_pb2_grpc


async def main(settings: CacheSettings) -> None:
    cache = AnswerCache.from_settings(settings)
    semantic = None
    if settings.semantic_cache:
        from chatmesh.cache.semantic import SemanticCache

        semantic = SemanticCache.from_settings(settings, cache)
    cache.follow_announcements()
    servicer = CacheServicer(cache, semantic)

    async def stopped() -> None:
        if semantic is not None:
            await semantic.close()
        await cache.close()

    await serve(
        settings,
        port=settings.cache_port,
        health_port=settings.cache_health_port,
        servicers=[
            Servicer(
                cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name,
                lambda server: cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server),
            ),
            multiplex_servicer(
                cache_pb2.DESCRIPTOR.services_by_name["CacheService"],
                servicer,
                ("Lookup", "LookupSimilar", "Store"),
                settings,
            ),
        ],
        on_stopped=stopped,
    )
