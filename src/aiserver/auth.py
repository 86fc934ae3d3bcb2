"""API keys: who is calling, and whether the service may be exposed without them.

Keys come from a file (``api_keys_file``: TOML or JSON) and/or the ``api_keys`` setting
(``AISERVER_API_KEYS``: ``id:key[:admin]`` entries, comma-separated; ``id:sha256=HEX[:admin]``
gives a key by its SHA-256 instead). Only SHA-256 digests are kept in memory; a presented key
is hashed and compared with every configured digest in constant time.

File formats (the same entries either way; ``admin`` defaults to false)::

    # TOML                                   // JSON: a list, or {"keys": [...]}
    [[keys]]                                 [{"id": "alice", "key": "..."},
    id = "alice"                              {"id": "ops", "sha256": "9f86...", "admin": true}]
    key = "a long random string"
    [[keys]]
    id = "ops"
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    admin = true

With no keys at all the service is open: every caller is the owner ``""`` and an admin.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiserver.errors import ErrorKind, ServiceError

__all__ = [
    "ANONYMOUS",
    "OPEN",
    "ApiKey",
    "ConfigError",
    "KeyRing",
    "Principal",
    "bearer_token",
    "exposure_problem",
    "is_loopback_host",
    "parse_key_entries",
]

MIN_KEY_CHARS = 16
"""Shorter keys are refused at start-up: they can be guessed."""
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ConfigError(ValueError):
    """A security setting that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one RPC."""

    id: str
    """The key's id: the owner of what the caller creates (``""`` in open mode)."""
    admin: bool
    authenticated: bool = True
    """False only for a keyless caller let through to present a signed URL."""


