"""Send later, respect the night: when a notification goes out. Pure functions, no I/O.

Local times are resolved through the time-zone database (`zoneinfo`, with `tzdata` pinned so
every host and image has the same rules), never by adding offsets by hand, so daylight-saving
changes come out right:
- a wall-clock time that does not exist that day (skipped when clocks go forward) means the
  first instant after the gap;
- one that happens twice (clocks go back) means the first of the two.

- `next_local(after, at, zone)`: the next instant the clock in `zone` reads `at`;
- `QuietHours`: a window of local wall-clock time, `[start, end)`, that may cross midnight;
- `plan(...)`: at acceptance, now or later, and why;
- `recheck(...)`: at dispatch, send, hold again (quiet hours changed), or skip (opted out).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from common.sending.preferences import opted_out, origin_of
from common.web.validation import Fields

# Priority 8 and 9 are urgent: sent at once whatever the user's quiet hours.
URGENT_PRIORITY = 8
MAX_AHEAD = timedelta(days=365)
HHMM_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
# RFC 3339 (a date, a time and an offset); fromisoformat alone would also take a date or no offset.
_RFC3339_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
UTC_ZONE = ZoneInfo("UTC")


def parse_hhmm(value: str) -> time | None:
    match = HHMM_RE.match(value)
    return time(int(match[1]), int(match[2])) if match else None


def known_zone(name: str) -> ZoneInfo | None:
    """The IANA zone `name`, or None for anything else. Total: ZoneInfo raises not only
    ZoneInfoNotFoundError but ValueError for a path-like name (`Etc/`, `../x`, a NUL) and OSError
    for a directory of the zone database (`Etc`, `America`) or a name too long for the file
    system."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def zone(name: str | None) -> ZoneInfo:
    """The user's zone; UTC when unset or unknown (the user service validates what it stores)."""
    return (known_zone(name) if name else None) or UTC_ZONE


def _instant(day: date, at: time, tz: ZoneInfo) -> datetime:
    """The UTC instant the clock in `tz` reads `at` on `day`: the first of two (clocks going
    back), or the end of the gap when that time does not exist (clocks going forward)."""
    local = datetime.combine(day, at, tzinfo=tz)  # fold=0: the earlier of two
    instant = local.astimezone(UTC)
    if instant.astimezone(tz).replace(tzinfo=None) == local.replace(tzinfo=None):
        return instant
    # In a gap: fold=1 reads it with the offset after the change, which lands before the
    # change; fold=0 with the one before, after it. The change lies between: find its second.
    low = int(local.replace(fold=1).astimezone(UTC).timestamp())
    high = int(instant.timestamp())
    after = instant.astimezone(tz).utcoffset()
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, tz).utcoffset() == after:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


def next_local(after: datetime, at: time, tz: ZoneInfo) -> datetime:
    """The first instant at or after `after` when the wall clock in `tz` reads `at` (UTC)."""
    day = after.astimezone(tz).date()
    for offset in range(3):  # today, or tomorrow; a DST day can push one more
        candidate = _instant(day + timedelta(days=offset), at, tz)
        if candidate >= after:
            return candidate
    raise AssertionError("unreachable: a wall-clock time recurs within two days")


@dataclass(frozen=True)
class QuietHours:
    start: time
    end: time

    @classmethod
    def of(cls, value: Any) -> QuietHours | None:
        """From a stored preference (`{"start": "22:00", "end": "07:00"}`); None when off."""
        if not isinstance(value, dict):
            return None
        start, end = parse_hhmm(str(value.get("start", ""))), parse_hhmm(str(value.get("end", "")))
        if start is None or end is None or start == end:
            return None
        return cls(start, end)

    def contains(self, clock: time) -> bool:
        if self.start < self.end:
            return self.start <= clock < self.end
        return clock >= self.start or clock < self.end  # across midnight

    def end_after(self, instant: datetime, tz: ZoneInfo) -> datetime | None:
        """When the window holding `instant` ends, or None if `instant` is outside it."""
        if not self.contains(instant.astimezone(tz).time().replace(tzinfo=None)):
            return None
        return next_local(instant, self.end, tz)

    def describe(self, tz: ZoneInfo) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} {tz.key}"


