"""Opaque `after` cursors for keyset pagination: the sort key of the last row of a page."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime

import orjson

from common.http import validation_error


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = orjson.dumps([created_at.isoformat(), str(row_id)])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(raw: str | None, with_page: bool) -> tuple[datetime, uuid.UUID] | None:
    """The position an `after` cursor names; a 400 for anything we did not write."""
    if raw is None:
        return None
    if with_page:
        raise validation_error({"after": "give either after or page, not both"})
    try:
        if len(raw) > 200:
            raise ValueError("too long")
        created, row_id = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("no time zone")
        return when, uuid.UUID(row_id)
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise validation_error({"after": "must be the meta.next value of a previous page"}) from None
