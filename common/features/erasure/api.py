"""Erasure (GDPR): `DELETE /api/v1/users/{id}` forgets a person everywhere.

The user service deletes the profile and devices (and its cached copy) first; then, here, the
person is redacted from what the notifications database keeps of them: every notification's
variables, metadata, pinned recipient and error text (which can hold an address), the details
of its history, the webhook deliveries' payloads about it, their topic subscriptions, and the
payload and pinned recipient of their workflow runs (an unfinished run stops); their in-app
inbox (messages and events) is deleted.
Ids, statuses and timestamps stay, for the record. A notification later sent to the erased id
is refused like one to an unknown user. Done in one transaction; a retry of the DELETE (after a
503, say) redacts again, harmlessly.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

from aiohttp import web

from common.data.db import Database
from common.keys import DB_KEY, USERS_KEY
from common.lookups.clients import ServiceUnavailable
from common.web.auth import forbidden, require
from common.web.http import ApiError, json_response
from common.web.validation import USER_ID_HINT, USER_ID_RE

log = logging.getLogger("gateway")

REDACTED = "[erased]"

_REDACT = (
    """UPDATE notifications SET variables = '{}', metadata = '{}', recipient = NULL,
           error = CASE WHEN error IS NULL THEN NULL ELSE %(mark)s END, updated_at = now()
       WHERE client_id = %(project)s AND user_id = %(user)s""",
    """UPDATE notification_events AS e SET detail = CASE WHEN e.detail IS NULL THEN NULL ELSE %(mark)s END
       FROM notifications AS n
       WHERE e.notification_id = n.id AND n.client_id = %(project)s AND n.user_id = %(user)s""",
    """UPDATE webhook_deliveries AS d
       SET payload = jsonb_set(d.payload, '{data,error}', to_jsonb(%(mark)s::text))
       WHERE d.client_id = %(project)s AND d.payload #>> '{data,user_id}' = %(user)s
         AND d.payload #> '{data,error}' IS NOT NULL AND d.payload #> '{data,error}' <> 'null'::jsonb""",
    "DELETE FROM topic_subscribers WHERE client_id = %(project)s AND user_id = %(user)s",
    # Workflow runs: their payload and pinned recipient forgotten; an unfinished one stops (its
    # revision moves, so an engine holding it drops what it decided).
    """UPDATE workflow_runs SET payload = '{}', recipient = '{}', updated_at = now(),
           revision = revision + CASE WHEN status IN ('running', 'waiting') THEN 1 ELSE 0 END,
           due_at = CASE WHEN status IN ('running', 'waiting') THEN NULL ELSE due_at END,
           reason = CASE WHEN status IN ('running', 'waiting') THEN 'user erased' ELSE reason END,
           status = CASE WHEN status IN ('running', 'waiting') THEN 'cancelled' ELSE status END
       WHERE project_id = %(project)s AND user_id = %(user)s""",
    # Their digest windows (with the payloads they held) and throttle places.
    """DELETE FROM workflow_digests WHERE project_id = %(project)s AND user_id = %(user)s""",
    """DELETE FROM workflow_throttle_passes WHERE project_id = %(project)s AND user_id = %(user)s""",
    # Their in-app inbox: the messages and the log of changes to it.
    """DELETE FROM inbox_messages WHERE project_id = %(project)s AND user_id = %(user)s""",
    """DELETE FROM inbox_events WHERE project_id = %(project)s AND user_id = %(user)s""",
)


async def redact(database: Database, project: str, user_id: str) -> None:
    """The person redacted from the notifications database (see the module's docstring)."""
    async with database.transaction() as tx:
        for statement in _REDACT:
            await tx.execute(statement, {"project": project, "user": user_id, "mark": REDACTED})


async def erase_user(request: web.Request) -> web.Response:
    principal = require(request, "client", "internal", "user")
    user_id = request.match_info["user_id"]
    if not USER_ID_RE.match(user_id):
        raise ApiError(400, "validation_error", "Invalid fields: id.", data={"fields": {"id": USER_ID_HINT}})
    if not principal.may_access_user(user_id):
        raise forbidden()
    try:
        reply = await request.config_dict[USERS_KEY].call(
            "DELETE", f"/api/v1/users/{quote(user_id, safe='')}"
        )
    except ServiceUnavailable as exc:
        raise ApiError(
            503, "service_unavailable", f"Cannot erase now: {exc}.", headers={"Retry-After": "1"}
        ) from None
    if reply.status == 404:
        # Erased before (or never there): what notifications remain are redacted all the same.
        await redact(request.config_dict[DB_KEY], principal.project, user_id)
        raise ApiError(404, "not_found", "User not found.")
    if reply.status >= 300:
        raise ApiError(reply.status, str(reply.body.get("code") or "refused"), reply.message or "Refused.")
    await redact(request.config_dict[DB_KEY], principal.project, user_id)
    log.info("user %s erased (profile, devices, subscriptions; notifications redacted)", user_id)
    return json_response({"id": user_id, "erased": True}, "user erased")


def add_routes(app: web.Application) -> None:
    """Before the proxy of /api/v1/users…: this DELETE is the gateway's own."""
    app.router.add_delete("/api/v1/users/{user_id}", erase_user)
