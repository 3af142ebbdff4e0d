"""Opaque `after` cursors for keyset pagination: the sort key (a time and an id) of the last row
of a page. The one codec of the project: the API's lists, the console's, and the workflows'."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime

import orjson

from common.web.http import validation_error

MAX_CURSOR = 200  # characters; anything longer is not one of ours


def encode(at: datetime, key: uuid.UUID | str) -> str:
    raw = orjson.dumps([at.isoformat(), str(key)])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode(raw: str) -> tuple[datetime, str] | None:
    """The (time, key) a cursor names; None for anything we did not write."""
    try:
        if len(raw) > MAX_CURSOR:
            return None
        at, key = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        when = datetime.fromisoformat(at)
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        return None
    if when.tzinfo is None or not isinstance(key, str):
        return None
    return when, key


def decode_uuid(raw: str) -> tuple[datetime, uuid.UUID] | None:
    """A cursor whose key is a row id."""
    found = decode(raw)
    if found is None:
        return None
    try:
        return found[0], uuid.UUID(found[1])
    except ValueError:
        return None


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    return encode(created_at, row_id)


def decode_cursor(raw: str | None, with_page: bool) -> tuple[datetime, uuid.UUID] | None:
    """The position an API request's `after` names (None without one); a 400 naming `after` for
    anything we did not write, or for `after` given with `page`."""
    if raw is None:
        return None
    if with_page:
        raise validation_error({"after": "give either after or page, not both"})
    found = decode_uuid(raw)
    if found is None:
        raise validation_error({"after": "must be the meta.next value of a previous page"})
    return found
