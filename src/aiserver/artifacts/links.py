"""Signed artifact and variant URLs: HMAC-SHA256 over the URL path and an expiry time.

A signed URL is the path the server hands out plus ``?expires=E&signature=S``: ``E`` in Unix
seconds, ``S`` the unpadded base64url HMAC-SHA256 of ``"{path}\\n{E}"`` under a signing secret.
Secrets rotate: the first one signs, every one verifies, so a new secret goes first and the
old one stays listed until the URLs it signed have expired.

Expiry times are rounded up to the minute, so that one artifact's URL stays the same for a
minute (HTTP caches can keep it) and lasts between ``ttl_s`` and ``ttl_s + 60`` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from aiserver.errors import ErrorKind, ServiceError

__all__ = ["MIN_SECRET_CHARS", "UrlSigner", "signature_expired", "signature_invalid"]

MIN_SECRET_CHARS = 16
_ROUND_S = 60


def signature_invalid() -> ServiceError:
    return ServiceError(
        ErrorKind.PERMISSION_DENIED,
        "SIGNATURE_INVALID",
        "the URL signature is not valid for this resource",
    )


def signature_expired(expires: int) -> ServiceError:
    return ServiceError(
        ErrorKind.PERMISSION_DENIED,
        "SIGNATURE_EXPIRED",
        "the signed URL has expired; ask the service for a fresh one",
        metadata={"expires": str(expires)},
    )


class UrlSigner:
    """Signs URL paths and verifies ``(path, expires, signature)`` triples."""

    def __init__(
        self,
        secrets: Sequence[str],
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secrets:
            raise ValueError("URL signing needs at least one secret")
        for secret in secrets:
            if len(secret) < MIN_SECRET_CHARS:
                raise ValueError(
                    f"URL signing secrets must be at least {MIN_SECRET_CHARS} characters"
                )
        if ttl_s <= 0:
            raise ValueError("signed URLs need a positive lifetime")
        self._keys = tuple(s.encode("utf-8") for s in secrets)
        self._ttl_s = ttl_s
        self._clock = clock

    def __repr__(self) -> str:
        return f"UrlSigner({len(self._keys)} secrets, ttl_s={self._ttl_s:g})"

    @staticmethod
    def _mac(key: bytes, path: str, expires: int) -> str:
        digest = hmac.new(key, f"{path}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def sign(self, url: str) -> str:
        """``url`` (a path, possibly with a query already) with ``expires`` and ``signature``
        appended; an empty ``url`` stays empty."""
        if not url:
            return url
        path = urlsplit(url).path
        expires = math.ceil((self._clock() + self._ttl_s) / _ROUND_S) * _ROUND_S
        sep = "&" if "?" in url else "?"
        return f"{url}{sep}expires={expires}&signature={self._mac(self._keys[0], path, expires)}"

    def verify(self, paths: Sequence[str], expires: int, signature: str) -> None:
        """Accept if ``signature`` signs any of ``paths`` with ``expires`` under any secret and
        ``expires`` has not passed; PERMISSION_DENIED otherwise (a bad signature is reported
        before an expired one, so an expired URL is only called expired if it was real)."""
        good = False
        if signature and 0 < expires < 2**62:
            presented = signature.encode("ascii", "replace")
            for key in self._keys:
                for path in paths:
                    expected = self._mac(key, path, expires).encode("ascii")
                    good |= hmac.compare_digest(expected, presented)
        if not good:
            raise signature_invalid()
        if expires < self._clock():
            raise signature_expired(expires)
