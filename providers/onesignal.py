"""OneSignal: one API call delivers to all of a user's OneSignal subscriptions."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from providers.push import Device, DeviceResult, PushMessage, http_outcome, retry_after_seconds


class OneSignalProvider:
    platform = "onesignal"

    def __init__(self, session: aiohttp.ClientSession, app_id: str, api_key: str, base_url: str) -> None:
        self.session = session
        self.app_id = app_id
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")

    async def send(self, devices: list[Device], message: PushMessage) -> list[DeviceResult]:
        language = message.language.split("-")[0]
        payload: dict[str, Any] = {
            "app_id": self.app_id,
            "include_subscription_ids": [d.token for d in devices],
            # OneSignal requires an English entry; the user's language is added beside it.
            "headings": {"en": message.title, language: message.title},
            "contents": {"en": message.body, language: message.body},
            "idempotency_key": message.notification_id,
            "ttl": message.ttl,
            "data": {**message.data, "notification_id": message.notification_id},
        }
        if message.image_url:
            payload["big_picture"] = message.image_url
            payload["chrome_web_image"] = message.image_url
        if message.link:
            payload["url"] = message.link
        try:
            async with self.session.post(
                f"{self.base_url}/notifications",
                data=orjson.dumps(payload),
                headers={"Authorization": f"Key {self.api_key}", "Content-Type": "application/json"},
            ) as response:
                body = await response.read()
                status = response.status
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError) as exc:
            return [
                DeviceResult(d, "retry", f"OneSignal unreachable: {type(exc).__name__} {exc}")
                for d in devices
            ]
        text = body.decode(errors="replace")[:500]
        if status != 200:
            return [
                DeviceResult(d, http_outcome(status), f"OneSignal {status}: {text}", retry_after)
                for d in devices
            ]
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = {}
        errors = answer.get("errors") if isinstance(answer, dict) else None
        invalid: set[str] = set()
        if isinstance(errors, dict):
            for key in ("invalid_subscription_ids", "invalid_player_ids", "invalid_aliases"):
                value = errors.get(key)
                if isinstance(value, list):
                    invalid |= {str(v) for v in value}
        elif isinstance(errors, list) and errors and not answer.get("id"):
            # e.g. ["All included players are not subscribed"]: nobody could receive it.
            return [DeviceResult(d, "removed", f"OneSignal: {'; '.join(map(str, errors))}") for d in devices]
        return [
            DeviceResult(d, "removed", "OneSignal: invalid subscription")
            if d.token in invalid
            else DeviceResult(d, "delivered", str(answer.get("id", "")))
            for d in devices
        ]
