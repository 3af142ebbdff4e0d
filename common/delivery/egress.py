"""Outbound HTTP to URLs that users or clients supply (Web Push subscriptions, client webhook
endpoints), guarded against server-side request forgery: https only, and no address that is not
globally routable (private, loopback, link-local, reserved) — checked on the address actually
connected to, so DNS cannot swap in an internal one after the check. The session follows no
redirect on its own: callers pass `allow_redirects=False`, and a redirect is an answer like any
other.

Hosts in an allow-list (WEBPUSH_ALLOWED_HOSTS, WEBHOOK_ALLOWED_HOSTS), each a host or a
host:port, are exempt and may use http: local receivers in development and tests.

The server at the other end is chosen by someone else too, so its reply is read with care: at
most REPLY_CAP bytes, never decompressed (a few hundred KB of gzip inflate to gigabytes), and at
most PER_HOST_CONNECTIONS connections to one host, so one slow host cannot take the whole pool.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import ResolveResult
from aiohttp.tracing import Trace

REPLY_CAP = 64 * 1024
PER_HOST_CONNECTIONS = 8
POOL_CONNECTIONS = 100


class UnsafeEndpoint(ValueError):
    """The endpoint may not be contacted."""


class NonPublicAddress(OSError):
    """A name resolved only to addresses we may not connect to."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known prefix, RFC 6052
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use prefix, RFC 8215
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated, RFC 4291 2.5.5.1


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses an IPv6 address reaches through a translator or tunnel, which is where
    the packets really go; None for an ordinary IPv6 address. `ipaddress` calls most of these
    forms global whatever the IPv4 inside is (64:ff9b::7f00:1 is 127.0.0.1 behind NAT64)."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE:
        return [low32]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)  # the relay server and the client behind it
    return None


def _address_allowed(address: str) -> bool:
    """Only plainly public unicast addresses; translated and tunnelled IPv6 forms are judged by
    the IPv4 inside, and local-use translation prefixes are refused outright."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return False
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return all(v4.is_global and not v4.is_multicast for v4 in inner)
    return ip.is_global and not ip.is_multicast


def exempt(host: str, port: int | None, allowed_hosts: frozenset[str]) -> bool:
    """Whether `host` (on `port`) is allow-listed, by host alone or as host:port."""
    host = host.lower()
    if host in allowed_hosts:
        return True
    if port is None:
        return False
    return f"{host}:{port}" in allowed_hosts or f"[{host}]:{port}" in allowed_hosts


def check_endpoint(endpoint: str, allowed_hosts: frozenset[str]) -> None:
    """Refuse, before any connection, an endpoint that is not https or names a non-public IP."""
    url = urlsplit(endpoint)
    host = (url.hostname or "").lower()
    if not host:
        raise UnsafeEndpoint("endpoint has no host")
    try:
        port = url.port or {"https": 443, "http": 80}.get(url.scheme)
    except ValueError:
        raise UnsafeEndpoint("endpoint port is not a number between 0 and 65535") from None
    if url.scheme in ("http", "https") and exempt(host, port, allowed_hosts):
        return
    if url.scheme != "https":
        raise UnsafeEndpoint(f"endpoint scheme {url.scheme!r} is not https")
    literal = _literal_address(host)
    if literal is not None and not _address_allowed(str(literal)):
        raise UnsafeEndpoint(f"endpoint address {host} is not a public address")
    # A name: the resolver checks every address it resolves to, at each connection.


# The forms inet_aton reads as IPv4 that ipaddress does not: 127.1, 0177.0.0.1, 0x7f.1, 2130706433.
_LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$")


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host names literally, in any form a resolver would read as one: after
    Unicode compatibility folding (full-width or circled digits and dots), without a trailing
    dot, and the legacy IPv4 forms; None for a name. Refused at creation, so the client hears
    it at once rather than at the first delivery."""
    folded = unicodedata.normalize("NFKC", host).replace("\u3002", ".").rstrip(".")
    try:
        return ipaddress.ip_address(folded)
    except ValueError:
        pass
    if _LEGACY_IPV4.match(folded):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(folded))
        except OSError:
            return None
    return None


class GuardedConnector(aiohttp.TCPConnector):
    """A connector that connects only to public addresses (or allow-listed hosts): every address
    a host resolves to is judged, at each connection, after resolution (no DNS rebinding). Here
    rather than in a resolver because aiohttp hands an IP literal (which yarl makes of
    a host of full-width digits) straight to the socket, never to the resolver. The refusal is
    the same whatever listens there: no connection is tried, so no port's state leaks."""

    def __init__(self, allowed_hosts: frozenset[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allowed_hosts = allowed_hosts

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[Trace] | None = None
    ) -> list[ResolveResult]:
        results = await super()._resolve_host(host, port, traces)
        if exempt(host, port or None, self.allowed_hosts):
            return results
        safe = [r for r in results if _address_allowed(r["host"])]
        if not safe:
            raise NonPublicAddress(f"{host} is not a public address")
        return safe


def guarded_session(allowed_hosts: frozenset[str], timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=GuardedConnector(
            allowed_hosts,
            limit=POOL_CONNECTIONS,
            limit_per_host=PER_HOST_CONNECTIONS,
        ),
        timeout=aiohttp.ClientTimeout(total=timeout),
        auto_decompress=False,
    )


async def read_capped(response: aiohttp.ClientResponse, cap: int = REPLY_CAP) -> str:
    """The start of a reply, for the record: never more than `cap` bytes, never inflated."""
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if encoding not in ("", "identity"):
        return f"({encoding} reply not read)"
    chunks: list[bytes] = []
    size = 0
    while size < cap:
        chunk = await response.content.read(cap - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks).decode(errors="replace")


def allow_list(hosts: tuple[str, ...]) -> frozenset[str]:
    return frozenset(h.lower() for h in hosts)
