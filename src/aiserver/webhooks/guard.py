"""SSRF guard: a ReplyTo URL may only reach public addresses unless the operator allows more.

A host is resolved (off the event loop) and refused if any of its addresses is loopback,
private, shared (CGNAT), link-local, multicast, unspecified or reserved, in IPv4 or IPv6;
IPv4 addresses embedded in IPv6 (mapped, 6to4, Teredo) are judged as IPv4. The sender then
connects to the address that was checked, so a second DNS answer cannot swap it for another
(DNS rebinding). Allow-list entries are host names, IP addresses or CIDR networks.

IP literals are read in every notation a resolver accepts (``2130706433``, ``0177.0.0.1``,
``0x7f.1``, ``127.1``, IPv6 with embedded IPv4), so an address cannot hide as a "name".

The same guard screens a ReplyTo at submission (:meth:`TargetGuard.screen`): what can be told
then (an IP literal, a name that resolves to a refused address now) is refused at once, so the
caller learns; the check at send time stays, since a name can resolve elsewhere later.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

from aiserver.errors import invalid_argument

__all__ = [
    "IPAddress",
    "RefusedTarget",
    "Resolver",
    "Target",
    "TargetGuard",
    "ip_literal",
    "is_public",
    "validate_reply_to",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]

MAX_URL_CHARS = 2048
SCREEN_RESOLVE_S = 2.0
"""How long a submission waits for DNS; a name that does not resolve in time is let through
(the send-time check decides)."""


class RefusedTarget(Exception):
    """A URL the sender will not call; ``retryable`` when it may work later (DNS failure)."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class Target:
    """A checked URL; ``pinned`` is the address to connect to (None: resolve normally)."""

    url: httpx.URL
    pinned: IPAddress | None


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's address
    return None


def _ipv4_part(text: str) -> int | None:
    # inet_aton(3): 0x.. hexadecimal, 0.. octal, else decimal.
    try:
        if text[:2].lower() == "0x":
            return int(text[2:], 16) if text[2:] else 0
        if len(text) > 1 and text[0] == "0":
            return int(text[1:], 8)
        return int(text, 10) if text.isdigit() else None
    except ValueError:
        return None


def _ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """``host`` as inet_aton reads it: 1 to 4 parts, the last filling the remaining bytes."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(parts):
        return None
    values = [_ipv4_part(p) for p in parts]
    if any(v is None for v in values):
        return None
    numbers = [v for v in values if v is not None]
    *head, last = numbers
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    value = last
    for i, v in enumerate(head):
        value |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` (a URL's host, brackets removed) spells, in any notation; None
    for a name."""
    host = host.strip("[]").split("%", 1)[0]  # an IPv6 zone names no other host
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return _ipv4_literal(host.rstrip("."))


def is_public(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses only."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_v4(ip)
        if embedded is not None:
            # A mapped address is the IPv4 host; 6to4/Teredo must also be public themselves.
            return is_public(embedded) and (ip.ipv4_mapped is not None or _plain_public(ip))
    return _plain_public(ip)


def _plain_public(ip: IPAddress) -> bool:
    # is_global alone lets multicast (224/4) through on older Pythons.
    return ip.is_global and not (
        ip.is_multicast
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_unspecified
    )


async def _getaddrinfo(host: str, port: int) -> list[IPAddress]:
    # The loop's getaddrinfo runs in its default executor: the loop never blocks on DNS.
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    found: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # drop an IPv6 zone
        if ip not in found:
            found.append(ip)
    return found


def _parse(url: str) -> httpx.URL:
    if len(url) > MAX_URL_CHARS or any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise RefusedTarget("malformed URL")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise RefusedTarget("malformed URL") from exc
    if parsed.scheme not in ("http", "https"):
        raise RefusedTarget("only http and https URLs are called")
    if not parsed.host:
        raise RefusedTarget("URL has no host")
    return parsed


def validate_reply_to(url: str, field: str = "reply_to") -> None:
    """Shape check at submission (no DNS): INVALID_ARGUMENT ``INVALID_REPLY_TO`` on ``field``."""
    if not url:
        return
    try:
        _parse(url)
    except RefusedTarget as exc:
        raise invalid_argument(field, "INVALID_REPLY_TO", f"{exc.reason}") from exc


class TargetGuard:
    """Checks ReplyTo URLs; see the module docstring."""

    def __init__(
        self,
        allow_hosts: Sequence[str] = (),
        *,
        allow_private: bool = False,
        resolver: Resolver | None = None,
    ) -> None:
        self.allow_private = allow_private
        self._resolve: Resolver = resolver or _getaddrinfo
        self._hosts: set[str] = set()
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in allow_hosts:
            entry = raw.strip().lower().rstrip(".")
            if entry.startswith("[") and entry.endswith("]"):
                entry = entry[1:-1]
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._hosts.add(entry)

    def _allowed(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self._networks) or is_public(ip)

    async def check(self, url: str) -> Target:
        """The target to connect to, or :class:`RefusedTarget`."""
        parsed = _parse(url)
        host = parsed.host.lower().rstrip(".")
        if self.allow_private or host in self._hosts:
            return Target(parsed, None)
        literal = ip_literal(host)
        if literal is not None:
            addresses: Sequence[IPAddress] = [literal]
        else:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            try:
                addresses = await self._resolve(host, port)
            except OSError as exc:
                raise RefusedTarget("host does not resolve", retryable=True) from exc
        if not addresses:
            raise RefusedTarget("host does not resolve", retryable=True)
        self._refuse_private(addresses)
        return Target(parsed, addresses[0])

    def _refuse_private(self, addresses: Sequence[IPAddress]) -> None:
        for ip in addresses:
            if not self._allowed(ip):
                raise RefusedTarget(f"address {ip} is not public")

    async def screen(self, url: str, *, resolve_s: float = SCREEN_RESOLVE_S) -> None:
        """The submission-time check: :class:`RefusedTarget` for a URL that cannot be called,
        or whose host is (or now resolves to) an address the guard refuses. A name that does
        not resolve (yet), or not within ``resolve_s``, passes: the send-time check decides."""
        parsed = _parse(url)
        host = parsed.host.lower().rstrip(".")
        if self.allow_private or host in self._hosts:
            return
        literal = ip_literal(host)
        if literal is not None:
            self._refuse_private([literal])
            return
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            async with asyncio.timeout(resolve_s):
                addresses = await self._resolve(host, port)
        except (OSError, TimeoutError):
            return
        self._refuse_private(addresses)
