"""Small validators that collect every bad field, so one 400 names them all."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Set
from typing import Any

from common.web.http import validation_error

EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\.[A-Za-z]{2,63}$")
LANGUAGE_RE = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")
CODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# A user's id is the client's own (issue 25): 1-128 of these characters; UUIDs are ids too.
USER_ID_RE = re.compile(r"^[A-Za-z0-9._:@|+-]{1,128}\Z")
PHONE_RE = re.compile(r"^\+?[0-9 ().-]{3,32}$")
USER_ID_HINT = "must be 1-128 characters of A-Z a-z 0-9 . _ : @ | + -"
# A client's request_id: any printable text. Control characters are refused so that the
# separator of a batch recipient's key (common/features/bulk/fanout.py) can never appear in one.
REQUEST_ID_RE = re.compile(r"[^\x00-\x1f\x7f]+\Z")


class Fields:
    """Collects field errors; `check()` raises one validation error naming each of them."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.errors: dict[str, str] = {}

    def error(self, name: str, message: str) -> None:
        self.errors.setdefault(name, message)

    def check(self) -> None:
        if self.errors:
            raise validation_error(self.errors)

    def unknown(self, allowed: Set[str]) -> None:
        for name in self.body:
            if name not in allowed:
                self.error(name, "is not a known field")

    def string(
        self,
        name: str,
        *,
        required: bool = True,
        max_len: int = 255,
        min_len: int = 1,
        pattern: re.Pattern[str] | None = None,
        hint: str = "",
    ) -> str | None:
        value = self.body.get(name)
        if value is None:
            if required:
                self.error(name, "is required")
            return None
        if not isinstance(value, str):
            self.error(name, "must be a string")
            return None
        if not min_len <= len(value) <= max_len:
            self.error(name, f"must be {min_len} to {max_len} characters long")
            return None
        if "\x00" in value:
            self.error(name, "must not contain NUL characters")
            return None
        if pattern is not None and not pattern.match(value):
            self.error(name, hint or "has an invalid format")
            return None
        return value

    def language(self, name: str = "language") -> str | None:
        """An optional language tag, normalised (`pt_br` → `pt-BR`)."""
        value = self.string(
            name,
            required=False,
            max_len=35,
            pattern=LANGUAGE_RE,
            hint="must be a language tag like en or pt-BR",
        )
        return normalize_language(value) if value else None

    def email(self, name: str, *, required: bool = True) -> str | None:
        value = self.string(name, required=required, max_len=254)
        if value is not None and not EMAIL_RE.match(value):
            self.error(name, "must be a valid email address")
            return None
        return value

    def uuid(self, name: str, *, required: bool = True) -> uuid.UUID | None:
        value = self.string(name, required=required, max_len=36)
        if value is None:
            return None
        return parse_uuid(value, lambda: self.error(name, "must be a UUID"))

    def user_id(self, name: str, *, required: bool = True) -> str | None:
        """A user id, the client's own (`USER_ID_RE`)."""
        return self.string(name, required=required, max_len=128, pattern=USER_ID_RE, hint=USER_ID_HINT)

    def integer(self, name: str, *, default: int, low: int, high: int) -> int:
        value = self.body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.error(name, f"must be a whole number from {low} to {high}")
            return default
        return value

    def boolean(self, name: str, *, required: bool = True) -> bool | None:
        value = self.body.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, bool):
            self.error(name, "must be true or false")
            return None
        return value

    def object(self, name: str, *, required: bool = False) -> dict[str, Any]:
        value = self.body.get(name)
        if value is None:
            if required:
                self.error(name, "is required")
            return {}
        if not isinstance(value, dict):
            self.error(name, "must be a JSON object")
            return {}
        if _has_nul(value):
            # PostgreSQL cannot store U+0000 in text or jsonb.
            self.error(name, "must not contain NUL characters")
            return {}
        return value


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def parse_uuid(value: str, on_error: Any = None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        if on_error is not None:
            on_error()
        return None


def b64url_decode(value: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None


def normalize_language(value: str) -> str:
    """`pt_br`, `PT-br` → `pt-BR`: the form stored and matched."""
    parts = value.replace("_", "-").split("-")
    return "-".join([parts[0].lower(), *(p.upper() if len(p) == 2 else p for p in parts[1:])])
