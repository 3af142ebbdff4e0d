"""A notification as the client API speaks of it: the request body it accepts (validated,
naming every bad field), the idempotency hash of it, the checks of its user and template, and
the views it answers with. Plain data in, plain data or an ApiError out; the gateway's
handlers do the I/O."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from common.lookups.clients import Reply
from common.rendering import templating
from common.sending import schedule
from common.vocabulary import CHANNELS, STATUSES
from common.web.http import ApiError
from common.web.validation import CODE_RE, REQUEST_ID_RE, Fields

SHARED_FIELDS = frozenset({
    "notification_type", "template_code", "variables", "request_id", "priority", "metadata",
    "language", "send_at", "send_at_local",
})  # fmt: skip
FIELDS = SHARED_FIELDS | {"user_id"}
MAX_RECIPIENTS = 1000
TOPIC_HINT = "must be a topic key (letters, digits, _ . -)"


def parse(body: dict[str, Any], to: str = "user_id") -> tuple[dict[str, Any], schedule.When]:
    """The request, validated; `to` names who it goes to: `user_id` (one user), `topic` (a
    topic's subscribers) or `recipients` (a bulk request's list)."""
    fields = Fields(body)
    fields.unknown(SHARED_FIELDS | {to})
    channel = fields.string("notification_type", max_len=10)
    if channel is not None and channel not in CHANNELS:
        fields.error("notification_type", "must be one of " + ", ".join(CHANNELS))
    target: Any
    if to == "topic":
        target = fields.string("topic", max_len=100, pattern=CODE_RE, hint=TOPIC_HINT)
    elif to == "recipients":
        target = _recipients(fields)
    else:
        target = fields.user_id("user_id")
    code = fields.string(
        "template_code", max_len=100, pattern=CODE_RE, hint="must be a template code (letters, digits, _ . -)"
    )
    request_id = fields.string(
        "request_id", max_len=255, pattern=REQUEST_ID_RE, hint="must not contain control characters"
    )
    variables = fields.object("variables")
    if "recipient" in variables:
        # Templates see the user as `recipient`; a request never changes what that means.
        fields.error("variables.recipient", "is reserved: templates see the user as recipient")
    metadata = fields.object("metadata")
    priority = fields.integer("priority", default=0, low=0, high=9)
    language = fields.language()
    when = schedule.when_fields(fields, datetime.now(UTC))
    fields.check()
    payload = {
        "notification_type": channel,
        to: target,
        "template_code": code,
        "request_id": request_id,
        "variables": variables,
        "metadata": metadata,
        "priority": priority,
        "language": language,
    }
    # Only when given, so the idempotency hash of a request without them is what it was.
    payload.update({k: body[k] for k in ("send_at", "send_at_local") if k in body})
    return payload, when


def _recipients(fields: Fields) -> list[dict[str, Any]]:
    """`recipients: [{user_id, variables?}, ...]`, each bad one named by its index."""
    value = fields.body.get("recipients")
    if not isinstance(value, list) or not value:
        fields.error("recipients", "must be a non-empty list of {user_id, variables?}")
        return []
    out = []
    for i, item in enumerate(value):
        name = f"recipients[{i}]"
        if not isinstance(item, dict):
            fields.error(name, "must be an object {user_id, variables?}")
            continue
        one = Fields(item)
        one.unknown({"user_id", "variables"})
        user_id = one.user_id("user_id")
        variables = one.object("variables")
        for key, message in one.errors.items():
            fields.error(f"{name}.{key}", message)
        if not one.errors:
            out.append({"user_id": user_id, "variables": variables})
    return out


def too_many(count: int, what: str) -> ApiError:
    return ApiError(
        413,
        "too_many_recipients",
        f"At most {MAX_RECIPIENTS} {what} per request; this one has {count}. Split it.",
    )


def body_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def accepted_view(row: dict[str, Any]) -> dict[str, Any]:
    if row["status"] == "skipped":
        status = "skipped"
    else:  # the answer it was accepted with, whatever happened since
        status = "scheduled" if row["send_at"] is not None else "pending"
    return {
        "notification_id": row["id"],
        "request_id": row["request_id"],
        "user_id": row["user_id"],
        "notification_type": row["notification_type"],
        "template_code": row["template_code"],
        "status": status,
        "error": row["error"] if row["status"] == "skipped" else None,
        "send_at": row["send_at"],
        "created_at": row["created_at"],
    }


def check_lookups(payload: dict[str, Any], user: Reply, template: Reply) -> None:
    """404 when the user or template does not exist, 422 when the template does not fit the
    request (another channel, a variable it needs and the request lacks)."""
    if user.status == 404:
        raise ApiError(404, "user_not_found", f"User {payload['user_id']} does not exist.")
    if user.status != 200:
        raise ApiError(503, "service_unavailable", "User or template service refused the lookup.")
    check_template(payload, template)
    problem = templating.missing_variables(payload["notification_type"], template.data, payload["variables"])
    if problem is not None:
        raise ApiError(422, problem.code, problem.message, data={"fields": problem.fields})


def check_template(payload: dict[str, Any], template: Reply) -> None:
    """404 when the template does not exist, 422 when it is for another channel."""
    if template.status == 404:
        raise ApiError(404, "template_not_found", f"Template {payload['template_code']!r} does not exist.")
    if template.status != 200:
        raise ApiError(503, "service_unavailable", "User or template service refused the lookup.")
    if template.data["notification_type"] != payload["notification_type"]:
        raise ApiError(
            422,
            "template_type_mismatch",
            f"Template {payload['template_code']!r} is a {template.data['notification_type']} "
            f"template; it cannot send {payload['notification_type']}.",
            data={"fields": {"template_code": "is for another notification_type"}},
        )


def view(row: dict[str, Any]) -> dict[str, Any]:
    view = dict(row)
    view["notification_id"] = view.pop("id")
    view.pop("publish_pending", None)
    view.pop("body_hash", None)
    return view


def parse_status_report(body: dict[str, Any]) -> tuple[uuid.UUID, str, str | None, str | None]:
    """`{notification_id, status, timestamp?, error?, provider?}` from a worker or an external
    sender: the notification, its new status, the reason and the provider."""
    fields = Fields(body)
    fields.unknown({"notification_id", "status", "timestamp", "error", "provider"})
    notification_id = fields.uuid("notification_id")
    status = fields.string("status", max_len=20)
    if status is not None and status not in STATUSES:
        fields.error("status", f"must be one of {', '.join(STATUSES)}")
    error = fields.string("error", required=False, max_len=2000)
    provider = fields.string("provider", required=False, max_len=50)
    fields.check()
    assert notification_id is not None and status is not None
    return notification_id, status, error, provider
