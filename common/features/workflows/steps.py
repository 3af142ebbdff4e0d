"""What a run does at its current step, as pure functions the engine calls.

A run's steps are a list of states stored with the run (`workflow_runs.steps`), one per step of
its pinned version, in the shape the API shows: `{name, type, status, due_at?, notification_id?,
notification_status?, reason?}`. The engine (`engine.py`) reads a run, asks `next_action` what the
current step needs, performs it (a notification, a timer) and writes the new states with a
compare-and-set; everything here is deterministic for the same run, so a second engine that
repeats a step decides the same and its notification is the same one (keyed by run and step).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from common.features.workflows.definition import DAYS, MAX_DELAY, Definition, Step
from common.rendering.templating import compile_expression, compile_source
from common.sending.schedule import next_local, parse_hhmm, zone

MAX_KEY = 255  # characters of a rendered digest or throttle key; a longer one is hashed

STEP_STATUSES = ("pending", "waiting", "completed", "skipped", "failed", "cancelled", "merged", "throttled")
# A channel step's state once its notification is final.
_STEP_OF_NOTIFICATION = {
    "delivered": "completed",
    "failed": "failed",
    "skipped": "skipped",
    "cancelled": "cancelled",
}
_NAMESPACE = uuid.UUID("6f1c3a52-6d0b-4f58-9a57-9a1e0d3c2b71")


def initial_states(definition: Definition) -> list[dict[str, Any]]:
    return [{"name": s.name, "type": s.type, "status": "pending"} for s in definition.steps]


def notification_key(run_id: uuid.UUID, step: Step) -> tuple[uuid.UUID, str]:
    """The id and request_id of the one notification a channel step of a run makes: derived, so
    an engine that repeats the step after a crash asks the store for the same one. The U+001F
    separator cannot occur in a client's request_id (common/web/validation.py)."""
    return uuid.uuid5(_NAMESPACE, f"{run_id}:{step.name}"), f"workflow\x1f{run_id}\x1f{step.name}"


def context(
    payload: Mapping[str, Any],
    recipient: Mapping[str, Any],
    states: list[dict[str, Any]],
    digest: Mapping[str, Any] | None = None,
    inbox: Mapping[uuid.UUID, Mapping[str, Any]] | None = None,
) -> dict:
    """What conditions see: the trigger's payload, the recipient pinned at trigger, each earlier
    step by name (a channel step's `status` is its notification's final status; an in-app
    step's `read` and `seen` whether its message was, from `inbox`, its notification's row in
    the inbox now), and what the last digest step before gathered (`digest.count`, `.events`,
    `.first`, `.last`)."""
    steps = {}
    for state in states:
        seen = dict(state)
        if state.get("notification_status") is not None:
            seen["status"] = state["notification_status"]
        if state.get("type") == "in_app":
            message = (
                (inbox or {}).get(uuid.UUID(state["notification_id"]))
                if state.get("notification_id")
                else None
            )
            seen["read"] = message is not None and message["read_at"] is not None
            seen["seen"] = message is not None and message["seen_at"] is not None
        steps[state["name"]] = seen
    return {"payload": payload, "recipient": recipient, "steps": steps, "digest": dict(digest or {})}


def evaluate(source: str, scope: Mapping[str, Any]) -> tuple[Any, str | None]:
    """An expression's value, or (None, why it could not be evaluated)."""
    try:
        return compile_expression(source)(**scope), None
    except Exception as exc:  # noqa: BLE001 - any failure of client code is the step's reason
        return None, f"{type(exc).__name__}: {exc}"[:300]


@dataclass(frozen=True)
class Skip:
    reason: str


@dataclass(frozen=True)
class Wait:
    until: datetime


@dataclass(frozen=True)
class Send:
    """Make the step's notification (or find the one made before)."""


@dataclass(frozen=True)
class Done:
    """The step is complete without waiting (a delay already past)."""


@dataclass(frozen=True)
class Digest:
    """Join the open window of `key`, or open one that closes at `closes_at`; with `lookback`,
    a key quiet for that long lets the event go on at once."""

    key: str
    closes_at: datetime
    lookback: float | None
    max_events: int


