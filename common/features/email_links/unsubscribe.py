"""Signed unsubscribe links: the email worker signs one per message, the gateway verifies it.

A token names a project, a user and a channel and carries an HMAC-SHA256 over them (tokens
signed before projects name a UUID user and a channel, and belong to project `default`), so a
link can turn
exactly that preference off without a login, and cannot be altered to reach another user. It
does not expire: an unsubscribe link in a years-old email must still work (RFC 8058 asks for
that). Changing UNSUBSCRIBE_SECRET invalidates every link sent before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import uuid
from dataclasses import dataclass

from aiohttp import web

from common.vocabulary import CHANNELS

PATH = "/api/v1/unsubscribe/"
# Domain separation: the key may be JWT_SECRET, and a MAC made here must never double as
# a JWT signature (whose input is base64 text with dots, never a NUL byte).
_CONTEXT = b"notify-unsubscribe\x00"


@dataclass(frozen=True)
class Target:
    user_id: str
    channel: str
    project: str = "default"
    # A workflow's email names its category: the link turns off that category, not all email.
    category: str | None = None

    @property
    def what(self) -> str:
        """What the link turns off, for a person."""
        if self.category:
            return f"{self.category} {self.channel} notifications"
        return f"{self.channel} notifications"


_SEP = b"\x1f"  # cannot occur in a project name, a user id or a channel


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: str, payload: bytes) -> bytes:
    return hmac.new(key.encode(), _CONTEXT + payload, hashlib.sha256).digest()


def sign(
    key: str, user_id: uuid.UUID | str, channel: str, project: str = "default", category: str | None = None
) -> str:
    if not key:
        raise ValueError("an unsubscribe token needs a secret key")
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}")
    parts = [project.encode(), str(user_id).encode(), channel.encode()]
    if category:
        parts.append(category.encode())
    payload = _SEP.join(parts)
    return f"{_b64(payload)}.{_b64(_mac(key, payload))}"


def verify(key: str, token: str) -> Target | None:
    """The user and channel a genuine token names; None for anything forged or malformed."""
    if not key or token.count(".") != 1 or len(token) > 400:
        return None
    encoded_payload, encoded_mac = token.split(".")
    try:
        payload, mac = _unb64(encoded_payload), _unb64(encoded_mac)
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(mac, _mac(key, payload)):
        return None
    parts = payload.split(_SEP)
    if len(parts) == 4:
        project, user_id, channel, category = (p.decode(errors="replace") for p in parts)
        ok = channel in CHANNELS and user_id and project and category
        return Target(user_id, channel, project, category) if ok else None
    if len(parts) == 3:
        project, user_id, channel = (p.decode(errors="replace") for p in parts)
        return Target(user_id, channel, project) if channel in CHANNELS and user_id and project else None
    # Signed before projects: 16 bytes of a UUID, then the channel.
    channel = payload[16:].decode(errors="replace")
    if len(payload) <= 16 or channel not in CHANNELS:
        return None
    return Target(str(uuid.UUID(bytes=payload[:16])), channel)


def link(base_url: str, token: str) -> str:
    return base_url.rstrip("/") + PATH + token


# --- the pages a person sees ----------------------------------------------------------------

_PAGE_HEADERS = {
    # The token in the URL is a credential for one preference: keep it out of referrers,
    # caches and search engines; the page runs no script and posts only to itself.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex",
}


def page(status: int, title: str, text: str, *, button: bool = False) -> web.Response:
    form = (
        '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Unsubscribe</button></form>'
        if button
        else ""
    )
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;max-width:32rem;"
        "margin:4rem auto;padding:0 1rem;line-height:1.5}button{font-size:1rem;padding:.5rem 1.25rem}"
        f"</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>{form}</body></html>"
    )
    return web.Response(text=body, status=status, content_type="text/html", headers=_PAGE_HEADERS)


def confirm_page(target: Target | None) -> web.Response:
    """GET shows a page with a button, and changes nothing: link scanners and mail previews
    fetch links, and must not unsubscribe anyone by doing so (RFC 8058)."""
    if target is None:
        return page(
            400,
            "This unsubscribe link is not valid",
            "It was altered or cut short. Use the link from the email itself.",
        )
    return page(
        200,
        f"Unsubscribe from {target.what}?",
        f"You will no longer receive {target.what}. Nothing changes until you press the button.",
        button=True,
    )


def done_page(target: Target) -> web.Response:
    return page(200, "You are unsubscribed", f"You will no longer receive {target.what} from us.")
