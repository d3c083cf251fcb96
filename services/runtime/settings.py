"""Settings, read once from the environment, grouped by the processes that read them: each process parses its own
class (PROCESS_SETTINGS), so that a bad value of another process's setting does not stop it.

    ProcessSettings             every process: addresses, TLS, gRPC transport, shutdown, logs
    ├── ServiceSettings         chatmesh's four services: channels to each other, deadline, Redis, retention
    │   ├── GatewaySettings
    │   └── ModelSettings       the model client, for the services that call a model
    │       ├── DialogueSettings (also ModelContextSettings)
    │       ├── SafetySettings
    │       └── CacheSettings
    └── ModelContextSettings    each model's context size: dialogue's window and modelsim's limit
        └── ModelsimSettings

Every field has a default that works on one machine. Names are `CHATMESH_<FIELD>`, except the OpenAI SDK's own
`OPENAI_API_KEY` and `OPENAI_BASE_URL`. A check across fields lives in the class that has them all.
"""

from typing import Annotated, Literal, Self

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MODELSIM_API_KEY = "modelsim"
# What a request's images leave of grpc_max_message_bytes for the rest of it: its text, system prompt and
# options (2 x 32,000 characters of up to 4 UTF-8 bytes each, and then some).
IMAGE_HEADROOM_BYTES = 1024 * 1024
# What the largest document to ingest leaves of grpc_max_message_bytes for the rest of its request.
KNOWLEDGE_HEADROOM_BYTES = 1024 * 1024


class ConfigurationError(ValueError):
    """A file that settings name (model deployments, server-side tools) is unusable; the message says where and
    why. A process refuses to start on it with that one line, not a stack trace."""


def _set_in_pairs(settings: BaseSettings, pairs: tuple[tuple[str, str], ...]) -> None:
    """Raises ValueError unless each (certificate, key) pair of fields is set together or not at all."""
    for cert, key in pairs:
        if bool(getattr(settings, cert)) != bool(getattr(settings, key)):
            raise ValueError(f"CHATMESH_{cert.upper()} and CHATMESH_{key.upper()} must be set together")


