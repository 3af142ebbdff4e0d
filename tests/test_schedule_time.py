"""When a notification goes out: local times, quiet hours and daylight-saving changes (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from common.sending.schedule import UTC_ZONE, QuietHours, When, next_local, plan, recheck, zone

NEW_YORK = ZoneInfo("America/New_York")
LISBON = ZoneInfo("Europe/Lisbon")
KATHMANDU = ZoneInfo("Asia/Kathmandu")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "at", "tz", "expected"),
    [
        # Later today, in the zone (+05:45): 09:00 local is 03:15 UTC.
        (utc(2025, 6, 1, 1, 0), time(9, 0), KATHMANDU, utc(2025, 6, 1, 3, 15)),
        # Already past today: tomorrow.
        (utc(2025, 6, 1, 4, 0), time(9, 0), KATHMANDU, utc(2025, 6, 2, 3, 15)),
        # The local date differs from the UTC date: 23:30 on 31 May in New York is 03:30 UTC 1 June.
        (utc(2025, 6, 1, 2, 0), time(23, 30), NEW_YORK, utc(2025, 6, 1, 3, 30)),
        # The very minute: now, not tomorrow.
        (utc(2025, 6, 1, 13, 0), time(9, 0), NEW_YORK, utc(2025, 6, 1, 13, 0)),
        # Clocks go forward (10 March 2024, 02:00 → 03:00): 02:30 does not exist, so the first
        # instant after the gap, 03:00 EDT.
        (utc(2024, 3, 10, 5, 0), time(2, 30), NEW_YORK, utc(2024, 3, 10, 7, 0)),
        # The same hour on an ordinary day is EDT: 09:00 the day after the change is 13:00 UTC.
        (utc(2024, 3, 10, 14, 0), time(9, 0), NEW_YORK, utc(2024, 3, 11, 13, 0)),
        # Clocks go back (3 November 2024): 01:30 happens twice; the first one (EDT).
        (utc(2024, 11, 3, 4, 0), time(1, 30), NEW_YORK, utc(2024, 11, 3, 5, 30)),
        # Just after the first 01:30: the next one is tomorrow's, not the repeated hour.
        (utc(2024, 11, 3, 5, 31), time(1, 30), NEW_YORK, utc(2024, 11, 4, 6, 30)),
    ],
)
def test_next_local_time(now: datetime, at: time, tz: ZoneInfo, expected: datetime) -> None:
    assert next_local(now, at, tz) == expected


def test_quiet_hours_across_midnight() -> None:
    night = QuietHours(time(22, 0), time(7, 0))
    assert night.contains(time(22, 0)) and night.contains(time(23, 59)) and night.contains(time(0, 0))
    assert night.contains(time(6, 59))
    assert not night.contains(time(7, 0)) and not night.contains(time(12, 0))
    assert not night.contains(time(21, 59))
    lunch = QuietHours(time(12, 0), time(13, 30))
    assert lunch.contains(time(12, 0)) and lunch.contains(time(13, 29))
    assert not lunch.contains(time(13, 30)) and not lunch.contains(time(11, 59))


def test_end_of_quiet_window_in_the_users_zone() -> None:
    night = QuietHours(time(22, 0), time(7, 0))
    # 23:00 in Lisbon (summer, UTC+1) on 1 June: held until 07:00 the next morning.
    assert night.end_after(utc(2025, 6, 1, 22, 0), LISBON) == utc(2025, 6, 2, 6, 0)
    # 03:00 local: until 07:00 the same day.
    assert night.end_after(utc(2025, 6, 2, 2, 0), LISBON) == utc(2025, 6, 2, 6, 0)
    # Outside the window: nothing to wait for.
    assert night.end_after(utc(2025, 6, 2, 12, 0), LISBON) is None
    # The night the clocks go forward (31 March 2024, 01:00 → 02:00 in Lisbon): 23:00 WET
    # until 07:00 WEST, which is 06:00 UTC: seven hours, not eight.
    assert night.end_after(utc(2024, 3, 30, 23, 0), LISBON) == utc(2024, 3, 31, 6, 0)
    # The night they go back (27 October 2024): 23:00 WEST until 07:00 WET = 07:00 UTC.
    assert night.end_after(utc(2024, 10, 26, 22, 0), LISBON) == utc(2024, 10, 27, 7, 0)


def test_a_window_ending_in_the_dst_gap_ends_when_the_gap_does() -> None:
    # Quiet until 02:30 in New York on the night 02:00-03:00 does not exist: free from 03:00 EDT.
    window = QuietHours(time(22, 0), time(2, 30))
    assert window.end_after(utc(2024, 3, 10, 5, 0), NEW_YORK) == utc(2024, 3, 10, 7, 0)


def test_plan_send_at_local_and_quiet_hours() -> None:
    now = utc(2025, 6, 1, 21, 30)  # 22:30 in Lisbon
    night = QuietHours(time(22, 0), time(7, 0))
    assert plan(now, When(), LISBON, None, urgent=False).send_at is None
    held = plan(now, When(), LISBON, night, urgent=False)
    assert held.send_at == utc(2025, 6, 2, 6, 0) and held.reason and "quiet hours" in held.reason
    # Urgent goes now, and a send_at in the past means now.
    assert plan(now, When(), LISBON, night, urgent=True).send_at is None
    assert plan(now, When(send_at=now - timedelta(hours=1)), UTC_ZONE, None, urgent=False).send_at is None
    # A send_at that lands in the window is held to its end; urgent keeps the send_at.
    late = When(send_at=utc(2025, 6, 2, 1, 0))
    assert plan(now, late, LISBON, night, urgent=False).send_at == utc(2025, 6, 2, 6, 0)
    assert plan(now, late, LISBON, night, urgent=True).send_at == utc(2025, 6, 2, 1, 0)
    # send_at_local in the user's zone.
    local = plan(now, When(local=time(9, 15)), LISBON, None, urgent=False)
    assert local.send_at == utc(2025, 6, 2, 8, 15) and local.reason and "Europe/Lisbon" in local.reason


def test_recheck_at_dispatch() -> None:
    now = utc(2025, 6, 1, 21, 30)  # 22:30 in Lisbon
    row = {"notification_type": "email", "priority": 0}
    quiet = {
        "timezone": "Europe/Lisbon",
        "preferences": {"email": True, "quiet_hours": {"start": "22:00", "end": "07:00"}},
    }
    assert recheck(row, {"preferences": {"email": True}}, now).send
    assert recheck(row, None, now).send  # user service away: the worker re-checks the opt-out
    held = recheck(row, quiet, now)
    assert held.hold_until == utc(2025, 6, 2, 6, 0) and held.detail and "quiet hours" in held.detail
    assert recheck({**row, "priority": 9}, quiet, now).send
    opted_out = recheck({**row, "priority": 9}, {"preferences": {"email": False}}, now)
    assert opted_out.skip == "user opted out of email notifications"


def test_zone_falls_back_to_utc() -> None:
    assert zone(None).key == "UTC" and zone("Not/AZone").key == "UTC"
    assert zone("Asia/Kathmandu").key == "Asia/Kathmandu"