def quiet_hours_field(fields: Fields, name: str = "quiet_hours") -> dict[str, str] | None:
    """Validate a `quiet_hours` preference; None turns them off."""
    value = fields.body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"start", "end"}:
        fields.error(name, 'must be {"start": "HH:MM", "end": "HH:MM"} or null')
        return None
    for key in ("start", "end"):
        if not isinstance(value[key], str) or parse_hhmm(value[key]) is None:
            fields.error(f"{name}.{key}", 'must be a 24-hour time "HH:MM"')
            return None
    if value["start"] == value["end"]:
        fields.error(name, "start and end must differ (null turns quiet hours off)")
        return None
    return {"start": value["start"], "end": value["end"]}


@dataclass(frozen=True)
class When:
    """What the client asked: `send_at` (an instant) or `send_at_local` (a wall-clock time)."""

    send_at: datetime | None = None
    local: time | None = None


def when_fields(fields: Fields, now: datetime) -> When:
    """Read `send_at` and `send_at_local`, recording their errors on `fields`."""
    raw = fields.string("send_at", required=False, max_len=40)
    send_at = None
    if raw is not None:
        try:
            send_at = datetime.fromisoformat(raw).astimezone(UTC) if _RFC3339_RE.match(raw) else None
        except (ValueError, OverflowError):  # e.g. 24:00, or year 1 with a positive offset
            send_at = None
        if send_at is None:
            fields.error("send_at", "must be an RFC 3339 timestamp with an offset, e.g. 2030-01-31T09:00:00Z")
        elif send_at - now > MAX_AHEAD:
            fields.error("send_at", "must be at most 365 days ahead")
            send_at = None
    local_raw = fields.string(
        "send_at_local", required=False, max_len=5, pattern=HHMM_RE, hint='must be a 24-hour time "HH:MM"'
    )
    if raw is not None and local_raw is not None:
        fields.error("send_at_local", "give send_at or send_at_local, not both")
    return When(send_at, parse_hhmm(local_raw) if local_raw else None)


@dataclass(frozen=True)
class Plan:
    """When to send: `send_at` None means now; `reason` goes into the history."""

    send_at: datetime | None
    reason: str | None = None


def plan(now: datetime, when: When, tz: ZoneInfo, quiet: QuietHours | None, *, urgent: bool) -> Plan:
    target, reason = now, None
    if when.send_at is not None and when.send_at > now:
        target, reason = when.send_at, "send_at"
    elif when.local is not None:
        target, reason = next_local(now, when.local, tz), f"send_at_local {when.local:%H:%M} {tz.key}"
    if quiet is not None and not urgent:
        end = quiet.end_after(target, tz)
        if end is not None:
            target, reason = end, f"quiet hours ({quiet.describe(tz)})"
    if target <= now:
        return Plan(None)
    return Plan(target, f"scheduled for {target:%Y-%m-%dT%H:%M:%SZ}: {reason}")


@dataclass(frozen=True)
class Recheck:
    """A due notification at dispatch time: `send`, or hold until `hold_until`, or skip."""

    hold_until: datetime | None = None
    skip: str | None = None
    detail: str | None = None

    @property
    def send(self) -> bool:
        return self.hold_until is None and self.skip is None


def recheck(row: dict[str, Any], user: dict[str, Any] | None, now: datetime) -> Recheck:
    """The preference and quiet hours again, as they are now (they may have changed while it
    waited). Without the user (a service down), it goes: the worker checks the opt-out again."""
    if user is None:
        return Recheck()
    reason = opted_out(user.get("preferences") or {}, row["notification_type"], origin_of(row))
    if reason is not None:
        return Recheck(skip=reason)
    if row["priority"] >= URGENT_PRIORITY:
        return Recheck()
    quiet = QuietHours.of((user.get("preferences") or {}).get("quiet_hours"))
    if quiet is None:
        return Recheck()
    tz = zone(user.get("timezone"))
    end = quiet.end_after(now, tz)
    if end is None:
        return Recheck()
    return Recheck(
        hold_until=end,
        detail=f"scheduled for {end:%Y-%m-%dT%H:%M:%SZ}: quiet hours ({quiet.describe(tz)}) at dispatch",
    )


_NOT_CANCELLABLE = {
    "sending": "it is being sent right now",
    "retrying": "a delivery attempt already ran; it is waiting to be retried",
    "delivered": "it was already delivered",
    "failed": "it already failed; nothing more will be sent",
    "skipped": "it was skipped and will not be sent",
}


def not_cancellable(status: str) -> str:
    """Why a notification in `status` cannot be cancelled, as a sentence."""
    why = _NOT_CANCELLABLE.get(status, f"it is {status}")
    return (
        f"Notification is {status} and cannot be cancelled: {why}. "
        "Only a scheduled one, or a pending one no worker has claimed yet, can be."
    )