class ProcessSettings(BaseSettings):
    """What every process parses: where each process listens, TLS, gRPC transport, shutdown and logs. modelsim, an
    HTTP server, uses only its address, the shutdown grace and the log level of these."""

    model_config = SettingsConfigDict(env_prefix="CHATMESH_", extra="ignore")

    # Where each process listens, at bind_host: its own port, and the others' (channels default to them, and
    # `chatmesh up` waits on them).
    bind_host: str = "127.0.0.1"
    gateway_port: int = 50051
    dialogue_port: int = 50052
    safety_port: int = 50053
    cache_port: int = 50054
    # modelsim's, and so the model provider's address when OPENAI_API_KEY is unset.
    modelsim_port: int = 8089
    # A plaintext port per process with only grpc.health.v1 on it, for probes that cannot present a client
    # certificate (the kubelet's); 0 serves none.
    gateway_health_port: int = Field(default=0, ge=0, le=65535)
    dialogue_health_port: int = Field(default=0, ge=0, le=65535)
    safety_health_port: int = Field(default=0, ge=0, le=65535)
    cache_health_port: int = Field(default=0, ge=0, le=65535)
    # Prometheus: each process serves /metrics on its own port, at bind_host; 0 turns that process's
    # metrics off (no endpoint, and its gRPC calls are not measured). modelsim has none.
    gateway_metrics_port: int = 9101
    dialogue_metrics_port: int = 9102
    safety_metrics_port: int = 9103
    cache_metrics_port: int = 9104

    # TLS on every gRPC port and channel; with none of these set, every hop is plaintext. PEM files,
    # reloaded when they change (servers: on the next connection; channels: within tls_reload_seconds).
    # The certificate and key of every process's gRPC port. With tls_ca_file, the port requires a client
    # certificate that chains to it (mutual TLS), and channels to other chatmesh processes verify the
    # server's certificate against it and present tls_client_cert_file.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    # The client certificate and key that channels present; empty means tls_cert_file and tls_key_file
    # (a certificate for both server and client auth).
    tls_client_cert_file: str = ""
    tls_client_key_file: str = ""
    # How often channels look for a changed client certificate, key or CA.
    tls_reload_seconds: float = Field(default=5.0, gt=0)

    # gRPC transport, for servers and channels alike. A ChatRequest with its inline images must fit in one
    # message (see max_image_bytes): 4 images of 5 MiB and the longest text take about 20.3 MiB.
    grpc_max_message_bytes: int = 24 * 1024 * 1024
    grpc_keepalive_time_ms: int = 30_000
    grpc_keepalive_timeout_ms: int = 10_000
    # Servers close connections older than this, so clients re-resolve and new replicas get traffic.
    grpc_max_connection_age_ms: int = 300_000
    # On SIGTERM: seconds to keep serving after health turns NOT_SERVING (for load balancers to notice),
    # then seconds that in-flight calls get to finish.
    shutdown_delay_seconds: float = 0.0
    shutdown_grace_seconds: float = 30.0

    log_level: str = "INFO"
    # The key of the HMAC-SHA256 that turns a user id into the `user_id` of log lines (16 hex digits), so
    # that one user's lines can be found without the logs holding the id. Set your own secret value, the
    # same in every process and kept across restarts; with this public default, anyone can test a guess.
    log_user_id_salt: SecretStr = SecretStr("chatmesh-default-log-salt")

    @model_validator(mode="after")
    def _tls_files_in_pairs(self) -> Self:
        _set_in_pairs(self, (("tls_cert_file", "tls_key_file"), ("tls_client_cert_file", "tls_client_key_file")))
        if self.tls_cert_file and not self.tls_ca_file:
            raise ValueError(
                "CHATMESH_TLS_CERT_FILE needs CHATMESH_TLS_CA_FILE: chatmesh's processes authenticate each other "
                "with certificates from that CA (mutual TLS)"
            )
        if self.tls_ca_file and not self.tls_cert_file:
            raise ValueError("CHATMESH_TLS_CA_FILE needs CHATMESH_TLS_CERT_FILE and CHATMESH_TLS_KEY_FILE")
        if self.tls_client_cert_file and not self.tls_cert_file:
            raise ValueError("CHATMESH_TLS_CLIENT_CERT_FILE needs CHATMESH_TLS_CERT_FILE and CHATMESH_TLS_CA_FILE")
        return self

    @property
    def internal_tls(self) -> bool:
        """Whether hops between chatmesh's processes use mutual TLS."""
        return bool(self.tls_cert_file)


