"""A user's preferences as the user service takes them: validated field by field (channels,
quiet hours, `workflows`, `categories`), and merged into what is stored by `MERGE_PREFERENCES`.
What they mean for a notification is `common/sending/preferences.py`."""

from __future__ import annotations

from typing import Any

from common.sending.schedule import quiet_hours_field
from common.vocabulary import CHANNELS
from common.web.validation import CODE_RE, Fields


def parse(fields: Fields, name: str, *, partial: bool) -> dict[str, Any] | None:
    value = fields.body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        fields.error(name, 'must be an object like {"email": true, "push": false}')
        return None
    prefs: dict[str, Any] = {}
    for channel, enabled in value.items():
        if channel == "quiet_hours":
            # In the user's time zone; null turns them off (stored as null, so a merge clears them).
            inner = Fields(value)
            prefs[channel] = quiet_hours_field(inner)
            for field, message in inner.errors.items():
                fields.error(f"{name}.{field}", message)
        elif channel in ("workflows", "categories"):
            prefs[channel] = scoped(fields, f"{name}.{channel}", enabled)
        elif channel not in CHANNELS:
            known = ", ".join([*CHANNELS, "quiet_hours", "workflows", "categories"])
            fields.error(f"{name}.{channel}", f"is not a preference; use one of {known}")
        elif not isinstance(enabled, bool):
            fields.error(f"{name}.{channel}", "must be true or false")
        else:
            prefs[channel] = enabled
    if not partial:
        for channel in CHANNELS:
            prefs.setdefault(channel, True)
    return prefs


# A preferences update merges into what is stored: channels and quiet hours key by key, and the
# `workflows` and `categories` maps entry by entry (so an unsubscribe link's category does not
# wipe the others).
MERGE_PREFERENCES = """preferences = (
    SELECT p.old || p.new || jsonb_strip_nulls(jsonb_build_object(
        'workflows', CASE WHEN p.new ? 'workflows'
                     THEN coalesce(p.old->'workflows', '{}') || (p.new->'workflows') END,
        'categories', CASE WHEN p.new ? 'categories'
                      THEN coalesce(p.old->'categories', '{}') || (p.new->'categories') END))
    FROM (SELECT preferences AS old, %s::jsonb AS new) AS p)"""
MAX_SCOPED = 200  # workflows or categories one user's preferences name


def scoped(fields: Fields, where: str, value: Any) -> dict[str, Any] | None:
    """`workflows` or `categories`: `{"<key>": false | {"email": bool, …}}` (common/sending/preferences)."""
    if not isinstance(value, dict):
        fields.error(where, 'must be an object like {"comments": {"email": false}} or {"comments": false}')
        return None
    if len(value) > MAX_SCOPED:
        fields.error(where, f"at most {MAX_SCOPED} entries")
        return None
    out: dict[str, Any] = {}
    for key, rule in value.items():
        if not CODE_RE.match(key):
            fields.error(f"{where}.{key[:100]}", "must be a key of letters, digits, '.', '_' or '-'")
        elif rule is False:
            out[key] = False
        elif (
            isinstance(rule, dict)
            and rule
            and all(c in CHANNELS and isinstance(v, bool) for c, v in rule.items())
        ):
            out[key] = rule
        else:
            fields.error(
                f"{where}.{key}", f"must be false or an object of {', '.join(CHANNELS)} → true/false"
            )
    return out
