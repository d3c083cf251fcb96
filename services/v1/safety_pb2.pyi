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
SCREEN_SOURCE_UNSPECIFIED: ScreenSource
SCREEN_SOURCE_KEYWORD: ScreenSource
SCREEN_SOURCE_MODERATION: ScreenSource

class Verdict(_message.Message):
    __slots__ = ("blocked", "categories", "source")
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    blocked: bool
    categories: _containers.RepeatedScalarFieldContainer[str]
    source: ScreenSource
    def __init__(self, blocked: _Optional[bool] = ..., categories: _Optional[_Iterable[str]] = ..., source: _Optional[_Union[ScreenSource, str]] = ...) -> None: ...

class ScreenInputRequest(_message.Message):
    __slots__ = ("text", "request_id", "images")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    text: str
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[_chat_pb2.Image]
    def __init__(self, text: _Optional[str] = ..., request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_chat_pb2.Image, _Mapping]]] = ...) -> None: ...

class ScreenInputResponse(_message.Message):
    __slots__ = ("verdict",)
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    def __init__(self, verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class ScreenOutputRequest(_message.Message):
    __slots__ = ("text", "final", "request_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    final: bool
    request_id: str
    def __init__(self, text: _Optional[str] = ..., final: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScreenOutputResponse(_message.Message):
    __slots__ = ("cleared_chars", "verdict", "complete")
    CLEARED_CHARS_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    cleared_chars: int
    verdict: Verdict
    complete: bool
    def __init__(self, cleared_chars: _Optional[int] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., complete: _Optional[bool] = ...) -> None: ...

class ScreenToolRequest(_message.Message):
    __slots__ = ("texts", "request_id")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScreenToolResponse(_message.Message):
    __slots__ = ("verdict",)
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    def __init__(self, verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...