class ServiceSettings(ProcessSettings):
    """What chatmesh's four services (gateway, dialogue, safety, cache) share: where they find each other, the
    deadline, Redis, retention and the review queue, and the few settings two of them read."""

    # Where the others find dialogue, safety and cache; unset means this machine at their ports.
    dialogue_target: str = ""
    safety_target: str = ""
    cache_target: str = ""
    # The region of this install (lowercase letters, digits and '-', e.g. "eu-west"). New conversation ids
    # start with it ("eu-west.<id>"), and a call naming another region's conversation gets
    # FAILED_PRECONDITION, naming that region. Empty: ids carry no region.
    region: str = Field(default="", pattern=r"^([a-z][a-z0-9-]{0,30}[a-z0-9])?$")
    # The deadline of a call that sets none.
    default_deadline_seconds: float = 120.0
    # The model when a request names none.
    default_model: str = "gpt-4o-mini"

    # Dialogue, and the gateway's tenants, keys and limits: redis://, or rediss:// for TLS. This Redis must
    # not evict keys (maxmemory-policy noeviction): it holds conversations and usage.
    redis_url: str | None = None
    # Credentials for both Redis URLs (this one and the cache's), in place of any in the URL (ACL user, or only
    # a password).
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    # For rediss:// URLs: the CA that the server's certificate must chain to (empty: the system's), and a
    # client certificate and key, for a Redis that asks for one (tls-auth-clients).
    redis_tls_ca_file: str = ""
    redis_tls_cert_file: str = ""
    redis_tls_key_file: str = ""

    # Every message is erased this long after it was written; 0 keeps them until the conversation is deleted.
    conversation_retention_seconds: float = 7 * 24 * 3600
    # The human-review queue (chatmesh.review; in Redis with redis_url, else in one process's memory). How long
    # a reviewer's claim on a case lasts when the claim sets none; how long a case (with its excerpt of the
    # user's text) is kept, at most conversation_retention_seconds (checked at start).
    review_lease_seconds: float = Field(default=600.0, ge=1, le=86_400)
    review_retention_seconds: float = Field(default=7 * 24 * 3600, gt=0)

    # Per-tenant metrics label at most this many tenants per process; the others count as "other".
    metrics_max_tenants: int = Field(default=100, ge=0)
    # The longest tool result, in characters: a caller's (else INVALID_ARGUMENT), or a server-side tool's
    # response (else the model is told the result was too long).
    tool_max_result_chars: int = Field(default=32_000, ge=1)
    # Personal information (safety's PII screen finds it, dialogue applies this), per kind: email, phone, cn_id,
    # payment_card, ip_address. "leave": nothing changes. "storage": the stored history (so every later window)
    # holds placeholders such as [PHONE_1], while the model and the caller see the original in the turn it is
    # sent; logs hold no text, and a turn with such information is never cached. "model": the model sees
    # placeholders too, and the caller's reply has the originals restored, the same placeholder for the same
    # value in every turn of a conversation. A kind left out is left; an unknown kind or mode stops the process,
    # naming it.
    pii_policy: dict[
        Literal["email", "phone", "cn_id", "payment_card", "ip_address"], Literal["leave", "storage", "model"]
    ] = {
        "email": "storage",
        "phone": "storage",
        "cn_id": "storage",
        "payment_card": "storage",
        "ip_address": "leave",
    }
    # Off: only first turns are looked up semantically. On: follow-ups too, matched only among questions asked
    # after exactly the same history (dialogue then asks the cache about follow-ups, as with cache_follow_ups).
    semantic_cache_follow_ups: bool = False

    @model_validator(mode="after")
    def _local_targets(self) -> Self:
        for service in ("dialogue", "safety", "cache"):
            if not getattr(self, f"{service}_target"):
                setattr(self, f"{service}_target", f"127.0.0.1:{getattr(self, f'{service}_port')}")
        return self

    @model_validator(mode="after")
    def _redis_tls_files_in_pair(self) -> Self:
        _set_in_pairs(self, (("redis_tls_cert_file", "redis_tls_key_file"),))
        return self

    @model_validator(mode="after")
    def _review_cases_within_retention(self) -> Self:
        if self.conversation_retention_seconds and self.review_retention_seconds > self.conversation_retention_seconds:
            raise ValueError(
                "CHATMESH_REVIEW_RETENTION_SECONDS must be at most CHATMESH_CONVERSATION_RETENTION_SECONDS: a review "
                "case holds an excerpt of the user's text, which is kept no longer than the conversation"
            )
        return self


