"""Whether a user wants a notification: one rule, read at acceptance (`decision.py`), at dispatch
(`schedule.recheck`) and at sending time (`common/delivery/worker.py`), so that an opt-out made
meanwhile wins, and a critical workflow's step goes out at each of them.

Preferences (the user service validates them): `{"email": bool, "push": bool, "workflows":
{"<key>": false | {"email": bool, …}}, "categories": {"<category>": false | {…}}}`. For a
notification a workflow made, the most specific rule wins: that workflow's, then its category's,
then the channel switch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Origin:
    """The workflow a notification comes from, as preferences see it."""

    workflow_key: str
    category: str | None = None
    critical: bool = False

    def as_metadata(self) -> dict[str, Any]:
        """Kept in the notification's metadata (it travels with it to the dispatcher and the
        workers), read back by `origin_of`."""
        return {"workflow": {"key": self.workflow_key, "category": self.category, "critical": self.critical}}


def origin_of(row: Mapping[str, Any]) -> Origin | None:
    """The workflow of a stored notification; only one a run made (`workflow_run_id`) has one, so
    a client cannot make an ordinary notification critical by writing its metadata."""
    if not row.get("workflow_run_id"):
        return None
    found = (row.get("metadata") or {}).get("workflow")
    if not isinstance(found, Mapping) or not isinstance(found.get("key"), str):
        return None
    category = found.get("category")
    return Origin(
        found["key"], category if isinstance(category, str) else None, found.get("critical") is True
    )


def _rule(value: Any, channel: str) -> bool | None:
    """A workflow's or category's entry: `false` (all of it off) or `{channel: bool}`."""
    if value is False:
        return False
    if isinstance(value, Mapping) and isinstance(value.get(channel), bool):
        return bool(value[channel])
    return None


def opted_out(preferences: Mapping[str, Any], channel: str, origin: Origin | None = None) -> str | None:
    """Why the user does not want this notification (the rule that said so), or None when they do
    or when it is critical."""
    if origin is not None:
        if origin.critical:
            return None
        rule = _rule((preferences.get("workflows") or {}).get(origin.workflow_key), channel)
        if rule is not None:
            return None if rule else f"user opted out of {channel} for workflow {origin.workflow_key}"
        if origin.category is not None:
            rule = _rule((preferences.get("categories") or {}).get(origin.category), channel)
            if rule is not None:
                return None if rule else f"user opted out of category {origin.category}"
    if not bool(preferences.get(channel, True)):
        return f"user opted out of {channel} notifications"
    return None
