"""`schedule.zone` and `known_zone` are total: every string a user record or a recipient could
carry is a zone or None (then UTC), never an exception from the zone database's file system."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from common.sending.schedule import UTC_ZONE, known_zone, zone


@pytest.mark.parametrize(
    "name",
    [
        "Etc",
        "America",
        "Etc/",
        "../etc/passwd",
        "/etc/passwd",
        "UTC\x00",
        "a" * 300,
        "Nowhere/City",
        " ",
        "zone.tab",
    ],
)
def test_names_that_are_not_zones_are_none_and_schedule_in_utc(name: str) -> None:
    assert known_zone(name) is None
    assert zone(name) is UTC_ZONE


def test_real_zones_and_unset() -> None:
    assert known_zone("Asia/Kolkata") == ZoneInfo("Asia/Kolkata")
    assert zone("Europe/Lisbon") == ZoneInfo("Europe/Lisbon")
    assert zone(None) is UTC_ZONE and zone("") is UTC_ZONE
