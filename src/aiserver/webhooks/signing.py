"""Webhook signatures in the Standard Webhooks style.

Headers: ``webhook-id``, ``webhook-timestamp`` (unix seconds) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``; several space-separated
signatures are accepted when verifying, so a receiver survives a secret rotation).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

__all__ = [
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "SignatureError",
    "sign",
    "signature_headers",
    "verify",
]

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


class SignatureError(ValueError):
    """A webhook whose headers or signature do not check out."""


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one delivery attempt."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_headers(
    secret: bytes | None, msg_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    """The three headers (two without a secret) for one attempt."""
    ts = int(time.time()) if timestamp is None else timestamp
    headers = {ID_HEADER: msg_id, TIMESTAMP_HEADER: str(ts)}
    if secret is not None:
        headers[SIGNATURE_HEADER] = sign(secret, msg_id, ts, body)
    return headers


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    raise SignatureError(f"missing {name} header")


def verify(
    secret: bytes,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_s: float = 300,
    *,
    now: float | None = None,
) -> None:
    """Raise :class:`SignatureError` unless ``body`` was signed with ``secret`` recently.

    ``headers`` may be any mapping (names are matched case-insensitively). The timestamp must
    be within ``tolerance_s`` of ``now`` either way, which bounds replays.
    """
    msg_id = _header(headers, ID_HEADER)
    raw_ts = _header(headers, TIMESTAMP_HEADER)
    if not raw_ts.isascii() or not raw_ts.isdigit():
        raise SignatureError("malformed webhook-timestamp")
    timestamp = int(raw_ts)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise SignatureError("webhook-timestamp outside the tolerance")
    expected = sign(secret, msg_id, timestamp, body).encode("ascii")
    for candidate in _header(headers, SIGNATURE_HEADER).split():
        if hmac.compare_digest(candidate.encode("ascii", "replace"), expected):
            return
    raise SignatureError("no matching signature")
