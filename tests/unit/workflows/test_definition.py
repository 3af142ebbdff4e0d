"""Workflow definitions: what a PUT may hold, refused with every problem named."""

from __future__ import annotations

from typing import Any

import pytest

from common.features.workflows.definition import MAX_DELAY, MAX_STEPS, Definition, duration_seconds, parse


def _body(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": "Comment", "steps": list(steps), **extra}


def test_a_valid_definition_with_default_names_round_trips() -> None:
    definition, errors = parse(
        _body(
            {"type": "email", "template_code": "comment"},
            {"type": "delay", "duration": "PT10M"},
            {"name": "nudge", "type": "push", "template_code": "nudge", "if": "payload.count > 1"},
            category="comments",
        )
    )
    assert errors == {} and definition is not None
    assert [s.name for s in definition.steps] == ["email-0", "delay-1", "nudge"]
    assert definition.steps[1].options == {"duration": 600.0}
    assert definition.category == "comments" and definition.critical is False
    assert Definition.from_json(definition.as_json()) == definition


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(30, 30.0), (1.5, 1.5), ("PT10M", 600.0), ("P1DT2H", 93600.0), ("P2W", 1209600.0), ("PT0.5S", 0.5)],
)
def test_durations(value: Any, seconds: float) -> None:
    assert duration_seconds(value) == seconds


@pytest.mark.parametrize("value", ["P1M", "P1Y", "10m", "PT", "P", "P1DT", True, None, [1]])
def test_durations_refused(value: Any) -> None:
    assert duration_seconds(value) is None


@pytest.mark.parametrize(
    ("step", "field", "words"),
    [
        ({"type": "sms", "template_code": "x"}, "steps[0].type", "must be one of"),
        ({"type": "email"}, "steps[0].template_code", "is required"),
        ({"type": "delay", "duration": MAX_DELAY + 1}, "steps[0].duration", "at most"),
        ({"type": "delay", "duration": -1}, "steps[0].duration", "seconds"),
        ({"type": "delay"}, "steps[0]", "either duration or until"),
        ({"type": "email", "template_code": "x", "if": "payload.a =="}, "steps[0].if", "does not compile"),
        ({"type": "email", "template_code": "x", "if": "payload.__class__"}, "steps[0].if", "__class__"),
        ({"type": "email", "template_code": "x", "if": "payload['_secret']"}, "steps[0].if", "_secret"),
        ({"type": "email", "template_code": "x", "if": "cycler.next"}, "steps[0].if", "cycler"),
        ({"type": "email", "template_code": "x", "if": "range(10) | list"}, "steps[0].if", "range"),
        ({"type": "email", "template_code": "x", "if": "'a' * 10000000"}, "steps[0].if", "budget"),
        ({"type": "email", "template_code": "x", "if": "x" * 3000}, "steps[0].if", "at most"),
        ({"type": "email", "template_code": "x", "duration": 3}, "steps[0].duration", "not a field"),
        ({"type": "email", "template_code": "x", "name": "a b"}, "steps[0].name", "letters"),
    ],
)
def test_bad_steps_are_named(step: dict[str, Any], field: str, words: str) -> None:
    definition, errors = parse(_body(step))
    assert definition is None
    assert words in errors[field], errors


def test_duplicate_names_too_many_steps_and_fields() -> None:
    _, errors = parse(
        _body({"type": "delay", "duration": 1, "name": "a"}, {"type": "delay", "duration": 1, "name": "a"})
    )
    assert "earlier step" in errors["steps[1].name"]
    _, errors = parse(_body(*[{"type": "delay", "duration": 1}] * (MAX_STEPS + 1)))
    assert "at most" in errors["steps"]
    _, errors = parse({"steps": [], "critical": "yes", "extra": 1, "category": "a b"})
    assert set(errors) == {"name", "steps", "critical", "extra", "category"}
    assert parse([1])[1] == {"body": "must be a JSON object"}


