"""A push device registration, validated: FCM and OneSignal tokens, Web Push subscriptions."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from common.web.validation import Fields, b64url_decode

PLATFORMS = ("fcm", "onesignal", "webpush")
# Printable ASCII, and short enough that (user, platform, token) fits a unique-index entry
# (PostgreSQL refuses entries above ~2,700 bytes). Real tokens are ASCII: FCM ~160 characters,
# OneSignal a UUID, a Web Push endpoint a URL.
TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")
MAX_TOKEN = 2048


def parse_device(
    body: dict[str, Any], allowed_hosts: tuple[str, ...]
) -> tuple[str, str, dict[str, Any] | None]:
    """Validate a device registration; returns (platform, token, subscription)."""
    fields = Fields(body)
    fields.unknown({"platform", "token", "subscription"})
    platform = fields.string("platform", max_len=16)
    if platform is not None and platform not in PLATFORMS:
        fields.error("platform", f"must be one of {', '.join(PLATFORMS)}")
    fields.check()
    if platform == "webpush":
        sub = fields.object("subscription", required=True)
        fields.check()
        endpoint = sub.get("endpoint")
        endpoint = endpoint if isinstance(endpoint, str) else ""
        url = urlsplit(endpoint)
        # Plain http only for hosts the operator allow-listed (a local push service in tests).
        allowed = url.scheme == "https" or (url.scheme == "http" and (url.hostname or "") in allowed_hosts)
        if not allowed or not url.hostname:
            fields.error("subscription.endpoint", "must be an https URL")
        elif len(endpoint) > MAX_TOKEN or not TOKEN_RE.match(endpoint):
            fields.error("subscription.endpoint", f"must be at most {MAX_TOKEN} ASCII characters")
        keys = sub.get("keys")
        keys = {k: v for k, v in keys.items() if isinstance(v, str)} if isinstance(keys, dict) else {}
        p256dh = b64url_decode(keys.get("p256dh", ""))
        if p256dh is None or len(p256dh) != 65 or p256dh[0] != 4:
            fields.error("subscription.keys.p256dh", "must be base64url of a 65-byte P-256 public key")
        secret = b64url_decode(keys.get("auth", ""))
        if secret is None or len(secret) != 16:
            fields.error("subscription.keys.auth", "must be base64url of a 16-byte secret")
        fields.check()
        subscription = {"endpoint": endpoint, "keys": {"p256dh": keys["p256dh"], "auth": keys["auth"]}}
        return "webpush", endpoint, subscription
    token = fields.string("token", max_len=MAX_TOKEN, pattern=TOKEN_RE, hint="must be printable ASCII")
    fields.check()
    assert platform is not None and token is not None
    return platform, token, None
