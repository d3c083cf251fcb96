from chatmesh.v1 import chat_pb2 as _chat_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TurnRequest(_message.Message):
    __slots__ = ("request", "request_id", "tenant", "limits")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    request: _chat_pb2.ChatRequest
    request_id: str
    tenant: str
    limits: _chat_pb2.TenantLimits
    def __init__(self, request: _Optional[_Union[_chat_pb2.ChatRequest, _Mapping]] = ..., request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., limits: _Optional[_Union[_chat_pb2.TenantLimits, _Mapping]] = ...) -> None: ...

class TurnEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_chat_pb2.ChatEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[_chat_pb2.ChatEvent, _Mapping]]] = ...) -> None: ...

class TenantGetConversationRequest(_message.Message):
    __slots__ = ("tenant", "request")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    request: _chat_pb2.GetConversationRequest
    def __init__(self, tenant: _Optional[str] = ..., request: _Optional[_Union[_chat_pb2.GetConversationRequest, _Mapping]] = ...) -> None: ...

class TenantDeleteConversationRequest(_message.Message):
    __slots__ = ("tenant", "request")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    request: _chat_pb2.DeleteConversationRequest
    def __init__(self, tenant: _Optional[str] = ..., request: _Optional[_Union[_chat_pb2.DeleteConversationRequest, _Mapping]] = ...) -> None: ...

class GetTokenUsageRequest(_message.Message):
    __slots__ = ("tenant", "limits")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    limits: _chat_pb2.TenantLimits
    def __init__(self, tenant: _Optional[str] = ..., limits: _Optional[_Union[_chat_pb2.TenantLimits, _Mapping]] = ...) -> None: ...

class TenantEraseUserRequest(_message.Message):
    __slots__ = ("tenant", "request")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    request: _chat_pb2.EraseUserRequest
    def __init__(self, tenant: _Optional[str] = ..., request: _Optional[_Union[_chat_pb2.EraseUserRequest, _Mapping]] = ...) -> None: ...