class GatewaySettings(ServiceSettings):
    """The gateway's: callers, keys and limits, what a request may hold, the admin and review APIs."""

    # The public gateway port's own certificate and key (empty: tls_cert_file and tls_key_file). The public
    # port never asks for a client certificate: callers authenticate with API keys.
    gateway_tls_cert_file: str = ""
    gateway_tls_key_file: str = ""

    # Limits on what a caller may send.
    max_message_chars: int = 32_000
    # Images that go with a message: at most this many, and each inline image at most this many bytes.
    # Every image of a request crosses each gRPC hop in one message, so max_images_per_message x
    # max_image_bytes must stay below grpc_max_message_bytes by at least IMAGE_HEADROOM_BYTES (checked at
    # start).
    max_images_per_message: int = Field(default=4, ge=0)
    max_image_bytes: int = Field(default=5 * 1024 * 1024, ge=1)
    max_system_prompt_chars: int = 32_000
    max_output_tokens: int = 16_384
    # The most tools one request may offer (its own and the server-side ones it names together).
    tool_max_tools: int = Field(default=128, ge=1, le=128)

    # Callers and tenants. "required": every ChatService call needs an API key. "off": a call without a key
    # acts as the tenant `default` (a call with one is still checked); allowed only when bind_host is a
    # loopback address, and the gateway refuses to start otherwise.
    auth: Literal["required", "off"] = "off"
    # The credential of the AdminService (`authorization: Bearer <token>`). Unset: the admin API refuses
    # every call, except with auth "off" (loopback only), where it needs no token.
    admin_token: SecretStr | None = None
    # The key of the HMAC-SHA256 under which API keys are stored. The same in every gateway and kept across
    # restarts: changing it invalidates every key. Keys are 256-bit random, so the public default does
    # not make them guessable, but set a secret of your own.
    api_key_pepper: SecretStr = SecretStr("chatmesh-default-api-key-pepper")
    # How long a gateway trusts a key (and its tenant's limits) it has verified before checking the store
    # again: a revoked key or a changed limit takes effect on every replica within this time.
    auth_cache_seconds: float = Field(default=1.0, ge=0, le=1.5)
    # When Redis cannot be reached: requests per minute and concurrent streams are skipped ("open") or the
    # call fails with UNAVAILABLE ("closed"). API keys are never accepted unverified: a key not verified
    # within auth_cache_seconds fails with UNAVAILABLE. (Tokens per minute and budgets: dialogue's
    # spend_limits_fail_open.)
    request_limits_fail_open: bool = True

    # Knowledge ingestion (KnowledgeService, an admin call): the most documents in one request, and the largest
    # document, within one gRPC message.
    knowledge_max_documents_per_request: int = Field(default=256, ge=1, le=10_000)
    knowledge_max_document_bytes: int = Field(default=16 * 1024 * 1024, ge=1)

    # How often the gateway sweeps the review queue (trims handled entries, drops idle reviewers).
    review_sweep_seconds: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _public_tls_files_in_pair(self) -> Self:
        _set_in_pairs(self, (("gateway_tls_cert_file", "gateway_tls_key_file"),))
        return self

    @model_validator(mode="after")
    def _images_fit_in_a_message(self) -> Self:
        if self.max_images_per_message * self.max_image_bytes + IMAGE_HEADROOM_BYTES > self.grpc_max_message_bytes:
            raise ValueError(
                "CHATMESH_MAX_IMAGES_PER_MESSAGE x CHATMESH_MAX_IMAGE_BYTES must be at least "
                f"{IMAGE_HEADROOM_BYTES} bytes below CHATMESH_GRPC_MAX_MESSAGE_BYTES: a request with every "
                "image it may carry must fit in one gRPC message"
            )
        return self

    @model_validator(mode="after")
    def _documents_fit_in_a_message(self) -> Self:
        if self.knowledge_max_document_bytes + KNOWLEDGE_HEADROOM_BYTES > self.grpc_max_message_bytes:
            raise ValueError(
                f"CHATMESH_KNOWLEDGE_MAX_DOCUMENT_BYTES must be at least {KNOWLEDGE_HEADROOM_BYTES} bytes below "
                "CHATMESH_GRPC_MAX_MESSAGE_BYTES: a document is sent to be ingested in one gRPC message"
            )
        return self


