"""Web Push (RFC 8030) with VAPID (RFC 8292) and aes128gcm payload encryption (RFC 8291).

Subscription endpoints are URLs supplied by users, so every request is guarded against server-side
request forgery: https only, no redirects, and no address that is not globally routable (private,
loopback, link-local, reserved) — checked on the address actually connected to, so DNS cannot
swap in an internal one after the check. Hosts in WEBPUSH_ALLOWED_HOSTS are exempt (local tests).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from py_vapid import Vapid
from pywebpush import WebPusher

from providers.push import Device, DeviceResult, PushMessage, http_outcome, retry_after_seconds


class UnsafeEndpoint(ValueError):
    """The endpoint may not be contacted."""


class NonPublicAddress(OSError):
    """A name resolved only to addresses we may not connect to."""


def _address_allowed(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_endpoint(endpoint: str, allowed_hosts: frozenset[str]) -> None:
    """Refuse, before any connection, an endpoint that is not https or names a non-public IP."""
    url = urlsplit(endpoint)
    host = (url.hostname or "").lower()
    if not host:
        raise UnsafeEndpoint("endpoint has no host")
    if host in allowed_hosts:
        return
    if url.scheme != "https":
        raise UnsafeEndpoint(f"endpoint scheme {url.scheme!r} is not https")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return  # a name: the resolver checks what it resolves to
    if not _address_allowed(str(literal)):
        raise UnsafeEndpoint(f"endpoint address {host} is not a public address")


class GuardedResolver(AbstractResolver):
    """Resolves like the default resolver, then drops every non-public address."""

    def __init__(self, allowed_hosts: frozenset[str]) -> None:
        self.allowed_hosts = allowed_hosts
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower() in self.allowed_hosts:
            return results
        safe = [r for r in results if _address_allowed(r["host"])]
        if not safe:
            raise NonPublicAddress(f"{host} resolves only to non-public addresses")
        return safe

    async def close(self) -> None:
        await self._inner.close()


def guarded_session(allowed_hosts: frozenset[str], timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=GuardedResolver(allowed_hosts), limit=100),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


class WebPushProvider:
    platform = "webpush"

    def __init__(
        self, session: aiohttp.ClientSession, private_key: str, subject: str, allowed_hosts: frozenset[str]
    ) -> None:
        self.session = session
        self.vapid = Vapid.from_string(private_key=private_key)
        self.subject = subject
        self.allowed_hosts = allowed_hosts

    async def send(self, devices: list[Device], message: PushMessage) -> list[DeviceResult]:
        payload = orjson.dumps(
            {
                "title": message.title,
                "body": message.body,
                "image": message.image_url,
                "link": message.link,
                "notification_id": message.notification_id,
            }
        )
        return list(await asyncio.gather(*(self._send_one(d, payload, message.ttl) for d in devices)))

    async def _send_one(self, device: Device, payload: bytes, ttl: int) -> DeviceResult:
        subscription: dict[str, Any] = device.subscription or {}
        endpoint = str(subscription.get("endpoint", device.token))
        try:
            check_endpoint(endpoint, self.allowed_hosts)
        except UnsafeEndpoint as exc:
            return DeviceResult(device, "failed", f"refused: {exc}")
        url = urlsplit(endpoint)
        claims = {"sub": self.subject, "aud": f"{url.scheme}://{url.netloc}"}
        try:
            encrypted = WebPusher(subscription).encode(payload, "aes128gcm")
            headers = {
                **self.vapid.sign(claims),
                "Content-Encoding": "aes128gcm",
                "Content-Type": "application/octet-stream",
                "TTL": str(ttl),
                "Urgency": "normal",
            }
        except (ValueError, TypeError, KeyError) as exc:
            return DeviceResult(device, "removed", f"subscription keys unusable: {exc}")
        try:
            async with self.session.post(
                endpoint, data=encrypted["body"], headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                text = (await response.text(errors="replace"))[:300]
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            cause = getattr(exc, "os_error", exc)
            if isinstance(cause, NonPublicAddress):
                return DeviceResult(device, "failed", f"refused: {cause}")
            return DeviceResult(device, "retry", f"push service unreachable: {type(exc).__name__} {exc}")
        detail = f"Web Push {status}: {text}".strip()
        if status in (404, 410):
            return DeviceResult(device, "removed", detail)
        if 300 <= status < 400:
            return DeviceResult(device, "failed", f"refused redirect: {detail}")
        return DeviceResult(device, http_outcome(status), detail, retry_after)
