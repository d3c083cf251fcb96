from chatmesh.v1 import chat_pb2 as _chat_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScreenSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCREEN_SOURCE_UNSPECIFIED: _ClassVar[ScreenSource]
    SCREEN_SOURCE_KEYWORD: _ClassVar[ScreenSource]
    SCREEN_SOURCE_MODERATION: _ClassVar[ScreenSource]

class PiiKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PII_KIND_UNSPECIFIED: _ClassVar[PiiKind]
    PII_KIND_EMAIL: _ClassVar[PiiKind]
    PII_KIND_PHONE: _ClassVar[PiiKind]
    PII_KIND_CN_ID: _ClassVar[PiiKind]
    PII_KIND_PAYMENT_CARD: _ClassVar[PiiKind]
    PII_KIND_IP_ADDRESS: _ClassVar[PiiKind]
SCREEN_SOURCE_UNSPECIFIED: ScreenSource
SCREEN_SOURCE_KEYWORD: ScreenSource
SCREEN_SOURCE_MODERATION: ScreenSource
PII_KIND_UNSPECIFIED: PiiKind
PII_KIND_EMAIL: PiiKind
PII_KIND_PHONE: PiiKind
PII_KIND_CN_ID: PiiKind
PII_KIND_PAYMENT_CARD: PiiKind
PII_KIND_IP_ADDRESS: PiiKind

class Verdict(_message.Message):
    __slots__ = ("blocked", "categories", "source", "review_case_id", "policy_version")
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVIEW_CASE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    blocked: bool
    categories: _containers.RepeatedScalarFieldContainer[str]
    source: ScreenSource
    review_case_id: str
    policy_version: str
    def __init__(self, blocked: _Optional[bool] = ..., categories: _Optional[_Iterable[str]] = ..., source: _Optional[_Union[ScreenSource, str]] = ..., review_case_id: _Optional[str] = ..., policy_version: _Optional[str] = ...) -> None: ...

class TurnRef(_message.Message):
    __slots__ = ("tenant", "user_id", "conversation_id", "request_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    user_id: str
    conversation_id: str
    request_id: str
    def __init__(self, tenant: _Optional[str] = ..., user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class PiiSpan(_message.Message):
    __slots__ = ("kind", "start", "end")
    KIND_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    kind: PiiKind
    start: int
    end: int
    def __init__(self, kind: _Optional[_Union[PiiKind, str]] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class ScreenInputRequest(_message.Message):
    __slots__ = ("text", "request_id", "images", "turn")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    text: str
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[_chat_pb2.Image]
    turn: TurnRef
    def __init__(self, text: _Optional[str] = ..., request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_chat_pb2.Image, _Mapping]]] = ..., turn: _Optional[_Union[TurnRef, _Mapping]] = ...) -> None: ...

class ScreenInputResponse(_message.Message):
    __slots__ = ("verdict", "pii")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    PII_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    pii: _containers.RepeatedCompositeFieldContainer[PiiSpan]
    def __init__(self, verdict: _Optional[_Union[Verdict, _Mapping]] = ..., pii: _Optional[_Iterable[_Union[PiiSpan, _Mapping]]] = ...) -> None: ...

class ScreenOutputRequest(_message.Message):
    __slots__ = ("text", "final", "request_id", "turn")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    text: str
    final: bool
    request_id: str
    turn: TurnRef
    def __init__(self, text: _Optional[str] = ..., final: _Optional[bool] = ..., request_id: _Optional[str] = ..., turn: _Optional[_Union[TurnRef, _Mapping]] = ...) -> None: ...

class ScreenOutputResponse(_message.Message):
    __slots__ = ("cleared_chars", "verdict", "complete", "pii", "policy_version", "review_case_id")
    CLEARED_CHARS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    PII_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REVIEW_CASE_ID_FIELD_NUMBER: _ClassVar[int]
    cleared_chars: int
    verdict: Verdict
    complete: bool
    pii: _containers.RepeatedCompositeFieldContainer[PiiSpan]
    policy_version: str
    review_case_id: str
    def __init__(self, cleared_chars: _Optional[int] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., complete: _Optional[bool] = ..., pii: _Optional[_Iterable[_Union[PiiSpan, _Mapping]]] = ..., policy_version: _Optional[str] = ..., review_case_id: _Optional[str] = ...) -> None: ...

class ScreenToolRequest(_message.Message):
    __slots__ = ("texts", "request_id", "turn")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    turn: TurnRef
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., turn: _Optional[_Union[TurnRef, _Mapping]] = ...) -> None: ...

class ScreenToolResponse(_message.Message):
    __slots__ = ("verdict",)
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    def __init__(self, verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...
