from chatmesh.v1 import chat_pb2 as _chat_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TurnRequest(_message.Message):
    __slots__ = ("request", "request_id")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request: _chat_pb2.ChatRequest
    request_id: str
    def __init__(self, request: _Optional[_Union[_chat_pb2.ChatRequest, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...
