"""`recipient` in templates, pure: every render sees who the notification is for; the request's
variables can neither be required for it nor replace it; an attribute that is not there renders
empty."""

from __future__ import annotations

import time

from common.rendering import templating

VERSION = {"subject": "Hi {{ recipient.name }}", "body": "<p>Plan: {{ recipient.data.plan }} {{ x }}</p>"}


def _render(variables: dict, recipient: dict | None) -> dict[str, str]:
    return templating.render_sync("email", VERSION, variables, time.monotonic() + 5, recipient)


def test_a_template_sees_the_recipient_and_does_not_require_it_as_a_variable() -> None:
    assert templating.required_variables("email", VERSION) == {"x"}
    out = _render({"x": "1"}, {"id": "u-1", "name": "Ada", "data": {"plan": "pro"}})
    assert out["subject"] == "Hi Ada" and "Plan: pro 1" in out["body"]


def test_a_variable_named_recipient_does_not_change_what_recipient_means() -> None:
    out = _render({"x": "1", "recipient": {"name": "Mallory"}}, {"id": "u-1", "name": "Ada"})
    assert out["subject"] == "Hi Ada"


def test_missing_attributes_render_empty_and_html_is_escaped() -> None:
    out = _render({"x": "1"}, {"id": "u-2", "name": "<b>Bob</b>"})
    assert out["subject"] == "Hi <b>Bob</b>"  # a subject is text
    assert "Plan:  1" in out["body"]
    html = templating.render_sync(
        "email",
        {"subject": "s", "body": "<p>{{ recipient.name }}</p>"},
        {},
        time.monotonic() + 5,
        {"name": "<b>"},
    )
    assert "&lt;b&gt;" in html["body"]
    assert _render({"x": "1"}, None)["subject"] == "Hi"  # a subject is folded to one line
