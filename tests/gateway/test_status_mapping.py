"""gRPC statuses -> HTTP statuses where the code alone would mislead: RESOURCE_EXHAUSTED is 429
only when waiting helps (RetryInfo), else 413; a stalled upload is 408."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from aiserver.gateway.errors import from_status_proto


def status(code: int, reason: str, retry_s: int | None = None) -> status_pb2.Status:
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="test"))
    details.append(info)
    if retry_s is not None:
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry_s)))
        details.append(retry)
    return status_pb2.Status(code=code, message="m", details=details)


@pytest.mark.parametrize(
    "reason",
    ["UPLOAD_TOO_LARGE", "IMAGE_TOO_MANY_PIXELS", "IMAGE_TOO_MANY_FRAMES", "OUTPUT_TOO_LARGE", "X"],
)
def test_resource_exhausted_without_retry_info_is_413(reason: str) -> None:
    err = from_status_proto(status(code_pb2.RESOURCE_EXHAUSTED, reason))
    assert err.status == 413 and "Retry-After" not in err.headers


@pytest.mark.parametrize("reason", ["RATE_LIMITED", "TOO_MANY_JOBS", "TOO_MANY_UPLOADS", "X"])
def test_resource_exhausted_with_retry_info_is_429_with_retry_after(reason: str) -> None:
    err = from_status_proto(status(code_pb2.RESOURCE_EXHAUSTED, reason, retry_s=3))
    assert err.status == 429 and err.headers["Retry-After"] == "3"


@pytest.mark.parametrize(
    ("reason", "http"), [("UPLOAD_STALLED", 408), ("UPLOAD_TOO_SLOW", 408), ("JOB_TIMEOUT", 504)]
)
def test_deadline_exceeded(reason: str, http: int) -> None:
    assert from_status_proto(status(code_pb2.DEADLINE_EXCEEDED, reason)).status == http
