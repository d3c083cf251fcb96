"""Starts the safety process."""

import asyncio
import contextlib
from pathlib import Path

from chatmesh.review.store import create_review_store
from chatmesh.runtime.grpc_server import Servicer, serve
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.multiplex import multiplex_servicer
from chatmesh.runtime.settings import SafetySettings
from chatmesh.safety.keywords import KeywordScreen
from chatmesh.safety.moderation import ModerationScreen, moderation_enabled
from chatmesh.safety.review import AddedTerms, ReviewCases
from chatmesh.safety.service import SafetyServicer
from chatmesh.v1 import safety_pb2, safety_pb2_grpc

log = get_logger(__name__)


async def main(settings: SafetySettings) -> None:
    # A keyword list that cannot be loaded at start stops the process: better no safety process
    # (dialogue then fails closed) than one that lets everything through.
    keywords = KeywordScreen(Path(settings.safety_keywords) if settings.safety_keywords else None)
    model = None
    if moderation_enabled(settings):
        # Only then: the model client loads the openai SDK and its HTTP stacks (about 25 MiB).
        from chatmesh.model.client import ModelClient

        model = ModelClient(settings)
    moderation = (
        None
        if model is None
        else ModerationScreen(
            model,
            fail_open=settings.safety_moderation_fail_open,
            thresholds=settings.safety_moderation_thresholds,
        )
    )
    log.info(
        "safety_configured",
        extra={
            "keywords": str(keywords.path),
            "reload_seconds": settings.safety_keywords_reload_seconds,
            "moderation": moderation is not None,
            "moderation_fail_open": settings.safety_moderation_fail_open,
            "moderate_output": moderation is not None and settings.safety_moderate_output,
            "review_policy": settings.review_policy,
        },
    )
    store = create_review_store(settings)
    # The terms decisions added are in force before the first call, and followed as the files are.
    added_terms = AddedTerms(store, keywords)
    await added_terms.refresh()
    servicer = SafetyServicer(settings, keywords, moderation, ReviewCases(store))
    watcher = asyncio.create_task(keywords.watch(settings.safety_keywords_reload_seconds))
    follower = asyncio.create_task(added_terms.follow(settings.safety_keywords_reload_seconds))

    async def release() -> None:
        for task in (watcher, follower):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await store.close()
        if model is not None:
            await model.close()

    try:
        await serve(
            settings,
            port=settings.safety_port,
            health_port=settings.safety_health_port,
            servicers=[
                Servicer(
                    safety_pb2.DESCRIPTOR.services_by_name["SafetyService"].full_name,
                    lambda server: safety_pb2_grpc.add_SafetyServiceServicer_to_server(servicer, server),
                ),
                multiplex_servicer(
                    safety_pb2.DESCRIPTOR.services_by_name["SafetyService"],
                    servicer,
                    ("ScreenInput", "ScreenTool"),
                    settings,
                ),
            ],
            on_stopped=release,
        )
    finally:
        watcher.cancel()
        follower.cancel()
