"""The access log's pieces that need no server: user id hashing, caller ids, status codes, and the JSON formatter
(request fields, exceptions, what logging skips)."""

import asyncio
import contextvars
import hashlib
import hmac
import json
import logging
import sys
from collections.abc import Iterator

import grpc
import pytest

from chatmesh.runtime.access_log import TENANT_KEY, AccessLog, UserIdHasher
from chatmesh.runtime.logs import (
    JsonFormatter,
    RequestRecord,
    annotate,
    begin_request,
    configure_logging,
    current_request,
)
from chatmesh.runtime.settings import ProcessSettings
from chatmesh.runtime.status import served_code
from chatmesh.runtime.tracing import tracing_requested


def test_user_ids_are_an_hmac_of_the_salt_truncated_to_16_hex_digits():
    hasher = UserIdHasher("salt")
    expected = hmac.new(b"salt", b"alice@example.com", hashlib.sha256).hexdigest()[:16]
    assert hasher("alice@example.com") == expected
    assert hasher("alice@example.com") == expected  # the key is reused, not consumed
    assert UserIdHasher("other")("alice@example.com") != expected


@pytest.mark.parametrize(
    ("metadata", "request_id", "tenant"),
    [
        ((("x-request-id", "abc-123"), (TENANT_KEY, "acme")), "abc-123", "acme"),
        ((("x-request-id", "has space"), (TENANT_KEY, "Not A Tenant")), "", ""),
        ((("x-request-id", "x" * 129),), "", ""),
        ((("x-request-id", "first"), ("x-request-id", "second")), "first", ""),
        (None, "", ""),
    ],
)
def test_only_well_formed_request_ids_and_tenants_are_taken_from_metadata(
    metadata: object, request_id: str, tenant: str
):
    def begin() -> RequestRecord:
        return AccessLog(ProcessSettings()).begin("chatmesh.v1.SafetyService/ScreenInput", metadata)

    record = contextvars.copy_context().run(begin)
    assert (record.request_id, record.tenant) == (request_id, tenant)


class FakeContext:
    def __init__(self, code: grpc.StatusCode | None = None, remaining: float | None = None) -> None:
        self._code, self._remaining = code, remaining

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def time_remaining(self) -> float | None:
        return self._remaining


@pytest.mark.parametrize(
    ("context", "error", "code"),
    [
        (FakeContext(), None, grpc.StatusCode.OK),
        (FakeContext(grpc.StatusCode.NOT_FOUND), grpc.aio.AbortError(), grpc.StatusCode.NOT_FOUND),
        (FakeContext(), RuntimeError("bug"), grpc.StatusCode.UNKNOWN),
        (FakeContext(remaining=5.0), asyncio.CancelledError(), grpc.StatusCode.CANCELLED),
        (FakeContext(remaining=0.0), asyncio.CancelledError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (FakeContext(), GeneratorExit(), grpc.StatusCode.CANCELLED),
    ],
)
def test_a_call_ends_with_the_status_its_caller_sees(
    context: FakeContext, error: BaseException | None, code: grpc.StatusCode
):
    assert served_code(context, error) is code  # type: ignore[arg-type]


def test_lines_logged_during_a_call_carry_its_request_and_trace_ids_and_annotate_is_a_no_op_outside_one():
    formatter = JsonFormatter("dialogue")

    def line(**extra: object) -> dict[str, object]:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "model_retry", None, None)
        record.__dict__.update(extra)
        return json.loads(formatter.format(record))

    def inside_a_call() -> None:
        begin_request(RequestRecord(method="m", started=0.0, request_id="r1", trace_id="t" * 32, span_id="s" * 16))
        annotate(model="gpt-4o-mini", input_tokens=3, error="model_timeout")
        record = current_request()
        assert record is not None and (record.model, record.input_tokens, record.error) == (
            "gpt-4o-mini",
            3,
            "model_timeout",
        )
        assert line()["request_id"] == "r1" and line()["trace_id"] == "t" * 32 and line()["span_id"] == "s" * 16
        assert line(request_id="own")["request_id"] == "own"

    contextvars.copy_context().run(inside_a_call)
    annotate(model="ignored")
    assert current_request() is None
    assert "request_id" not in line()


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_tracing_is_on_only_when_an_otlp_endpoint_is_set(environ: dict[str, str], on: bool):
    assert tracing_requested(environ) is on


def formatted(record: logging.LogRecord) -> str:
    return JsonFormatter("safety").format(record)


def test_an_exception_is_logged_with_its_type_and_frames_never_its_message():
    def failing_step() -> None:
        raise ValueError("a user's secret text")

    try:
        failing_step()
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "step_failed", None, sys.exc_info())
    text = formatted(record)
    line = json.loads(text)
    assert "secret" not in text
    assert line["event"] == "step_failed" and line["exception"] == "ValueError"
    frames = line["traceback"]
    assert [frame["function"] for frame in frames] == [
        "test_an_exception_is_logged_with_its_type_and_frames_never_its_message",
        "failing_step",
    ]
    assert all(frame["file"] == __file__ and isinstance(frame["line"], int) for frame in frames)


def test_a_value_the_fast_encoder_refuses_is_still_written():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "counted", None, None)
    record.__dict__.update(big=2**70, by_code={404: 1}, kinds={"a"})
    assert json.loads(formatted(record)) | {"timestamp": None} == {
        "timestamp": None,
        "level": "info",
        "service": "safety",
        "event": "counted",
        "big": 2**70,
        "by_code": {"404": 1},
        "kinds": "{'a'}",
    }


@pytest.fixture
def configured_logging() -> Iterator[None]:
    """configure_logging's changes to the process's logging, undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    switches = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing, logging._srcfile)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing, logging._srcfile = switches


def test_records_skip_what_the_formatter_never_writes(configured_logging: None):
    configure_logging("safety", "info")
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("chatmesh.test_records")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        logger.info("something_happened")
    finally:
        logger.removeHandler(handler)
    (record,) = records
    assert (record.thread, record.threadName, record.process, record.processName) == (None, None, None, None)
    # logging._srcfile = None skips findCaller: this fails if logging stops honouring it.
    assert (record.pathname, record.lineno, record.funcName) == ("(unknown file)", 0, "(unknown function)")
