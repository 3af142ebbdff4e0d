"""Standard Webhooks signing: secrets, message ids and the signed headers of one POST."""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Sequence
from datetime import datetime

from standardwebhooks import Webhook


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def webhook_id(event_id: uuid.UUID) -> str:
    return f"msg_{event_id.hex}"


def signed_headers(msg_id: str, body: bytes, keys: Sequence[str], at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers: one `v1,` signature per secret (two while a rotation's
    old secret still signs), over `id.timestamp.body`. Signed at sending time, so a retry
    hours later carries a timestamp the receiver's tolerance accepts."""
    text = body.decode()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(Webhook(key).sign(msg_id, at, text) for key in keys),
    }
