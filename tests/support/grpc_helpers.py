"""Helpers for tests that call the service: upload streams and rich-status decoding."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

CHUNK = 256 * 1024


def upload_messages(
    request_type: Any, params: Any, files: dict[str, bytes], chunk: int = CHUNK
) -> Iterator[Any]:
    """The request stream of an upload RPC: params first, then each file in chunks."""
    from imagetasks.v1 import common_pb2

    yield request_type(params=params)
    for field, data in files.items():
        for start in range(0, max(len(data), 1), chunk):
            yield request_type(
                chunk=common_pb2.FileChunk(
                    field=field, data=data[start : start + chunk], file_name=f"{field}.bin"
                )
            )


def rich_status(err: grpc.aio.AioRpcError) -> tuple[status_pb2.Status, dict[str, Any]]:
    """The google.rpc.Status of a failed call, and its details by type name."""
    raw = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw, f"no rich status on {err.code()} {err.details()}"
    status = status_pb2.Status.FromString(raw)
    details: dict[str, Any] = {}
    for any_msg in status.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                details[cls.DESCRIPTOR.name] = msg
    return status, details


def violated_fields(details: dict[str, Any]) -> list[str]:
    bad = details.get("BadRequest")
    return [v.field for v in bad.field_violations] if bad else []


async def send_all(call: Any, messages: Any) -> None:
    """Write an upload through ``call``; stops quietly when the server ends the call early.

    (Handing grpc.aio an iterator instead hides the server's status behind a local INTERNAL
    error when the server rejects the upload while it is still being sent.)
    """
    for msg in messages:
        if call.done():
            return
        try:
            await call.write(msg)
        except Exception:  # the RPC ended: its status is read by the caller
            if call.done():
                return
            raise
    if not call.done():
        await call.done_writing()
