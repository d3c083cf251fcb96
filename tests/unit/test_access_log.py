"""The access log's pieces that need no server: user id hashing, status codes, and the formatter's request fields."""

import asyncio
import contextvars
import hashlib
import hmac
import json
import logging

import grpc
import pytest

from chatmesh.runtime.access_log import UserIdHasher, _request_id
from chatmesh.runtime.logs import JsonFormatter, RequestRecord, annotate, begin_request, current_request
from chatmesh.runtime.status import served_code
from chatmesh.runtime.tracing import tracing_requested


def test_user_ids_are_an_hmac_of_the_salt_truncated_to_16_hex_digits():
    hasher = UserIdHasher("salt")
    expected = hmac.new(b"salt", b"alice@example.com", hashlib.sha256).hexdigest()[:16]
    assert hasher("alice@example.com") == expected
    assert hasher("alice@example.com") == expected  # the key is reused, not consumed
    assert UserIdHasher("other")("alice@example.com") != expected


def test_only_well_formed_request_ids_are_taken_from_metadata():
    assert _request_id((("x-request-id", "abc-123"),)) == "abc-123"
    assert _request_id((("x-request-id", "has space"),)) == ""
    assert _request_id((("x-request-id", "x" * 129),)) == ""
    assert _request_id(None) == ""


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
