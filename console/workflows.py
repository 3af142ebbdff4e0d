"""The console's workflow pages: the workflows, one workflow's versions and runs, and a run as a
timeline of its steps (due time, notification, why a step was skipped), with cancel.

They read the gateway's workflow store and ask its engine to cancel (`WORKFLOWS_KEY`,
`WORKFLOW_ENGINE_KEY`): the console's cancel is the API's, one run chosen instead of a
cancellation key.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from common.keys import CONSOLE_SESSION_KEY, WORKFLOW_ENGINE_KEY, WORKFLOWS_KEY
from common.vocabulary import ACTIVE_RUN, RUN_STATUSES
from common.web import cursors
from common.web.validation import CODE_RE
from console.pages import PAGE_SIZE, Refused, _project, _redirect, _uuid, _with_notice, render

log = logging.getLogger("console")


def _workflow_key(raw: str) -> str:
    if not CODE_RE.match(raw):
        raise Refused(404, "Workflow not found", f"{raw!r} is not a workflow key.")
    return raw


async def workflows(request: web.Request) -> web.Response:
    after = None
    if raw := request.query.get("after"):
        after = cursors.decode(raw)
        if after is None:
            raise Refused(400, "Bad page link", "This page link is damaged; start again from the first page.")
    rows, has_next = await request.config_dict[WORKFLOWS_KEY].page(_project(request), PAGE_SIZE, after)
    next_link = None
    if has_next:
        next_link = "/console/workflows?" + urlencode(
            {"after": cursors.encode(rows[-1]["created_at"], rows[-1]["key"])}
        )
    return render(request, "workflows.html", rows=rows, next_link=next_link, paged=after is not None)


async def workflow(request: web.Request) -> web.Response:
    key = _workflow_key(request.match_info["key"])
    project = _project(request)
    store = request.config_dict[WORKFLOWS_KEY]
    versions = await store.versions(project, key)
    if not versions:
        raise Refused(404, "Workflow not found", f"There is no workflow {key!r}.")
    status = request.query.get("status", "")
    if status and status not in RUN_STATUSES:
        raise Refused(
            400, "Unknown status", f"{status!r} is not a run status; use one of {', '.join(RUN_STATUSES)}."
        )
    after = None
    if raw := request.query.get("after"):
        after = cursors.decode_uuid(raw)
        if after is None:
            raise Refused(400, "Bad page link", "This page link is damaged; start again from the first page.")
    runs, has_next = await store.runs_page(
        project, workflow_key=key, user_id=None, status=status or None, limit=PAGE_SIZE, after=after
    )
    next_link = None
    if has_next:
        query = {"status": status, "after": cursors.encode_cursor(runs[-1]["created_at"], runs[-1]["id"])}
        next_link = f"/console/workflows/{key}?" + urlencode({k: v for k, v in query.items() if v})
    return render(
        request,
        "workflow.html",
        key=key,
        current=next((v for v in versions if v["current"]), versions[0]),
        versions=[
            {**v, "steps_json": orjson.dumps(v["definition"]["steps"], option=orjson.OPT_INDENT_2).decode()}
            for v in versions
        ],
        runs=runs,
        statuses=RUN_STATUSES,
        chosen_status=status,
        next_link=next_link,
        paged=after is not None,
    )


def _timeline(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Each step as the timeline shows it: the step's state, and whether the run is there now."""
    index = int(run["step_index"])
    return [
        {**state, "current": i == index and run["status"] in ACTIVE_RUN}
        for i, state in enumerate(run["steps"])
    ]


async def run(request: web.Request) -> web.Response:
    run_id = _uuid(request.match_info["run_id"], "Workflow run")
    found = await request.config_dict[WORKFLOWS_KEY].run(_project(request), run_id)
    if found is None:
        raise Refused(404, "Workflow run not found", f"There is no workflow run {run_id}.")
    await request.config_dict[WORKFLOW_ENGINE_KEY].digests.count_open_windows([found])
    return render(
        request,
        "workflow_run.html",
        run=found,
        active=found["status"] in ACTIVE_RUN,
        steps=_timeline(found),
        payload=orjson.dumps(found["payload"] or {}, option=orjson.OPT_INDENT_2).decode(),
    )


async def cancel_run(request: web.Request) -> web.Response:
    """Stop one run before its next step, and what it made that is not out yet, as the API's
    cancel by cancellation key does for many."""
    run_id = _uuid(request.match_info["run_id"], "Workflow run")
    subject = request[CONSOLE_SESSION_KEY].subject
    cancelled = await request.config_dict[WORKFLOW_ENGINE_KEY].cancel(
        _project(request), reason=f"cancelled in the console by key {subject}", run_id=run_id
    )
    path = f"/console/workflow-runs/{run_id}"
    if not cancelled:
        return _redirect(_with_notice(path, "run_not_cancelled"))
    log.info("console: workflow run %s cancelled by key %s", run_id, subject)
    return _redirect(_with_notice(path, "run_cancelled"))


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/workflows", workflows)
    r.add_get("/workflows/{key}", workflow)
    r.add_get("/workflow-runs/{run_id}", run)
    r.add_post("/workflow-runs/{run_id}/cancel", cancel_run)