class ModelSettings(ServiceSettings):
    """The model client's (chatmesh.model), for the services that call a model: dialogue (chat, summaries,
    embeddings), safety (moderation) and cache (the semantic cache's embeddings)."""

    # The model provider, as the openai SDK names it. Without a key, the bundled simulator is used.
    openai_api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("OPENAI_API_KEY"))
    openai_base_url: str | None = Field(default=None, validation_alias=AliasChoices("OPENAI_BASE_URL"))
    model_max_attempts: int = 4
    model_backoff_initial_seconds: float = 0.25
    model_backoff_max_seconds: float = 8.0
    # Model deployments (chatmesh.model.deployments): a YAML file mapping each model name callers use to its
    # deployments (base URL, keys from the environment or files, upstream name, price, weight), key pools and
    # circuit breakers; checked at start. Empty: one deployment from OPENAI_API_KEY / OPENAI_BASE_URL.
    model_deployments_file: str = ""
    # The longest wait for a deployment's first streamed item before the attempt is abandoned (a hung
    # upstream) and the next deployment is tried; a deployment of the file may set its own.
    model_first_token_timeout_seconds: float = Field(default=15.0, gt=0)
    # USD per million tokens, (input, output), by model name.
    model_prices_usd_per_million: dict[str, tuple[float, float]] = {
        "gpt-4o-mini": (0.15, 0.60),
        "gpt-4o": (2.50, 10.00),
        "gpt-4.1-mini": (0.40, 1.60),
        "gpt-4.1": (2.00, 8.00),
        # Embeddings (the semantic cache's and the knowledge base's) bill input tokens only.
        "text-embedding-3-small": (0.02, 0.0),
        "text-embedding-3-large": (0.13, 0.0),
    }
    # The model of the provider's /v1/moderations (safety's moderation).
    safety_moderation_model: str = "omni-moderation-latest"
    # The provider's embedding model, and the dimensions asked of it (0: the model's own). Both are part of every
    # semantic scope, so changing them never mixes vectors.
    embedding_model: str = "text-embedding-3-small"
    embedding_dimensions: int = Field(default=256, ge=0, le=8192)
    # How long a semantic lookup waits for the embedding endpoint; past it, the lookup is a (logged) miss.
    embedding_timeout_seconds: float = Field(default=0.3, gt=0)

    def model_endpoint(self) -> tuple[str, str]:
        """The (base URL, API key) of the model provider: the configured one, else the simulator."""
        if self.openai_api_key is not None:
            return self.openai_base_url or "https://api.openai.com/v1", self.openai_api_key.get_secret_value()
        return self.openai_base_url or f"http://127.0.0.1:{self.modelsim_port}/v1", MODELSIM_API_KEY


class ModelContextSettings(ProcessSettings):
    """Each model's context size: dialogue fits a turn's window to it, and modelsim refuses a request past it as a
    provider does."""

    # Model-name prefix to context tokens (the longest prefix wins); default_context_tokens for the others.
    model_context_tokens: dict[str, int] = {
        "gpt-4o": 128_000,
        "chatgpt-4o": 128_000,
        "gpt-4.1": 1_047_576,
        "gpt-4.5": 128_000,
        "o1": 200_000,
        "o3": 200_000,
        "o4": 200_000,
        "gpt-4-turbo": 128_000,
        "gpt-4": 8_192,
        "gpt-3.5-turbo": 16_385,
    }
    default_context_tokens: int = Field(default=8_192, ge=256)


