"""Workflows as the client API speaks of them: definitions and their versions, triggers, runs and
cancellation. Client API key only; everything belongs to the key's project.

A run's way, top to bottom: `POST /api/v1/workflows/{key}/trigger` → the recipients' profiles
looked up (unknown ones `rejected`) → one run per recipient stored under (project, workflow,
request_id, user) with the current version pinned (`store.create_runs`; the unique constraint
decides races) → the engine woken → 202. The engine (`engine.py`) then takes the run from
PostgreSQL and moves it step by step (`steps.py`), making each channel step's notification
through the acceptance decision (`sender.py`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from common import background
from common.data import topics
from common.features.workflows import definition as definitions
from common.features.workflows.engine import Engine
from common.features.workflows.fanout import FanoutStore, TopicFanout
from common.features.workflows.sender import StepSender
from common.features.workflows.steps import initial_states
from common.features.workflows.store import NewRun, WorkflowStore
from common.keys import (
    ACCEPT_BATCH_KEY,
    CONFIG_KEY,
    DB_KEY,
    LOOKUPS_KEY,
    METRICS_KEY,
    OUTBOX_KEY,
    REDIS_KEY,
    STORE_KEY,
    USERS_KEY,
    WORKFLOW_ENGINE_KEY,
    WORKFLOW_FANOUT_KEY,
    WORKFLOWS_KEY,
)
from common.logs import correlation_id_var
from common.lookups.cache import profiles
from common.lookups.clients import ServiceUnavailable
from common.sending import parsing
from common.sending.decision import recipient_of
from common.vocabulary import FINAL_RUN, RUN_STATUSES
from common.web import admission, cursors
from common.web.auth import require
from common.web.http import (
    ApiError,
    cursor_meta,
    json_response,
    not_found,
    paging,
    read_json,
    strict_int,
    validation_error,
)
from common.web.validation import CODE_RE, REQUEST_ID_RE, USER_ID_HINT, USER_ID_RE, Fields, parse_uuid

log = logging.getLogger(__name__)

MAX_RECIPIENTS = parsing.MAX_RECIPIENTS
MAX_PAYLOAD = 64 * 1024  # bytes of a trigger's payload, as JSON
KEY_HINT = "must be a workflow key: letters, digits, '.', '_' or '-', at most 100"


def _unavailable(exc: Exception) -> ApiError:
    return ApiError(503, "service_unavailable", f"Cannot answer now: {exc}.", headers={"Retry-After": "1"})


def _key(request: web.Request) -> str:
    key = request.match_info["key"]
    if not CODE_RE.match(key):
        raise validation_error({"key": KEY_HINT})
    return key


# --- definitions -------------------------------------------------------------------------------


def _workflow_view(row: dict[str, Any]) -> dict[str, Any]:
    d = row["definition"]
    return {
        "key": row["key"],
        "name": d["name"],
        "category": d.get("category"),
        "critical": bool(d.get("critical")),
        "steps": d["steps"],
        "version": row["version"],
        "current_version": row["current_version"],
        "latest_version": row["latest_version"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


async def _check_templates(request: web.Request, found: definitions.Definition) -> None:
    """Each channel step names a template of its own channel (422 naming the step otherwise)."""
    templates = request.config_dict[LOOKUPS_KEY].templates
    checks = [(i, s) for i, s in enumerate(found.steps) if s.channel is not None]
    try:
        replies = await asyncio.gather(
            *(
                templates.get_template(s.options["template_code"], s.options.get("language"))
                for _, s in checks
            )
        )
    except ServiceUnavailable as exc:
        raise _unavailable(exc) from None
    errors: dict[str, str] = {}
    for (index, step), reply in zip(checks, replies, strict=True):
        where = f"steps[{index}].template_code"
        if reply.status == 404:
            errors[where] = f"no template {step.options['template_code']!r}"
        elif reply.status != 200:
            raise _unavailable(RuntimeError(f"the template service answered {reply.status}"))
        elif reply.data["notification_type"] != step.channel:
            errors[where] = f"is a {reply.data['notification_type']} template; this step sends {step.channel}"
    if errors:
        raise ApiError(
            422, "invalid_workflow", f"Invalid steps: {', '.join(errors)}.", data={"fields": errors}
        )


async def put_workflow(request: web.Request) -> web.Response:
    project = require(request, "client").project
    key = _key(request)
    found, problems = definitions.parse(await read_json(request))
    if found is None:
        raise ApiError(
            422, "invalid_workflow", f"Invalid fields: {', '.join(problems)}.", data={"fields": problems}
        )
    await _check_templates(request, found)
    store = request.config_dict[WORKFLOWS_KEY]
    version, created = await store.put(project, key, found)
    row = await store.get(project, key, version)
    assert row is not None
    log.info("workflow %s version %s saved", key, version)
    return json_response(
        _workflow_view(row),
        "workflow created" if created else f"workflow version {version} created",
        status=201 if created else 200,
    )


async def get_workflow(request: web.Request) -> web.Response:
    project = require(request, "client").project
    row = await request.config_dict[WORKFLOWS_KEY].get(project, _key(request))
    if row is None:
        raise not_found("Workflow")
    return json_response(_workflow_view(row), "workflow")


async def list_workflows(request: web.Request) -> web.Response:
    project = require(request, "client").project
    _, limit = paging(request)
    after = None
    if "after" in request.query:
        after = cursors.decode(request.query["after"])
        if after is None:
            raise validation_error({"after": "is not a cursor this API gave"})
    rows, has_next = await request.config_dict[WORKFLOWS_KEY].page(project, limit, after)
    cursor = cursors.encode(rows[-1]["created_at"], rows[-1]["key"]) if has_next else None
    return json_response(
        [_workflow_view(r) for r in rows], "workflows", meta=cursor_meta(limit, None, has_next, cursor)
    )


async def list_versions(request: web.Request) -> web.Response:
    project = require(request, "client").project
    rows = await request.config_dict[WORKFLOWS_KEY].versions(project, _key(request))
    if not rows:
        raise not_found("Workflow")
    return json_response(
        [
            {
                "version": r["version"],
                "current": r["current"],
                "created_at": r["created_at"],
                **r["definition"],
            }
            for r in rows
        ],
        "versions",
    )


async def activate_version(request: web.Request) -> web.Response:
    project = require(request, "client").project
    key = _key(request)
    version = strict_int(request.match_info["version"])
    if version is None:
        raise not_found("Workflow version")
    store = request.config_dict[WORKFLOWS_KEY]
    if not await store.activate(project, key, version):
        raise not_found("Workflow version")
    row = await store.get(project, key)
    assert row is not None
    return json_response(_workflow_view(row), f"version {version} is current")


# --- triggers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    users: list[str]  # empty for a topic
    topic: str | None
    payload: dict[str, Any]
    request_id: str
    cancellation_key: str | None


def _parse_trigger(body: dict[str, Any]) -> Trigger:
    fields = Fields(body)
    fields.unknown({"to", "payload", "request_id", "cancellation_key"})
    to = body.get("to")
    users: list[str] = []
    topic: str | None = None
    if isinstance(to, str):
        to = [to]
    if isinstance(to, list) and to:
        if len(to) > MAX_RECIPIENTS:
            raise parsing.too_many(len(to), "recipients")
        for index, user_id in enumerate(to):
            if not isinstance(user_id, str) or not USER_ID_RE.match(user_id):
                fields.error(f"to[{index}]", USER_ID_HINT)
            else:
                users.append(user_id)
    elif isinstance(to, dict) and "topic" in to:
        if set(to) != {"topic"}:
            fields.error("to", 'a topic is given as {"topic": "<key>"} and nothing else')
        elif not isinstance(to["topic"], str) or not CODE_RE.match(to["topic"]):
            fields.error("to.topic", "must be a topic key: letters, digits, '.', '_' or '-', at most 100")
        else:
            topic = to["topic"]
    else:
        fields.error("to", 'is required: a user id, a list of up to 1,000, or {"topic": "<key>"}')
    payload = fields.object("payload")
    if payload and len(orjson.dumps(payload)) > MAX_PAYLOAD:
        raise ApiError(
            413,
            "payload_too_large",
            f"payload is over {MAX_PAYLOAD:,} bytes.",
            data={"fields": {"payload": f"at most {MAX_PAYLOAD:,} bytes of JSON"}},
        )
    request_id = fields.string(
        "request_id", max_len=255, pattern=REQUEST_ID_RE, hint="must not contain control characters"
    )
    cancellation_key = fields.string(
        "cancellation_key", required=False, max_len=255, pattern=REQUEST_ID_RE,
        hint="must not contain control characters",
    )  # fmt: skip
    fields.check()
    assert request_id is not None
    return Trigger(list(dict.fromkeys(users)), topic, payload, request_id, cancellation_key)


@admission.bounded
async def trigger(request: web.Request) -> web.Response:
    project = require(request, "client").project
    key = _key(request)
    body = await read_json(request)
    parsed = _parse_trigger(body)
    users, payload, request_id, cancellation_key = (
        parsed.users, parsed.payload, parsed.request_id, parsed.cancellation_key,
    )  # fmt: skip
    store = request.config_dict[WORKFLOWS_KEY]
    workflow = await store.get(project, key)
    if workflow is None:
        raise not_found("Workflow")
    if parsed.topic is not None:
        return await _trigger_topic(request, project, key, int(workflow["version"]), parsed)
    found = definitions.Definition.from_json(workflow["definition"])
    try:
        known = await profiles(request.config_dict[REDIS_KEY], request.config_dict[USERS_KEY], users)
    except ServiceUnavailable as exc:
        raise _unavailable(exc) from None
    body_hash = parsing.body_hash({"to": users, "payload": payload, "cancellation_key": cancellation_key})
    correlation = correlation_id_var.get() or uuid.uuid4().hex
    runs = [
        NewRun(
            id=uuid.uuid4(),
            project_id=project,
            workflow_key=key,
            version=int(workflow["version"]),
            user_id=user_id,
            request_id=request_id,
            body_hash=body_hash,
            cancellation_key=cancellation_key,
            payload=payload,
            recipient=recipient_of(user_id, known[user_id]),
            steps=initial_states(found),
            correlation_id=correlation,
        )
        for user_id in users
        if user_id in known
    ]
    rows = await store.create_runs(runs)
    if any(row["body_hash"] != body_hash for row in rows):
        raise ApiError(
            422, "idempotency_conflict", f"request_id {request_id!r} was already used with a different body."
        )
    if any(row["created"] for row in rows):
        request.config_dict[WORKFLOW_ENGINE_KEY].wake.set()
    rejected = [
        {"user_id": u, "error": f"user_not_found: User {u} does not exist."} for u in users if u not in known
    ]
    replay = bool(rows) and not any(row["created"] for row in rows)
    log.info("workflow %s triggered: %d runs, %d rejected", key, len(rows), len(rejected))
    return json_response(
        {"runs": [{"run_id": r["id"], "user_id": r["user_id"]} for r in rows], "rejected": rejected},
        "workflow already triggered (idempotent replay)" if replay else "workflow triggered",
        status=202,
        headers={"Idempotent-Replayed": "true"} if replay else None,
    )


async def _trigger_topic(
    request: web.Request, project: str, key: str, version: int, parsed: Trigger
) -> web.Response:
    """A topic's trigger: the fan-out stored (the engine's fan-out makes the runs) and 202 with
    its `batch_id`; its runs are listed with `GET /api/v1/workflow-runs/?batch_id=`."""
    assert parsed.topic is not None
    if not await topics.exists(request.config_dict[DB_KEY], project, parsed.topic):
        raise not_found("Topic")
    to = {"topic": parsed.topic}
    body_hash = parsing.body_hash(
        {"to": to, "payload": parsed.payload, "cancellation_key": parsed.cancellation_key}
    )
    fanout = request.config_dict[WORKFLOW_FANOUT_KEY]
    row, created = await fanout.fanouts.create(
        {
            "id": uuid.uuid4(),
            "project_id": project,
            "workflow_key": key,
            "version": version,
            "topic_key": parsed.topic,
            "request_id": parsed.request_id,
            "body_hash": body_hash,
            "cancellation_key": parsed.cancellation_key,
            "payload": parsed.payload,
            "correlation_id": correlation_id_var.get() or uuid.uuid4().hex,
        }
    )
    if row["body_hash"] != body_hash:
        raise ApiError(
            422,
            "idempotency_conflict",
            f"request_id {parsed.request_id!r} was already used with a different body.",
        )
    if created:
        fanout.wake.set()
    log.info("workflow %s triggered for topic %s: fan-out %s", key, parsed.topic, row["id"])
    return json_response(
        _fanout_view(row),
        "workflow triggered for a topic" if created else "workflow already triggered (idempotent replay)",
        status=202,
        headers=None if created else {"Idempotent-Replayed": "true"},
    )


def _fanout_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "batch_id": row["id"],
        "workflow_key": row["workflow_key"],
        "version": row["version"],
        "topic": row["topic_key"],
        "status": "done" if row["done_at"] is not None else "fanning_out",
        "runs_made": row["runs"],
        "subscribers_unknown": row["rejected"],
        # The shape of a trigger's answer; the runs come later (`?batch_id=` lists them).
        "runs": [],
        "rejected": [],
        "created_at": row["created_at"],
        "done_at": row["done_at"],
    }


async def get_fanout(request: web.Request) -> web.Response:
    project = require(request, "client").project
    batch_id = parse_uuid(request.match_info["batch_id"])
    fanouts = request.config_dict[WORKFLOW_FANOUT_KEY].fanouts
    row = await fanouts.get(project, batch_id) if batch_id else None
    if row is None or row["workflow_key"] != _key(request):
        raise not_found("Workflow batch")
    return json_response(_fanout_view(row), "workflow batch")


async def cancel(request: web.Request) -> web.Response:
    project = require(request, "client").project
    key = _key(request)
    fields = Fields(await read_json(request))
    fields.unknown({"cancellation_key", "user_id"})
    cancellation_key = fields.string("cancellation_key", max_len=255, pattern=REQUEST_ID_RE)
    user_id = fields.user_id("user_id", required=False)
    fields.check()
    assert cancellation_key is not None
    cancelled = await request.config_dict[WORKFLOW_ENGINE_KEY].cancel(
        project,
        reason="cancelled by cancellation_key",
        workflow_key=key,
        cancellation_key=cancellation_key,
        user_id=user_id,
    )
    log.info("workflow %s: %d runs cancelled by key", key, cancelled)
    return json_response({"cancelled": cancelled}, f"{cancelled} runs cancelled")


# --- runs --------------------------------------------------------------------------------------


def run_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": row["id"],
        "workflow_key": row["workflow_key"],
        "version": row["version"],
        "user_id": row["user_id"],
        "request_id": row["request_id"],
        "cancellation_key": row["cancellation_key"],
        "batch_id": row["batch_id"],
        "status": row["status"],
        "reason": row["reason"],
        # The run whose digest this run's event joined (status merged).
        "merged_into": row["merged_into"],
        "payload": row["payload"],
        "steps": row["steps"],
        # When a waiting run is next looked at (its timer); null once it is final.
        "due_at": row["due_at"] if row["status"] not in FINAL_RUN else None,
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


async def get_run(request: web.Request) -> web.Response:
    project = require(request, "client").project
    run_id = parse_uuid(request.match_info["run_id"])
    row = await request.config_dict[WORKFLOWS_KEY].run(project, run_id) if run_id else None
    if row is None:
        raise not_found("Workflow run")
    await request.config_dict[WORKFLOW_ENGINE_KEY].digests.count_open_windows([row])
    return json_response(run_view(row), "workflow run")


async def list_runs(request: web.Request) -> web.Response:
    project = require(request, "client").project
    _, limit = paging(request)
    fields = Fields(dict(request.query))
    workflow_key = fields.string("workflow", required=False, max_len=100, pattern=CODE_RE, hint=KEY_HINT)
    user_id = fields.user_id("user_id", required=False)
    status = request.query.get("status")
    if status is not None and status not in RUN_STATUSES:
        fields.error("status", f"must be one of {', '.join(RUN_STATUSES)}")
    batch_id = None
    if "batch_id" in request.query:
        batch_id = parse_uuid(request.query["batch_id"])
        if batch_id is None:
            fields.error("batch_id", "must be a UUID (a topic trigger's batch_id)")
    fields.check()
    after = cursors.decode_cursor(request.query.get("after"), False)
    rows, has_next = await request.config_dict[WORKFLOWS_KEY].runs_page(
        project,
        workflow_key=workflow_key,
        user_id=user_id,
        status=status,
        batch_id=batch_id,
        limit=limit,
        after=after,
    )
    cursor = cursors.encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if has_next else None
    await request.config_dict[WORKFLOW_ENGINE_KEY].digests.count_open_windows(rows)
    return json_response(
        [run_view(r) for r in rows], "workflow runs", meta=cursor_meta(limit, None, has_next, cursor)
    )


# --- wiring ------------------------------------------------------------------------------------


async def _engine_loop(app: web.Application, stopping: asyncio.Event) -> None:
    interval = app[CONFIG_KEY].dispatch_interval
    await asyncio.gather(
        app[WORKFLOW_ENGINE_KEY].loop(stopping, interval), app[WORKFLOW_FANOUT_KEY].loop(stopping, interval)
    )


_running = background.loop("workflow-engine", _engine_loop)


async def engine(app: web.Application) -> AsyncIterator[None]:
    """The workflow store and engine, and the engine's loop (after the outbox's context, so that
    it stops first)."""
    store = WorkflowStore(app[DB_KEY])
    sender = StepSender(
        app[STORE_KEY], app[ACCEPT_BATCH_KEY], app[LOOKUPS_KEY], app[OUTBOX_KEY], app[METRICS_KEY]
    )
    app[WORKFLOWS_KEY] = store
    engine = app[WORKFLOW_ENGINE_KEY] = Engine(store, sender)
    app[WORKFLOW_FANOUT_KEY] = TopicFanout(
        FanoutStore(app[DB_KEY]), store, app[REDIS_KEY], app[USERS_KEY], engine.wake.set
    )
    async for _ in _running(app):
        yield


def add_routes(app: web.Application) -> None:
    r = app.router
    for path in ("/api/v1/workflows", "/api/v1/workflows/"):
        r.add_get(path, list_workflows)
    r.add_put("/api/v1/workflows/{key}", put_workflow)
    r.add_get("/api/v1/workflows/{key}", get_workflow)
    r.add_get("/api/v1/workflows/{key}/versions", list_versions)
    r.add_post("/api/v1/workflows/{key}/versions/{version}/activate", activate_version)
    r.add_post("/api/v1/workflows/{key}/trigger", trigger)
    r.add_post("/api/v1/workflows/{key}/cancel", cancel)
    r.add_get("/api/v1/workflows/{key}/batches/{batch_id}", get_fanout)
    for path in ("/api/v1/workflow-runs", "/api/v1/workflow-runs/"):
        r.add_get(path, list_runs)
    r.add_get("/api/v1/workflow-runs/{run_id}", get_run)
