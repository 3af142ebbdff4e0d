"""Firebase Cloud Messaging, HTTP v1 API, authenticated with a service account (OAuth2 JWT bearer)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson

from providers.push import Device, DeviceResult, PushMessage, http_outcome, retry_after_seconds

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


def fcm_credentials_problem(path: str) -> str | None:
    """What is wrong with a service-account file, in words; None when it will do."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        account = orjson.loads(Path(path).read_bytes())
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    except orjson.JSONDecodeError:
        return "is not JSON (a Firebase service-account key file is)"
    if not isinstance(account, dict):
        return "is not a service-account key file"
    missing = [
        k for k in ("project_id", "client_email", "private_key") if not isinstance(account.get(k), str)
    ]
    if missing:
        return f"lacks {', '.join(missing)}"
    try:
        load_pem_private_key(account["private_key"].encode(), password=None)
    except (ValueError, TypeError):
        return "holds a private_key that is not a PEM private key"
    return None


class FcmProvider:
    platform = "fcm"

    def __init__(
        self, session: aiohttp.ClientSession, credentials_file: str, base_url: str, token_url: str
    ) -> None:
        account = orjson.loads(Path(credentials_file).read_bytes())
        self.project_id: str = account["project_id"]
        self.client_email: str = account["client_email"]
        self._private_key: str = account["private_key"]
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.token_url = token_url
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def access_token(self) -> str:
        """An OAuth2 access token, reused until a minute before it expires."""
        async with self._lock:
            if self._token is None or time.time() > self._expires - 60:
                now = int(time.time())
                assertion = jwt.encode(
                    {
                        "iss": self.client_email,
                        "scope": SCOPE,
                        "aud": self.token_url,
                        "iat": now,
                        "exp": now + 3600,
                    },
                    self._private_key,
                    algorithm="RS256",
                )
                async with self.session.post(
                    self.token_url,
                    data={
                        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                        "assertion": assertion,
                    },
                ) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise TokenError(response.status, body.decode(errors="replace")[:300])
                    grant = orjson.loads(body)
                self._token = grant["access_token"]
                self._expires = time.time() + float(grant.get("expires_in", 3600))
            return self._token

    async def send(self, devices: list[Device], message: PushMessage) -> list[DeviceResult]:
        try:
            token = await self.access_token()
        except TokenError as exc:
            # Bad credentials are a configuration error: retrying will not fix them.
            outcome = http_outcome(exc.status) if exc.status != 200 else "failed"
            return [DeviceResult(d, outcome, f"FCM auth failed: {exc}") for d in devices]
        except (TimeoutError, aiohttp.ClientError) as exc:
            return [DeviceResult(d, "retry", f"FCM auth unreachable: {exc}") for d in devices]
        return list(await asyncio.gather(*(self._send_one(d, message, token) for d in devices)))

    async def _send_one(self, device: Device, message: PushMessage, token: str) -> DeviceResult:
        notification: dict[str, Any] = {"title": message.title, "body": message.body}
        if message.image_url:
            notification["image"] = message.image_url
        payload: dict[str, Any] = {
            "message": {
                "token": device.token,
                "notification": notification,
                "data": {**message.data, "notification_id": message.notification_id},
                "android": {"ttl": f"{message.ttl}s"},
            }
        }
        if message.link:
            payload["message"]["webpush"] = {"fcm_options": {"link": message.link}}
        url = f"{self.base_url}/v1/projects/{self.project_id}/messages:send"
        try:
            async with self.session.post(
                url,
                data=orjson.dumps(payload),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            ) as response:
                body = await response.read()
                status = response.status
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError) as exc:
            return DeviceResult(device, "retry", f"FCM unreachable: {type(exc).__name__} {exc}")
        if status == 200:
            return DeviceResult(device, "delivered", orjson.loads(body).get("name", ""))
        code, text = _error(body)
        detail = f"FCM {status} {code}: {text}"[:500]
        if code == "UNREGISTERED" or (code == "INVALID_ARGUMENT" and "token" in text.lower()):
            return DeviceResult(device, "removed", detail)
        if status in (401, 403):
            return DeviceResult(device, "failed", f"configuration error: {detail}")
        return DeviceResult(device, http_outcome(status), detail, retry_after)


class TokenError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.status = status


def _error(body: bytes) -> tuple[str, str]:
    """FCM's error code (the FcmError detail when there is one, else the status) and message."""
    try:
        error = orjson.loads(body).get("error", {})
    except (orjson.JSONDecodeError, AttributeError):
        return "", body.decode(errors="replace")[:200]
    code = str(error.get("status", ""))
    for detail in error.get("details", []) or []:
        if isinstance(detail, dict) and detail.get("errorCode"):
            code = str(detail["errorCode"])
    return code, str(error.get("message", ""))