class DialogueSettings(ModelSettings, ModelContextSettings):
    """Dialogue's: conversations and their window, summaries, tools, spend, the cache and safety as dialogue uses
    them, and knowledge bases."""

    # The window a turn sends the model: the system prompt, the summary, then as many of the newest messages as
    # fit the model's context (model_context_tokens, by longest model-name prefix; default_context_tokens for
    # others) minus the reply's max_tokens (window_reply_tokens when the request sets none) and a margin. At
    # most window_max_messages stored messages are read for it. Tokens are counted with the model's encoding:
    # model_encodings adds prefixes (to cl100k_base or o200k_base) to, or overrides, the table of
    # chatmesh.dialogue.tokens; models that none matches are counted by an estimate.
    window_max_messages: int = Field(default=100, ge=1, le=1000)
    window_reply_tokens: int = Field(default=4096, ge=1)
    window_margin_tokens: int = Field(default=128, ge=0)
    model_encodings: dict[str, str] = {}
    # When the stored messages that no longer fit the window hold this many tokens beyond the summary, dialogue
    # asks summary_model (empty: the conversation's own model) for a summary of them, after the reply, in at
    # most summary_max_tokens; the summary then stands in for them.
    summary_trigger_tokens: int = Field(default=2_000, ge=1)
    summary_model: str = ""
    summary_max_tokens: int = Field(default=512, ge=16)
    # The most messages a conversation keeps: past it, the oldest go first (the summary covers them).
    conversation_max_messages: int = Field(default=1_000, ge=2)
    # How long a turn's idempotency key (and the reply a retry is given) is remembered; never longer than
    # the conversation's retention.
    idempotency_ttl_seconds: float = Field(default=86_400.0, gt=0)
    # Without Redis, the most conversations one dialogue process keeps (least recently used go first).
    memory_store_max_conversations: int = 10_000
    # Dialogue sends its calls to safety (the input and tool screens) and to cache (lookups and stores) as messages
    # on this many long-lived streams per channel (chatmesh.runtime.multiplex) rather than as unary calls: a quarter
    # to a third less CPU for a turn's calls (python -m bench.multiplex). Calls go round robin over the streams, and
    # each stream to one replica: keep it at least the number of safety or cache replicas. 0: unary calls.
    multiplex_streams: int = Field(default=4, ge=0, le=64)

    # Spend limits. When Redis cannot be reached, tokens per minute and budgets are skipped ("open") or the
    # call fails with UNAVAILABLE ("closed"). A request that sets no max_tokens, from a tenant with a token or
    # spend limit, asks the model for at most limits_default_max_tokens, so that its worst case (and so its
    # reservation) is bounded.
    spend_limits_fail_open: bool = False
    limits_default_max_tokens: int = Field(default=4096, ge=1)

    # Function calling. The operator's server-side tools (HTTP endpoints, see chatmesh.dialogue.server_tools);
    # unset: only the built-in ones.
    tools_file: str = ""
    # The most model calls in one turn: each server-side round (the model calls tools chatmesh runs, and is
    # called again with their results) takes one, and the last is made with tool_choice none, so that the turn
    # ends with an answer. At least 2: one call that runs tools, one that answers from their results.
    tool_max_steps: int = Field(default=8, ge=2, le=64)
    # A server-side tool's timeout when its declaration sets none.
    tool_timeout_seconds: float = Field(default=10.0, gt=0)

    # The answer cache, as dialogue uses it. Off: dialogue neither looks up nor stores any answer (exact or
    # semantic); the cache process still runs.
    cache_answers: bool = True
    # Off: dialogue looks up and stores first turns only. A follow-up's answer is keyed by the whole history before
    # it, which another conversation seldom repeats word for word, so storing it would cost a cache write per turn
    # for nothing. On (or with semantic_cache_follow_ups on): follow-ups too.
    cache_follow_ups: bool = False
    # Dialogue neither looks up nor stores requests with a temperature above this. A request that sets no
    # temperature is cached: set one above this bound to opt out.
    cache_max_temperature: float = 0.5
    # How long dialogue waits for a lookup before answering from the model instead.
    cache_lookup_timeout_seconds: float = 0.5

    # When dialogue cannot reach the safety service: fail the turn with UNAVAILABLE (the default), or
    # answer it unscreened.
    safety_fail_open: bool = False

    # knowledge base (chatmesh.dialogue.knowledge): the operator's documents, per tenant, in Redis with redis_url
    # (else in one dialogue process's memory), embedded with embedding_model at embedding_dimensions. Ingestion
    # splits documents into chunks of at most knowledge_chunk_tokens tokens, each after the first of a section
    # starting with up to knowledge_chunk_overlap_tokens of the one before (less than half a chunk); changing
    # either re-chunks every document on its next ingestion.
    knowledge_chunk_tokens: int = Field(default=300, ge=32, le=8192)
    knowledge_chunk_overlap_tokens: int = Field(default=50, ge=0)
    # A turn's retrieval: the most chunks it takes, and the most tokens of them its window gets.
    knowledge_top_k: int = Field(default=4, ge=1, le=50)
    knowledge_context_max_tokens: int = Field(default=1500, ge=1)
    # The share of the vector similarity in a chunk's score (the rest is BM25's), and the cosine similarity a chunk
    # needs to be taken at all (0: no minimum).
    knowledge_vector_weight: float = Field(default=0.5, ge=0, le=1)
    knowledge_min_similarity: float = Field(default=0.0, ge=0, lt=1)
    # How often a dialogue process asks the store whether the knowledge bases it holds in memory changed, and the
    # bytes it holds (the least recently searched go first).
    knowledge_version_check_seconds: float = Field(default=1.0, gt=0, le=3600)
    knowledge_memory_max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # How long one embedding request of an ingestion, of up to 64 chunks, may take.
    knowledge_embedding_timeout_seconds: float = Field(default=30.0, gt=0, le=600)

    @model_validator(mode="after")
    def _knowledge_overlap_under_half_a_chunk(self) -> Self:
        if self.knowledge_chunk_overlap_tokens >= self.knowledge_chunk_tokens // 2:
            raise ValueError(
                "CHATMESH_KNOWLEDGE_CHUNK_OVERLAP_TOKENS must be less than half of CHATMESH_KNOWLEDGE_CHUNK_TOKENS: "
                "the overlap repeats the end of the chunk before"
            )
        return self


