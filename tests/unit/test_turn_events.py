"""What dialogue's RunTurn puts in each message to the gateway: the turn's events in order, Started together with the
event after it, so that the hop carries one message less per turn and the caller's first token comes no later."""

from collections.abc import AsyncIterator

from chatmesh.dialogue.service import turn_events
from chatmesh.v1 import chat_pb2

STARTED = chat_pb2.ChatEvent(started=chat_pb2.Started(conversation_id="c", request_id="r", model="m"))
COMPLETED = chat_pb2.ChatEvent(completed=chat_pb2.Completed(finish_reason=chat_pb2.FINISH_REASON_STOP))


def delta(text: str) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(delta=chat_pb2.Delta(text=text))


async def messages(*events: chat_pb2.ChatEvent) -> list[list[chat_pb2.ChatEvent]]:
    async def source() -> AsyncIterator[chat_pb2.ChatEvent]:
        for event in events:
            yield event

    return [list(message.events) async for message in turn_events(source())]


async def test_started_travels_with_the_first_delta_and_the_rest_one_by_one():
    assert await messages(STARTED, delta("a"), delta("b"), COMPLETED) == [
        [STARTED, delta("a")],
        [delta("b")],
        [COMPLETED],
    ]


async def test_a_turn_without_text_sends_started_with_its_completed():
    assert await messages(STARTED, COMPLETED) == [[STARTED, COMPLETED]]


async def test_a_replayed_turn_without_started_is_sent_event_by_event():
    assert await messages(delta("a"), COMPLETED) == [[delta("a")], [COMPLETED]]


async def test_a_turn_that_ends_after_started_still_sends_it():
    assert await messages(STARTED) == [[STARTED]]