OPEN = Principal("", admin=True)
"""Every caller when no keys are configured."""
ANONYMOUS = Principal("", admin=False, authenticated=False)
"""A keyless caller of an artifact read, pending its URL signature."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    digest: bytes
    """SHA-256 of the key; the key itself is never kept."""
    admin: bool = False

    def __repr__(self) -> str:  # no digest either: it is all an offline guesser needs
        return f"ApiKey(id={self.id!r}, admin={self.admin})"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _entry(item: Mapping[str, Any], where: str) -> ApiKey:
    unknown = set(item) - {"id", "key", "sha256", "admin"}
    if unknown:
        raise ConfigError(f"{where}: unknown fields {', '.join(sorted(unknown))}")
    key_id = item.get("id")
    if not isinstance(key_id, str) or _ID.fullmatch(key_id) is None:
        raise ConfigError(
            f"{where}: id must be 1..64 characters of letters, digits and _.@- "
            "(starting with a letter or digit)"
        )
    key, sha = item.get("key"), item.get("sha256")
    if (key is None) == (sha is None):
        raise ConfigError(f"{where} ({key_id}): give exactly one of key and sha256")
    if key is not None:
        if not isinstance(key, str) or len(key) < MIN_KEY_CHARS or not key.isprintable():
            raise ConfigError(
                f"{where} ({key_id}): a key must be at least {MIN_KEY_CHARS} printable characters"
            )
        if any(c in key for c in " ,\t"):
            raise ConfigError(f"{where} ({key_id}): a key must not contain blanks or commas")
        digest = _digest(key)
    else:
        if not isinstance(sha, str) or _HEX64.fullmatch(sha.lower()) is None:
            raise ConfigError(f"{where} ({key_id}): sha256 must be 64 hex digits")
        digest = bytes.fromhex(sha)
    admin = item.get("admin", False)
    if not isinstance(admin, bool):
        raise ConfigError(f"{where} ({key_id}): admin must be true or false")
    return ApiKey(key_id, digest, admin)


def parse_key_entries(text: str) -> list[ApiKey]:
    """``id:key[:admin],...`` (``id:sha256=HEX[:admin]`` for a hashed key)."""
    keys: list[ApiKey] = []
    for n, raw in enumerate(text.split(","), 1):
        part = raw.strip()
        if not part:
            continue
        fields = part.split(":")
        where = f"api_keys entry {n}"
        if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] not in ("admin", "")):
            raise ConfigError(f"{where}: expected id:key or id:key:admin")
        item: dict[str, Any] = {"id": fields[0], "admin": len(fields) == 3 and bool(fields[2])}
        if fields[1].startswith("sha256="):
            item["sha256"] = fields[1].removeprefix("sha256=")
        else:
            item["key"] = fields[1]
        keys.append(_entry(item, where))
    return keys


def _load_file(path: Path) -> list[ApiKey]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"api_keys_file {path}: {exc.strerror or exc}") from None
    data: Any
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"api_keys_file {path}: not valid {path.suffix or 'TOML'}: {exc}"
        ) from None
    if isinstance(data, Mapping):
        data = data.get("keys", [])
    if not isinstance(data, list):
        raise ConfigError(f"api_keys_file {path}: expected a list of keys (or keys = [...])")
    out = []
    for n, item in enumerate(data, 1):
        if not isinstance(item, Mapping):
            raise ConfigError(f"api_keys_file {path}: entry {n} is not a table/object")
        out.append(_entry(item, f"api_keys_file entry {n}"))
    return out


class KeyRing:
    """The configured keys; :meth:`authenticate` maps a presented key to its principal."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._keys = tuple(keys)
        seen: set[str] = set()
        digests: set[bytes] = set()
        for key in self._keys:
            if key.id in seen:
                raise ConfigError(f"API key id {key.id!r} is configured twice")
            if key.digest in digests:
                raise ConfigError(f"API key {key.id!r} is the same key as another id")
            seen.add(key.id)
            digests.add(key.digest)

    @classmethod
    def load(cls, entries: str = "", file: Path | None = None) -> KeyRing:
        keys = parse_key_entries(entries) if entries.strip() else []
        if file is not None:
            keys.extend(_load_file(file))
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def ids(self) -> Sequence[str]:
        return tuple(k.id for k in self._keys)

    def authenticate(self, presented: str) -> Principal | None:
        """The principal of ``presented``, or None. Every digest is compared, whatever
        matches, so the time taken does not tell which key (or how much of one) matched."""
        digest = _digest(presented)
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        return None if found is None else Principal(found.id, found.admin)

    def admits_header(self, authorization: str | None) -> Principal | None:
        """The principal of an ``Authorization`` header value (open mode: :data:`OPEN`)."""
        if not self.enabled:
            return OPEN
        token = bearer_token(authorization or "")
        return None if token is None else self.authenticate(token)


def bearer_token(value: str) -> str | None:
    """The token of ``Bearer <token>`` (scheme case-insensitive), or None."""
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def missing_key() -> ServiceError:
    return ServiceError(
        ErrorKind.UNAUTHENTICATED,
        "API_KEY_MISSING",
        "this service needs an API key: send 'authorization: Bearer <key>'",
    )


def invalid_key() -> ServiceError:
    return ServiceError(ErrorKind.UNAUTHENTICATED, "API_KEY_INVALID", "the API key is not valid")


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` exposes nothing beyond this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # "", 0.0.0.0 are not addresses here; names may resolve anywhere


def exposure_problem(
    hosts: Mapping[str, str], *, keys_enabled: bool, allow_open: bool
) -> str | None:
    """Why the service must not start: bound beyond loopback with no API keys, unless the
    operator said ``allow_open``. ``hosts``: setting name -> bound address."""
    if keys_enabled or allow_open:
        return None
    exposed = [
        f"{name}={addr or '(all)'}" for name, addr in hosts.items() if not is_loopback_host(addr)
    ]
    if not exposed:
        return None
    return (
        f"refusing to serve without API keys on a non-loopback address ({', '.join(exposed)}): "
        "configure api_keys / api_keys_file (AISERVER_API_KEYS / AISERVER_API_KEYS_FILE), "
        "bind to 127.0.0.1, or set allow_open=true (AISERVER_ALLOW_OPEN=true) to accept anyone"
    )
