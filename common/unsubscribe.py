"""Signed unsubscribe links: the email worker signs one per message, the gateway verifies it.

A token names a user and a channel and carries an HMAC-SHA256 over both, so a link can turn
exactly that preference off without a login, and cannot be altered to reach another user. It
does not expire: an unsubscribe link in a years-old email must still work (RFC 8058 asks for
that). Changing UNSUBSCRIBE_SECRET invalidates every link sent before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import uuid
from dataclasses import dataclass

PATH = "/api/v1/unsubscribe/"
CHANNELS = ("email", "push")
# Domain separation: the key may be JWT_SECRET, and a MAC made here must never double as
# a JWT signature (whose input is base64 text with dots, never a NUL byte).
_CONTEXT = b"notify-unsubscribe\x00"


@dataclass(frozen=True)
class Target:
    user_id: uuid.UUID
    channel: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: str, payload: bytes) -> bytes:
    return hmac.new(key.encode(), _CONTEXT + payload, hashlib.sha256).digest()


def sign(key: str, user_id: uuid.UUID | str, channel: str) -> str:
    if not key:
        raise ValueError("an unsubscribe token needs a secret key")
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}")
    payload = uuid.UUID(str(user_id)).bytes + channel.encode()
    return f"{_b64(payload)}.{_b64(_mac(key, payload))}"


def verify(key: str, token: str) -> Target | None:
    """The user and channel a genuine token names; None for anything forged or malformed."""
    if not key or token.count(".") != 1 or len(token) > 200:
        return None
    encoded_payload, encoded_mac = token.split(".")
    try:
        payload, mac = _unb64(encoded_payload), _unb64(encoded_mac)
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(mac, _mac(key, payload)):
        return None
    channel = payload[16:].decode(errors="replace")
    if len(payload) <= 16 or channel not in CHANNELS:
        return None
    return Target(uuid.UUID(bytes=payload[:16]), channel)


def link(base_url: str, token: str) -> str:
    return base_url.rstrip("/") + PATH + token
