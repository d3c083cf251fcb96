from chatmesh.v1 import chat_pb2 as _chat_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_TIER_UNSPECIFIED: _ClassVar[CacheTier]
    CACHE_TIER_MEMORY: _ClassVar[CacheTier]
    CACHE_TIER_REDIS: _ClassVar[CacheTier]
CACHE_TIER_UNSPECIFIED: CacheTier
CACHE_TIER_MEMORY: CacheTier
CACHE_TIER_REDIS: CacheTier

class AnswerContext(_message.Message):
    __slots__ = ("tenant", "model", "system_prompt", "temperature", "top_p", "max_tokens", "stop", "seed", "messages", "presence_penalty", "frequency_penalty", "logit_bias", "response_format", "knowledge_versions")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class KnowledgeVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    system_prompt: str
    temperature: float
    top_p: float
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    messages: _containers.RepeatedCompositeFieldContainer[ContextMessage]
    presence_penalty: float
    frequency_penalty: float
    logit_bias: _containers.ScalarMap[int, int]
    response_format: _chat_pb2.ResponseFormat
    knowledge_versions: _containers.ScalarMap[str, str]
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., system_prompt: _Optional[str] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[ContextMessage, _Mapping]]] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, int]] = ..., response_format: _Optional[_Union[_chat_pb2.ResponseFormat, _Mapping]] = ..., knowledge_versions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ContextMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: _chat_pb2.Role
    content: str
    def __init__(self, role: _Optional[_Union[_chat_pb2.Role, str]] = ..., content: _Optional[str] = ...) -> None: ...

class CachedReply(_message.Message):
    __slots__ = ("text", "finish_reason", "output_tokens", "policy_version", "citations")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: _chat_pb2.FinishReason
    output_tokens: int
    policy_version: str
    citations: _containers.RepeatedCompositeFieldContainer[_chat_pb2.Citation]
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[_chat_pb2.FinishReason, str]] = ..., output_tokens: _Optional[int] = ..., policy_version: _Optional[str] = ..., citations: _Optional[_Iterable[_Union[_chat_pb2.Citation, _Mapping]]] = ...) -> None: ...

class SemanticEntry(_message.Message):
    __slots__ = ("answer_key", "question", "vector")
    ANSWER_KEY_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    answer_key: str
    question: str
    vector: bytes
    def __init__(self, answer_key: _Optional[str] = ..., question: _Optional[str] = ..., vector: _Optional[bytes] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("context",)
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    context: AnswerContext
    def __init__(self, context: _Optional[_Union[AnswerContext, _Mapping]] = ...) -> None: ...

class LookupSimilarRequest(_message.Message):
    __slots__ = ("context", "embedding")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    context: AnswerContext
    embedding: QuestionEmbedding
    def __init__(self, context: _Optional[_Union[AnswerContext, _Mapping]] = ..., embedding: _Optional[_Union[QuestionEmbedding, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("hit", "reply", "tier", "match", "similarity", "embedding", "similar_lookup")
    HIT_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    SIMILAR_LOOKUP_FIELD_NUMBER: _ClassVar[int]
    hit: bool
    reply: CachedReply
    tier: CacheTier
    match: _chat_pb2.CacheMatch
    similarity: float
    embedding: QuestionEmbedding
    similar_lookup: bool
    def __init__(self, hit: _Optional[bool] = ..., reply: _Optional[_Union[CachedReply, _Mapping]] = ..., tier: _Optional[_Union[CacheTier, str]] = ..., match: _Optional[_Union[_chat_pb2.CacheMatch, str]] = ..., similarity: _Optional[float] = ..., embedding: _Optional[_Union[QuestionEmbedding, _Mapping]] = ..., similar_lookup: _Optional[bool] = ...) -> None: ...

class QuestionEmbedding(_message.Message):
    __slots__ = ("model", "dimensions", "vector")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    dimensions: int
    vector: bytes
    def __init__(self, model: _Optional[str] = ..., dimensions: _Optional[int] = ..., vector: _Optional[bytes] = ...) -> None: ...

class StoreRequest(_message.Message):
    __slots__ = ("context", "reply", "user_id", "conversation_id", "embedding")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    context: AnswerContext
    reply: CachedReply
    user_id: str
    conversation_id: str
    embedding: QuestionEmbedding
    def __init__(self, context: _Optional[_Union[AnswerContext, _Mapping]] = ..., reply: _Optional[_Union[CachedReply, _Mapping]] = ..., user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., embedding: _Optional[_Union[QuestionEmbedding, _Mapping]] = ...) -> None: ...

class StoreResponse(_message.Message):
    __slots__ = ("stored", "tiers")
    STORED_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    tiers: _containers.RepeatedScalarFieldContainer[CacheTier]
    def __init__(self, stored: _Optional[bool] = ..., tiers: _Optional[_Iterable[_Union[CacheTier, str]]] = ...) -> None: ...

class EraseRequest(_message.Message):
    __slots__ = ("tenant", "user_id", "conversation_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    user_id: str
    conversation_id: str
    def __init__(self, tenant: _Optional[str] = ..., user_id: _Optional[str] = ..., conversation_id: _Optional[str] = ...) -> None: ...

class EraseResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: int
    def __init__(self, entries: _Optional[int] = ...) -> None: ...