class SafetySettings(ModelSettings):
    """Safety's: keyword lists, the moderation endpoint for input and streamed output, and the review policy."""

    # A keyword file, or a folder of them (`category<TAB>term` lines); unset means the list shipped
    # with chatmesh. Files are polled every `safety_keywords_reload_seconds` and reloaded on change.
    safety_keywords: str | None = None
    safety_keywords_reload_seconds: float = 5.0
    # The provider's /v1/moderations on input: "auto" is on when a real OPENAI_API_KEY is set.
    safety_moderation: Literal["auto", "on", "off"] = "auto"
    # When the moderation endpoint fails: block the input (the default), or let it through.
    safety_moderation_fail_open: bool = False
    # Moderation category to the score (0 to 1) at or above which it matches, e.g. {"violence": 0.4}; a
    # category without one matches when the endpoint flags it.
    safety_moderation_thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] = {}
    # With moderation on, replies are moderated too, in windows of this many characters as they stream: text
    # is released once the keyword lists and the moderation of its window cleared it (the last window when
    # the reply ends).
    safety_moderate_output: bool = True
    safety_output_moderation_window_chars: int = Field(default=1000, ge=1)
    # What a verdict's categories (the keyword lists' and the moderation endpoint's) do: category to "block",
    # "block_and_review" (blocked, and a review case opened) or "allow_and_review" (let out, and a case
    # opened); "*" sets the action of the categories not named, else they block.
    review_policy: dict[str, Literal["block", "block_and_review", "allow_and_review"]] = {}


class CacheSettings(ModelSettings):
    """The cache's: answers already given, in an in-process LRU and, when a Redis is set, in Redis too; and the
    semantic cache."""

    # The Redis of the answer cache, which may evict (allkeys-lru); unset means redis_url.
    cache_redis_url: str | None = None
    # How long an answer is kept, in both tiers.
    cache_ttl_seconds: float = 3600.0
    # The in-process tier's bound: the bytes of its keys and values.
    cache_memory_max_bytes: int = 64 * 1024 * 1024
    # With Redis, the longest an answer stays in a cache process's memory: the most a process that missed an
    # erasure (its subscription to Redis lost at that moment) may still serve what was erased.
    cache_memory_ttl_seconds: float = Field(default=60.0, gt=0)
    # Connect and reply timeout of the cache's Redis calls; past it the lookup is a miss.
    cache_redis_timeout_seconds: float = 0.5
    # The semantic cache (chatmesh.cache.semantic): on an exact miss, the answer to a question close enough in
    # meaning, within the same scope, that passes the guards. Off by default: it answers paraphrases, and each
    # miss it looks up waits for one embedding call.
    semantic_cache: bool = False
    # The cosine similarity a cached question needs, with the embedding model (see the README on tuning it).
    semantic_cache_threshold: float = Field(default=0.95, gt=0, le=1)
    # The questions kept per scope (tenant, model, system prompt, sampling options, embedding model); the oldest
    # go first. A full scope of 256-dimension vectors takes about 10 MiB of each cache process's memory.
    semantic_cache_max_entries: int = Field(default=10_000, ge=1)
    # The bytes of vectors a cache process keeps in memory across scopes; the least recently searched go first.
    semantic_cache_memory_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)

    @model_validator(mode="after")
    def _cache_redis_defaults_to_redis(self) -> Self:
        if self.cache_redis_url is None:
            self.cache_redis_url = self.redis_url
        return self

    @model_validator(mode="after")
    def _answers_within_retention(self) -> Self:
        if self.conversation_retention_seconds and self.cache_ttl_seconds > self.conversation_retention_seconds:
            raise ValueError(
                "CHATMESH_CACHE_TTL_SECONDS must be at most CHATMESH_CONVERSATION_RETENTION_SECONDS: cached answers "
                "and the semantic cache's questions hold the user's text, which is kept no longer than the conversation"
            )
        return self


