"""How a model call fails, apart from the client (`client`): a process that only handles these errors does not
load the openai SDK and its HTTP stacks (about 25 MiB) by importing them."""

from enum import Enum


class ModelErrorKind(Enum):
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    REJECTED = "rejected"  # the provider refused the request itself (4xx other than 429)


class ModelError(Exception):
    """The model call failed for good; `kind` says how, `retry_after` (seconds) when the provider said,
    `http_status` when the provider answered with an error status."""

    def __init__(
        self, kind: ModelErrorKind, detail: str, retry_after: float | None = None, http_status: int | None = None
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.retry_after = retry_after
        self.http_status = http_status
