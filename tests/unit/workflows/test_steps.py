"""What a run does at a step: conditions, delays and channel outcomes, decided purely."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from common.features.workflows.definition import Step
from common.features.workflows.steps import (
    Digest,
    Done,
    Send,
    Skip,
    Throttle,
    Wait,
    context,
    digest_closes_at,
    next_action,
    notification_key,
    settle_channel,
)

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def test_conditions_see_payload_recipient_and_earlier_steps() -> None:
    states = [{"name": "push", "type": "push", "status": "failed", "notification_status": "failed"}]
    scope = context({"count": 3}, {"id": "u1", "data": {"plan": "pro"}}, states)
    email = Step("email", "email", "steps.push.status != 'delivered'", {"template_code": "t"})
    assert next_action(email, scope, NOW) == Send()
    assert next_action(Step("e", "email", "payload.count > 5", {}), scope, NOW) == Skip("condition false")
    assert next_action(Step("e", "email", "recipient.data.plan == 'pro'", {}), scope, NOW) == Send()
    # A missing attribute is undefined, not an error: false in a test.
    assert next_action(Step("e", "email", "payload.order.express", {}), scope, NOW) == Skip("condition false")


def test_a_condition_that_fails_skips_with_the_reason() -> None:
    action = next_action(Step("e", "email", "payload.count + 'a'", {}), context({"count": 1}, {}, []), NOW)
    assert isinstance(action, Skip) and "could not be evaluated" in action.reason


def test_delays_by_duration_and_until() -> None:
    scope = context({"at": (NOW + timedelta(hours=1)).isoformat(), "past": "2020-01-01T00:00:00Z"}, {}, [])
    assert next_action(Step("d", "delay", None, {"duration": 60}), scope, NOW) == Wait(
        NOW + timedelta(seconds=60)
    )
    assert next_action(Step("d", "delay", None, {"until": "payload.at"}), scope, NOW) == Wait(
        NOW + timedelta(hours=1)
    )
    assert next_action(Step("d", "delay", None, {"until": "payload.past"}), scope, NOW) == Done()
    bad = next_action(Step("d", "delay", None, {"until": "payload.nothing"}), scope, NOW)
    assert isinstance(bad, Skip) and "RFC 3339" in bad.reason
    far = context({"at": (NOW + timedelta(days=400)).isoformat()}, {}, [])
    action = next_action(Step("d", "delay", None, {"until": "payload.at"}), far, NOW)
    assert isinstance(action, Skip) and "days ahead" in action.reason


def test_a_channel_step_takes_its_notifications_final_status() -> None:
    state = {"name": "push", "type": "push", "status": "waiting", "due_at": "x"}
    settle_channel(state, "failed", "no device")
    assert state == {
        "name": "push",
        "type": "push",
        "status": "failed",
        "notification_status": "failed",
        "reason": "no device",
    }
    delivered = {"name": "e", "type": "email", "status": "waiting"}
    settle_channel(delivered, "delivered", None)
    assert delivered["status"] == "completed"


def test_the_notification_of_a_run_and_step_is_always_the_same() -> None:
    run = uuid.uuid4()
    step = Step("email", "email", None, {})
    assert notification_key(run, step) == notification_key(run, step)
    assert notification_key(run, step) != notification_key(uuid.uuid4(), step)
    assert notification_key(run, step)[1].count("\x1f") == 2


def test_digest_and_throttle_steps_render_their_keys() -> None:
    scope = context({"post_id": 7}, {"id": "u1", "timezone": None}, [])
    digest = Step(
        "d",
        "digest",
        None,
        {"window": 60.0, "mode": "fixed", "max_events": 5, "key": "post-{{ payload.post_id }}"},
    )
    assert next_action(digest, scope, NOW) == Digest("post-7", NOW + timedelta(seconds=60), None, 5)
    lookback = Step("d", "digest", None, {"window": 30.0, "mode": "lookback", "max_events": 100})
    assert next_action(lookback, scope, NOW) == Digest("", NOW + timedelta(seconds=30), 30.0, 100)
    throttle = Step("t", "throttle", None, {"limit": 3, "window": 60.0, "key": "{{ payload.post_id }}"})
    assert next_action(throttle, scope, NOW) == Throttle("7", 3, 60.0)
    # A key too long for an index is hashed; one that cannot render skips the step, saying why.
    long_key = Step("t", "throttle", None, {"limit": 3, "window": 60.0, "key": "{{ 'x' * 300 }}"})
    action = next_action(long_key, scope, NOW)
    assert isinstance(action, Throttle) and action.key.startswith("sha256:") and len(action.key) == 71
    broken = Step("t", "throttle", None, {"limit": 3, "window": 60.0, "key": "{{ payload.post_id.nope() }}"})
    skipped = next_action(broken, scope, NOW)
    assert isinstance(skipped, Skip) and skipped.reason.startswith("key could not be rendered")


def test_a_daily_digest_closes_at_the_next_local_time_dst_correct() -> None:
    daily = Step("d", "digest", None, {"at": "09:00"})
    # Kolkata is UTC+05:30: 09:00 there is 03:30 UTC; at 12:00 UTC it is tomorrow's.
    assert digest_closes_at(daily, NOW, "Asia/Kolkata") == datetime(2026, 12, 5, 3, 30, tzinfo=UTC)
    assert digest_closes_at(daily, NOW, None) == datetime(2026, 12, 5, 9, 0, tzinfo=UTC)  # no zone: UTC
    # New York springs forward on 2026-03-08: 02:30 does not exist, the first instant after the
    # gap (03:00 EDT, 07:00 UTC) is meant; in November's fall back, the first of the two 01:30.
    gap = Step("d", "digest", None, {"at": "02:30"})
    before = datetime(2026, 3, 8, 5, 0, tzinfo=UTC)  # 00:00 EST
    assert digest_closes_at(gap, before, "America/New_York") == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)
    twice = Step("d", "digest", None, {"at": "01:30"})
    autumn = datetime(2026, 11, 1, 4, 0, tzinfo=UTC)  # 00:00 EDT
    assert digest_closes_at(twice, autumn, "America/New_York") == datetime(2026, 11, 1, 5, 30, tzinfo=UTC)
    # Weekly: 2026-12-04 is a Friday; the next Monday 09:00 in Kolkata.
    weekly = Step("d", "digest", None, {"at": "09:00", "days": ["mon"]})
    assert digest_closes_at(weekly, NOW, "Asia/Kolkata") == datetime(2026, 12, 7, 3, 30, tzinfo=UTC)