class ModelsimDeployment(BaseModel):
    """One simulated upstream of modelsim's, on its own port (an entry of CHATMESH_MODELSIM_DEPLOYMENTS). A field
    left out takes the modelsim_* setting of the same name."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(ge=0, le=65535)
    reply_tokens: int | None = Field(default=None, ge=0)
    first_token_latency_seconds: float | None = Field(default=None, ge=0)
    token_delay_seconds: float | None = Field(default=None, ge=0)
    error_429_rate: float | None = Field(default=None, ge=0, le=1)
    error_500_rate: float | None = Field(default=None, ge=0, le=1)
    retry_after_seconds: float | None = Field(default=None, ge=0)
    hang_rate: float | None = Field(default=None, ge=0, le=1)
    hang_seconds: float | None = Field(default=None, ge=0)
    unauthorized_keys: list[str] | None = None


def _distinct_ports(deployments: list[ModelsimDeployment]) -> list[ModelsimDeployment]:
    seen: dict[int, int] = {}
    for index, deployment in enumerate(deployments):
        if deployment.port and deployment.port in seen:
            raise ValueError(
                f"entry {index} has port {deployment.port}, the port of entry {seen[deployment.port]}: "
                "each deployment needs its own port"
            )
        seen[deployment.port] = index
    return deployments


class ModelsimSettings(ModelContextSettings):
    """modelsim's, the bundled OpenAI-compatible simulator (on modelsim_port)."""

    modelsim_reply_tokens: int = 50
    modelsim_first_token_latency_seconds: float = 0.2
    modelsim_token_delay_seconds: float = 0.02
    modelsim_error_429_rate: float = 0.0
    modelsim_error_500_rate: float = 0.0
    modelsim_retry_after_seconds: float = 1.0
    # The share of chat requests that hang: no response, not even headers, until the client goes away or
    # modelsim_hang_seconds pass (then the connection is closed).
    modelsim_hang_rate: float = Field(default=0.0, ge=0, le=1)
    modelsim_hang_seconds: float = Field(default=300.0, ge=0)
    # Several independent simulated upstreams in one process, each on its own port with its own faults, latency,
    # stats and /sim/ endpoints: a JSON list of objects, each a `port` and any of reply_tokens,
    # first_token_latency_seconds, token_delay_seconds, error_429_rate, error_500_rate, retry_after_seconds,
    # hang_rate, hang_seconds and unauthorized_keys (the other modelsim_* settings stand for those left out).
    # Empty: one upstream on modelsim_port.
    modelsim_deployments: Annotated[list[ModelsimDeployment], AfterValidator(_distinct_ports)] = []


# What `chatmesh <process>` parses: each process's own settings, and no other's.
PROCESS_SETTINGS: dict[str, type[ProcessSettings]] = {
    "gateway": GatewaySettings,
    "dialogue": DialogueSettings,
    "safety": SafetySettings,
    "cache": CacheSettings,
    "modelsim": ModelsimSettings,
}
