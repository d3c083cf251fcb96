"""Starts the gateway process."""

from chatmesh.gateway.service import ChatGateway
from chatmesh.runtime.channels import open_channel
from chatmesh.runtime.grpc_server import Servicer, serve
from chatmesh.runtime.settings import Settings
from chatmesh.v1 import chat_pb2, chat_pb2_grpc, dialogue_pb2_grpc


async def main(settings: Settings) -> None:
    dialogue_channel = open_channel(settings.dialogue_target, settings)
    gateway = ChatGateway(settings, dialogue_pb2_grpc.DialogueServiceStub(dialogue_channel))

    async def release() -> None:
        await dialogue_channel.close()

    await serve(
        settings,
        port=settings.gateway_port,
        servicers=[
            Servicer(
                chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name,
                lambda server: chat_pb2_grpc.add_ChatServiceServicer_to_server(gateway, server),
            )
        ],
        on_stopped=release,
    )
