"""What a run does at a step: conditions, delays and channel outcomes, decided purely."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from common.features.workflows.definition import Step
from common.features.workflows.steps import (
    Done,
    Send,
    Skip,
    Wait,
    context,
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
