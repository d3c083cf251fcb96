import datetime

from chatmesh.v1 import chat_pb2 as _chat_pb2
from chatmesh.v1 import safety_pb2 as _safety_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReviewAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVIEW_ACTION_UNSPECIFIED: _ClassVar[ReviewAction]
    REVIEW_ACTION_BLOCK_AND_REVIEW: _ClassVar[ReviewAction]
    REVIEW_ACTION_ALLOW_AND_REVIEW: _ClassVar[ReviewAction]

class CaseState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CASE_STATE_UNSPECIFIED: _ClassVar[CaseState]
    CASE_STATE_OPEN: _ClassVar[CaseState]
    CASE_STATE_CLAIMED: _ClassVar[CaseState]
    CASE_STATE_DECIDED: _ClassVar[CaseState]
    CASE_STATE_ESCALATED: _ClassVar[CaseState]

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_APPROVE: _ClassVar[Decision]
    DECISION_BLOCK: _ClassVar[Decision]
    DECISION_ESCALATE: _ClassVar[Decision]
REVIEW_ACTION_UNSPECIFIED: ReviewAction
REVIEW_ACTION_BLOCK_AND_REVIEW: ReviewAction
REVIEW_ACTION_ALLOW_AND_REVIEW: ReviewAction
CASE_STATE_UNSPECIFIED: CaseState
CASE_STATE_OPEN: CaseState
CASE_STATE_CLAIMED: CaseState
CASE_STATE_DECIDED: CaseState
CASE_STATE_ESCALATED: CaseState
DECISION_UNSPECIFIED: Decision
DECISION_APPROVE: Decision
DECISION_BLOCK: Decision
DECISION_ESCALATE: Decision

class KeywordTerm(_message.Message):
    __slots__ = ("category", "term")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    category: str
    term: str
    def __init__(self, category: _Optional[str] = ..., term: _Optional[str] = ...) -> None: ...

class ReviewCase(_message.Message):
    __slots__ = ("id", "turn", "stage", "categories", "source", "action", "excerpt", "state", "create_time", "reviewer", "lease_expire_time", "decision", "note", "decide_time", "added_term")
    ID_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    EXCERPT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    DECIDE_TIME_FIELD_NUMBER: _ClassVar[int]
    ADDED_TERM_FIELD_NUMBER: _ClassVar[int]
    id: str
    turn: _safety_pb2.TurnRef
    stage: _chat_pb2.ContentFilter.Stage
    categories: _containers.RepeatedScalarFieldContainer[str]
    source: _safety_pb2.ScreenSource
    action: ReviewAction
    excerpt: str
    state: CaseState
    create_time: _timestamp_pb2.Timestamp
    reviewer: str
    lease_expire_time: _timestamp_pb2.Timestamp
    decision: Decision
    note: str
    decide_time: _timestamp_pb2.Timestamp
    added_term: KeywordTerm
    def __init__(self, id: _Optional[str] = ..., turn: _Optional[_Union[_safety_pb2.TurnRef, _Mapping]] = ..., stage: _Optional[_Union[_chat_pb2.ContentFilter.Stage, str]] = ..., categories: _Optional[_Iterable[str]] = ..., source: _Optional[_Union[_safety_pb2.ScreenSource, str]] = ..., action: _Optional[_Union[ReviewAction, str]] = ..., excerpt: _Optional[str] = ..., state: _Optional[_Union[CaseState, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reviewer: _Optional[str] = ..., lease_expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decision: _Optional[_Union[Decision, str]] = ..., note: _Optional[str] = ..., decide_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., added_term: _Optional[_Union[KeywordTerm, _Mapping]] = ...) -> None: ...

class ListCasesRequest(_message.Message):
    __slots__ = ("tenant", "state", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    state: CaseState
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., state: _Optional[_Union[CaseState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCasesResponse(_message.Message):
    __slots__ = ("cases", "next_page_token")
    CASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    cases: _containers.RepeatedCompositeFieldContainer[ReviewCase]
    next_page_token: str
    def __init__(self, cases: _Optional[_Iterable[_Union[ReviewCase, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetCaseRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ClaimCaseRequest(_message.Message):
    __slots__ = ("reviewer", "id", "lease_seconds")
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    reviewer: str
    id: str
    lease_seconds: int
    def __init__(self, reviewer: _Optional[str] = ..., id: _Optional[str] = ..., lease_seconds: _Optional[int] = ...) -> None: ...

class DecideCaseRequest(_message.Message):
    __slots__ = ("id", "reviewer", "decision", "note", "add_term")
    ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    ADD_TERM_FIELD_NUMBER: _ClassVar[int]
    id: str
    reviewer: str
    decision: Decision
    note: str
    add_term: KeywordTerm
    def __init__(self, id: _Optional[str] = ..., reviewer: _Optional[str] = ..., decision: _Optional[_Union[Decision, str]] = ..., note: _Optional[str] = ..., add_term: _Optional[_Union[KeywordTerm, _Mapping]] = ...) -> None: ...

class ListTermsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTermsResponse(_message.Message):
    __slots__ = ("terms",)
    TERMS_FIELD_NUMBER: _ClassVar[int]
    terms: _containers.RepeatedCompositeFieldContainer[KeywordTerm]
    def __init__(self, terms: _Optional[_Iterable[_Union[KeywordTerm, _Mapping]]] = ...) -> None: ...

class RemoveTermRequest(_message.Message):
    __slots__ = ("term",)
    TERM_FIELD_NUMBER: _ClassVar[int]
    term: KeywordTerm
    def __init__(self, term: _Optional[_Union[KeywordTerm, _Mapping]] = ...) -> None: ...

class RemoveTermResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
