"""Signatures (Standard Webhooks style), address classification and ReplyTo shape checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress

import pytest

from aiserver.errors import ServiceError
from aiserver.webhooks import SignatureError, is_public, sign, signature_headers, verify
from aiserver.webhooks.guard import validate_reply_to

SECRET = b"k" * 32
BODY = b'{"jobId":"j"}'


def test_signature_is_hmac_over_id_timestamp_body() -> None:
    expected = hmac.new(SECRET, b"msg_1.1700000000." + BODY, hashlib.sha256).digest()
    assert sign(SECRET, "msg_1", 1_700_000_000, BODY) == "v1," + base64.b64encode(expected).decode()


def test_verify_accepts_any_matching_signature_case_insensitive_headers() -> None:
    headers = signature_headers(SECRET, "msg_1", BODY, timestamp=1_700_000_000)
    rotated = {
        "Webhook-Id": headers["webhook-id"],
        "Webhook-Timestamp": headers["webhook-timestamp"],
        "Webhook-Signature": f"v1,b2xk {headers['webhook-signature']}",
    }
    verify(SECRET, rotated, BODY, now=1_700_000_100)


@pytest.mark.parametrize(
    "change",
    [
        {"webhook-timestamp": "abc"},
        {"webhook-timestamp": "1699999000"},  # too old
        {"webhook-timestamp": "1700001000"},  # too far ahead
        {"webhook-signature": "v1,AAAA"},
        {"webhook-signature": ""},
    ],
)
def test_verify_rejects(change: dict[str, str]) -> None:
    headers = signature_headers(SECRET, "msg_1", BODY, timestamp=1_700_000_000) | change
    with pytest.raises(SignatureError):
        verify(SECRET, headers, BODY, tolerance_s=300, now=1_700_000_000)


def test_verify_requires_headers() -> None:
    with pytest.raises(SignatureError, match="webhook-id"):
        verify(SECRET, {}, BODY)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("93.184.216.34", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.31.255.255", False),
        ("192.168.0.1", False),
        ("100.64.0.1", False),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("224.0.0.251", False),
        ("239.255.255.250", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("192.0.2.1", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("fd12:3456::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("64:ff9b::a00:1", False),  # NAT64 prefix
        ("2001:db8::1", False),
    ],
)
def test_is_public(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize(
    "url", ["https://hooks.example.com/x?y=1", "http://203.0.113.9:8080/cb", ""]
)
def test_reply_to_shapes_accepted(url: str) -> None:
    validate_reply_to(url)


@pytest.mark.parametrize(
    "url",
    ["ftp://x.example/", "javascript:alert(1)", "http://", "http://a b/", "x" * 3000, "/relative"],
)
def test_reply_to_shapes_refused(url: str) -> None:
    with pytest.raises(ServiceError) as exc:
        validate_reply_to(url)
    assert exc.value.reason == "INVALID_REPLY_TO"
    assert exc.value.violations[0].field == "reply_to"
