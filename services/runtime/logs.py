"""Structured logs: one JSON object per line on stderr.

Log events and closed-set fields only: never message text, replies, or keys.

While a gRPC call is served, `current_request()` is its RequestRecord (opened by the call observer,
chatmesh.runtime.call_observer, through chatmesh.runtime.access_log); handlers add what only they know
with `annotate(...)`, and every line logged meanwhile carries the call's request_id, trace_id and span_id.

A line logged with an exception (`log.exception(...)`, or the access line of a handler that failed
unexpectedly) carries its type, `exception`, and its frames, `traceback` (file, line and function of
each, innermost last), never its message: an exception's message can hold a user's text.

A line is encoded once, with orjson; a level that is off costs a level check only, so build nothing for a
line before `log.isEnabledFor(level)` says it will be written.
"""

import json
import logging
import sys
import time
import traceback
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson

# The metadata key of a call's request id: sent by callers and passed downstream as request metadata, and
# returned to callers in the response headers and, with an error, in its trailers.
REQUEST_ID_KEY = "x-request-id"

_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# For the rare line orjson refuses (an integer beyond 64 bits, a key that is not a string).
_ENCODE_ANYTHING = json.JSONEncoder(default=str, ensure_ascii=False).encode


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service
        # The formatted second of the last line, reused while lines come within the same second.
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry: dict[str, Any] = {
            "timestamp": f"{self._second_text}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self._service,
            "event": record.msg,
        }
        entry.update((key, value) for key, value in record.__dict__.items() if key not in _RESERVED)
        request = _current_request.get()
        if request is not None:
            entry.setdefault("request_id", request.request_id)
            if request.tenant:
                entry.setdefault("tenant", request.tenant)
            if request.trace_id:
                entry.setdefault("trace_id", request.trace_id)
                entry.setdefault("span_id", request.span_id)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
            entry["traceback"] = _frames(record.exc_info[2])
        try:
            return orjson.dumps(entry, default=str).decode()
        except TypeError:
            return _ENCODE_ANYTHING(entry)


def _frames(trace: TracebackType | None) -> list[dict[str, Any]]:
    """Where an exception went, outermost frame first: file, line and function of each, and no source text."""
    return [
        {"file": frame.f_code.co_filename, "line": line, "function": frame.f_code.co_name}
        for frame, line in traceback.walk_tb(trace)
    ]


def configure_logging(service: str, level: str) -> None:
    """Sends every log record of the process, as JSON, to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # What a LogRecord gathers that the formatter never writes: the thread, the process, and the caller's
    # file and line (findCaller walks the stack; `_srcfile = None` is logging's documented switch for it).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    # Libraries' own per-request lines carry URLs and free text; only their warnings are wanted.
    for noisy in ("httpx2", "httpcore2", "openai", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    """A logger whose calls read `log.info("event_name", extra={...closed-set fields...})`."""
    return logging.getLogger(name)


@dataclass(slots=True)
class RequestRecord:
    """What the access-log line of one served call says. `user_id` is kept as received and hashed when
    the line is written; `error` is a closed-set kind (chatmesh.runtime.access_log.ErrorKind)."""

    method: str
    started: float
    request_id: str = ""
    trace_id: str = ""
    span_id: str = ""
    # The caller's tenant: set by the gateway once the caller is authenticated, and passed downstream.
    tenant: str = ""
    user_id: str | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None


_current_request: ContextVar[RequestRecord | None] = ContextVar("chatmesh_request", default=None)


def current_request() -> RequestRecord | None:
    """The record of the call being served here, or None outside one."""
    return _current_request.get()


def begin_request(record: RequestRecord) -> None:
    """Makes `record` the current call's (in the handler's task; tasks it starts inherit it)."""
    _current_request.set(record)


def annotate(
    *,
    request_id: str | None = None,
    tenant: str | None = None,
    user_id: str | None = None,
    model: str | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    error: str | None = None,
) -> None:
    """Adds to the current call's access-log line what the handler knows; a no-op outside a call.
    `user_id` is hashed when written; `error` must be an access_log.ErrorKind."""
    record = _current_request.get()
    if record is None:
        return
    if request_id:
        record.request_id = request_id
    if tenant is not None:
        record.tenant = tenant
    if user_id is not None:
        record.user_id = user_id
    if model:
        record.model = model
    if input_tokens is not None:
        record.input_tokens = input_tokens
    if output_tokens is not None:
        record.output_tokens = output_tokens
    if error is not None:
        record.error = error