@dataclass(frozen=True)
class Throttle:
    key: str
    limit: int
    window: float


Action = Skip | Wait | Send | Done | Digest | Throttle


def render_key(step: Step, scope: Mapping[str, Any]) -> tuple[str, str | None]:
    """A digest's or a throttle's key for this run ("" without one), or why it failed."""
    source = step.options.get("key")
    if source is None:
        return "", None
    try:
        key = compile_source(str(source), False).render(
            payload=scope["payload"], recipient=scope["recipient"]
        )
    except Exception as exc:  # noqa: BLE001 - client code: its failure is the step's reason
        return "", f"key could not be rendered: {type(exc).__name__}: {exc}"[:300]
    if len(key) > MAX_KEY:
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return key, None


def digest_closes_at(step: Step, now: datetime, timezone: str | None) -> datetime:
    """When a window opened now closes: `window` seconds on, or the next `at` (HH:MM) on the
    wall clock of the user's zone, on one of `days` when given (DST-correct, `next_local`)."""
    if "window" in step.options:
        return now + timedelta(seconds=float(step.options["window"]))
    at = parse_hhmm(str(step.options["at"]))
    assert at is not None  # validated at PUT
    tz = zone(timezone)
    days = step.options.get("days")
    after = now
    for _ in range(8):  # a week and a day: every weekday is met
        candidate = next_local(after, at, tz)
        if not days or DAYS[candidate.astimezone(tz).weekday()] in days:
            return candidate
        after = candidate + timedelta(seconds=1)
    raise AssertionError("unreachable: every weekday recurs within a week")


def _until(step: Step, now: datetime, scope: Mapping[str, Any]) -> datetime | str:
    if "duration" in step.options:
        return now + timedelta(seconds=float(step.options["duration"]))
    value, error = evaluate(str(step.options["until"]), scope)
    if error:
        return f"until could not be evaluated ({error})"
    if isinstance(value, datetime):
        when = value if value.tzinfo else value.replace(tzinfo=UTC)
    else:
        try:
            when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return f"until gave {str(value)[:80]!r}, not an RFC 3339 time"
        if when.tzinfo is None:
            return f"until gave {str(value)[:80]!r} without a UTC offset"
    if when - now > timedelta(seconds=MAX_DELAY):
        return f"until is more than {MAX_DELAY // 86400} days ahead"
    return when


def next_action(step: Step, scope: Mapping[str, Any], now: datetime) -> Action:
    """What a pending step needs: skipped (condition false, or it cannot be evaluated), a wait,
    a notification, or nothing more."""
    if step.condition is not None:
        value, error = evaluate(step.condition, scope)
        if error:
            return Skip(f"condition could not be evaluated: {error}")
        if not value:
            return Skip("condition false")
    if step.type == "delay":
        until = _until(step, now, scope)
        if isinstance(until, str):
            return Skip(until)
        return Wait(until) if until > now else Done()
    if step.channel is not None:
        return Send()
    if step.type in ("digest", "throttle"):
        key, error = render_key(step, scope)
        if error:
            return Skip(error)
        if step.type == "throttle":
            return Throttle(key, int(step.options["limit"]), float(step.options["window"]))
        lookback = float(step.options["window"]) if step.options.get("mode") == "lookback" else None
        timezone = scope["recipient"].get("timezone") if isinstance(scope["recipient"], Mapping) else None
        return Digest(
            key, digest_closes_at(step, now, timezone), lookback, int(step.options.get("max_events", 100))
        )
    raise ValueError(f"no action for step type {step.type!r}")


def settle_channel(state: dict[str, Any], notification_status: str, error: str | None) -> None:
    """A channel step whose notification is final takes its status (and its reason)."""
    state["status"] = _STEP_OF_NOTIFICATION[notification_status]
    state["notification_status"] = notification_status
    state.pop("due_at", None)
    if error and notification_status != "delivered":
        state["reason"] = error