def test_digest_and_throttle_steps_parse_with_their_defaults() -> None:
    definition, errors = parse(
        _body(
            {"type": "digest", "window": "PT10M", "key": "{{ payload.post_id }}"},
            {"type": "digest", "at": "09:00", "days": ["fri", "mon"], "max_events": 5},
            {"type": "digest", "window": 60, "mode": "lookback"},
            {
                "type": "throttle",
                "limit": 3,
                "window": "PT1M",
                "key": "{{ recipient.id }}-{{ payload.kind }}",
            },
        )
    )
    assert errors == {} and definition is not None
    first, daily, lookback, throttle = (s.options for s in definition.steps)
    assert first == {"window": 600.0, "mode": "fixed", "max_events": 100, "key": "{{ payload.post_id }}"}
    assert daily == {"at": "09:00", "days": ["mon", "fri"], "mode": "fixed", "max_events": 5}
    assert lookback["mode"] == "lookback"
    assert throttle == {"limit": 3, "window": 60.0, "key": "{{ recipient.id }}-{{ payload.kind }}"}
    assert Definition.from_json(definition.as_json()) == definition


@pytest.mark.parametrize(
    ("step", "where", "says"),
    [
        ({"type": "digest"}, "steps[0]", "either window"),
        ({"type": "digest", "window": 60, "at": "09:00"}, "steps[0]", "either window"),
        ({"type": "digest", "window": 0}, "steps[0].window", "ISO 8601"),
        ({"type": "digest", "window": MAX_DELAY + 1}, "steps[0].window", "at most"),
        ({"type": "digest", "at": "9am"}, "steps[0].at", "HH:MM"),
        ({"type": "digest", "at": "24:00"}, "steps[0].at", "HH:MM"),
        ({"type": "digest", "at": "09:00", "days": ["monday"]}, "steps[0].days", "mon"),
        ({"type": "digest", "window": 60, "days": ["mon"]}, "steps[0].days", "goes with at"),
        ({"type": "digest", "at": "09:00", "mode": "lookback"}, "steps[0].mode", "needs a window"),
        ({"type": "digest", "window": 60, "mode": "sliding"}, "steps[0].mode", "fixed or lookback"),
        ({"type": "digest", "window": 60, "max_events": 0}, "steps[0].max_events", "1 to 1,000"),
        ({"type": "digest", "window": 60, "max_events": 5000}, "steps[0].max_events", "1 to 1,000"),
        ({"type": "digest", "window": 60, "key": "{{ config }}"}, "steps[0].key", "may read only"),
        ({"type": "digest", "window": 60, "key": "{{ payload.__class__ }}"}, "steps[0].key", "__class__"),
        ({"type": "digest", "window": 60, "key": "{{ payload.x"}, "steps[0].key", "does not compile"),
        ({"type": "digest", "window": 60, "key": "x" * 501}, "steps[0].key", "at most 500"),
        ({"type": "digest", "window": 60, "key": ""}, "steps[0].key", "non-empty"),
        ({"type": "digest", "window": 60, "limit": 3}, "steps[0].limit", "not a field of a digest"),
        ({"type": "throttle", "window": 60}, "steps[0].limit", "from 1 to 10,000"),
        ({"type": "throttle", "limit": True, "window": 60}, "steps[0].limit", "from 1 to 10,000"),
        ({"type": "throttle", "limit": 3}, "steps[0].window", "ISO 8601"),
        ({"type": "throttle", "limit": 3, "window": 60, "mode": "x"}, "steps[0].mode", "not a field"),
    ],
)
def test_bad_digest_and_throttle_steps_are_named(step: dict[str, Any], where: str, says: str) -> None:
    definition, errors = parse(_body(step))
    assert definition is None
    assert says in errors.get(where, ""), errors


def test_a_key_template_may_loop_over_what_it_reads() -> None:
    step = {
        "type": "throttle",
        "limit": 1,
        "window": 1,
        "key": "{% for t in payload.tags %}{{ t }}{% endfor %}",
    }
    assert parse(_body(step))[1] == {}
