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
