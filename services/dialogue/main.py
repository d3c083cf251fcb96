"""Starts the dialogue process."""

from chatmesh.dialogue.service import DialogueServicer
from chatmesh.dialogue.store import create_conversation_store
from chatmesh.runtime.grpc_server import Servicer, serve
from chatmesh.runtime.model_client import ModelClient
from chatmesh.runtime.settings import Settings
from chatmesh.v1 import dialogue_pb2, dialogue_pb2_grpc


async def main(settings: Settings) -> None:
    store = create_conversation_store(settings.redis_url)
    model = ModelClient(settings)
    servicer = DialogueServicer(settings, store, model)

    async def release() -> None:
        await model.close()
        await store.close()

    await serve(
        settings,
        port=settings.dialogue_port,
        servicers=[
            Servicer(
                dialogue_pb2.DESCRIPTOR.services_by_name["DialogueService"].full_name,
                lambda server: dialogue_pb2_grpc.add_DialogueServiceServicer_to_server(servicer, server),
            )
        ],
        on_stopped=release,
    )
