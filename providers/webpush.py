"""Web Push (RFC 8030) with VAPID (RFC 8292) and aes128gcm payload encryption (RFC 8291).

Subscription endpoints are URLs supplied by users, so every request goes through the SSRF guard
of `common/delivery/egress.py` (https to a public address, no redirects); hosts in WEBPUSH_ALLOWED_HOSTS
are exempt (local tests).
The push service's reply is read as `common/delivery/egress.py` reads any: at most 64 KiB, never
decompressed, and at most a few connections to one host.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from py_vapid import Vapid
from pywebpush import WebPusher

from common.delivery.egress import NonPublicAddress, UnsafeEndpoint, check_endpoint, read_capped
from providers.push import Device, DeviceResult, PushMessage, http_outcome, retry_after_seconds


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
                text = (await read_capped(response))[:300]
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
