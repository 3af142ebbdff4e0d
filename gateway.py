"""Gateway (:8000): the one public entry point. It authenticates, counts the rate limit, and
hands each request to the feature that answers it (each a room of its own under
`common/features/`):

- one notification, `POST /api/v1/notifications/` and its reads, retry and cancel:
  `accept/api.py` (the acceptance decision itself is on the floor, `common/sending/decision.py`,
  shared with bulk sends and workflows); scheduled ones are released by `accept/dispatcher.py`;
- bulk sends, topics and their fan-out (`POST /api/v1/notifications/` with `topic`): `bulk/`;
- client status webhooks (endpoints, relay, signed delivery): `webhooks/`;
- workflows, their triggers and runs, and the engine that moves runs along: `workflows/`;
- provider bounce webhooks and one-click unsubscribe links: `email_links/`;
- the in-app inbox (messages, counts, read state, the live event stream, its CORS): `inbox/`;
- the console (`/console`), and the user and template APIs, proxied to their services.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

import console
import topology
from common import background, resources
from common.broker import amqp
from common.broker.outbox import outbox
from common.config import Config, load_config
from common.data import projects, retention
from common.data.api_keys import KeyRing
from common.features.accept import api as accept_api
from common.features.accept.dispatcher import dispatcher
from common.features.bulk import api as bulk_api
from common.features.bulk.fanout import fanout
from common.features.email_links import api as email_links_api
from common.features.erasure import api as erasure_api
from common.features.inbox import api as inbox_api
from common.features.inbox.live import live as inbox_live
from common.features.inbox.store import inbox_store
from common.features.webhooks import api as webhooks_api
from common.features.webhooks.delivery import webhooks
from common.features.workflows import api as workflows_api
from common.group_commit import Batcher
from common.keys import (
    ACCEPT_BATCH_KEY,
    ADMISSION_KEY,
    CONFIG_KEY,
    DB_KEY,
    HTTP_KEY,
    KEY_HASHES_KEY,
    KEY_RING_KEY,
    LIMITER_KEY,
    LOOKUPS_KEY,
    METRICS_KEY,
    OUTBOX_KEY,
    PRINCIPAL_KEY,
    REDIS_KEY,
    STORE_KEY,
    TEMPLATES_KEY,
    USERS_KEY,
    WRONG_KEYS_KEY,
)
from common.logs import CORRELATION_HEADER, setup_logging
from common.lookups.cache import CachedLookups
from common.lookups.clients import ServiceClient, outgoing_headers, services
from common.runner import serve
from common.web import admission, auth, openapi, ratelimit
from common.web.admission import Admission
from common.web.auth import require
from common.web.http import ApiError, base_app, read_json
from common.web.ratelimit import RateLimiter, WrongKeys

log = logging.getLogger("gateway")

ACCEPT_BATCH_SIZE = 64
ACCEPT_BATCH_DELAY = 0.001


# --- authentication ----------------------------------------------------------------------------


def _resolve(request: web.Request, presented: str) -> auth.Principal:
    digest = auth.key_id(presented)
    # Compare against every key so the time taken does not say which one nearly matched.
    project: str | None = None
    for known, owner in request.app[KEY_HASHES_KEY]:
        if hmac.compare_digest(known, digest):
            project = owner
    if project is None:
        project = request.app[KEY_RING_KEY].keys.get(digest)
    if project is not None:
        # A client key acts for its project: every resource it makes is the project's, and
        # several keys of one project share them.
        return auth.Principal("client", project, project)
    config = request.app[CONFIG_KEY]
    if auth.matches(config.internal_api_token, presented):
        return auth.Principal("internal", "internal", auth.project_header(request))
    user = auth.verify_access_token(config.jwt_secret, presented)
    if user is not None:
        return user
    raise auth.unauthorized()


# No API key here: login takes a password; provider webhooks and unsubscribe links cannot
# carry a key, and authenticate themselves (signature, shared secret, signed token). Clients'
# own webhook endpoints (/api/v1/webhooks/endpoints) do take a key.
_PUBLIC_PREFIXES = ("/api/v1/auth/login", *email_links_api.PUBLIC_PREFIXES)


# --- sending ----------------------------------------------------------------------------------


@admission.bounded
@ratelimit.counts_itself
async def post_notification(request: web.Request) -> web.Response:
    """`POST /api/v1/notifications/`: to a topic's subscribers (a batch and its fan-out), or to
    one user (which counts the rate limit with its lookups, in one Redis round trip)."""
    principal = require(request, "client")
    body = await read_json(request)
    if "topic" in body:
        await ratelimit.count(request, principal)
        return await bulk_api.notify_topic(request, principal.subject, body)
    return await accept_api.create_notification(request, principal, body)


# --- routing to the user and template services ----------------------------------------------


_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


def _proxy(key: web.AppKey[ServiceClient]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        principal: auth.Principal | None = request.get(PRINCIPAL_KEY)
        target = request.config_dict[key]
        if principal is not None and principal.kind == "user":
            if key is TEMPLATES_KEY:
                raise auth.forbidden()
            token = auth.presented_credential(request) or ""  # the service checks ownership
        else:
            token = target.token
        headers = outgoing_headers(token)
        if principal is not None:
            headers["X-Actor"] = f"{principal.kind}:{principal.subject}"  # recorded as created_by
        headers["X-Forwarded-For"] = request.remote or ""  # the user service throttles logins by it
        if request.content_type:
            headers["Content-Type"] = request.content_type
        try:
            async with target.session.request(
                request.method,
                target.base_url + request.rel_url.raw_path_qs,
                data=await request.read(),
                headers=headers,
                allow_redirects=False,
            ) as upstream:
                body = await upstream.read()
                out = {
                    k: v
                    for k, v in upstream.headers.items()
                    if k.lower() not in _HOP_HEADERS and k != CORRELATION_HEADER
                }
                return web.Response(body=body, status=upstream.status, headers=out)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ApiError(
                503,
                "service_unavailable",
                f"{target.name} is unavailable: {exc}.",
                headers={"Retry-After": "1"},
            ) from None

    return handler


# --- wiring --------------------------------------------------------------------------------


async def clients_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    clients = services(config, app[HTTP_KEY])
    app[USERS_KEY], app[TEMPLATES_KEY] = clients.users, clients.templates
    app[KEY_HASHES_KEY] = tuple((auth.key_id(key), project) for project, key in config.client_keys)
    app[LIMITER_KEY] = RateLimiter(app[REDIS_KEY], config.rate_limit, config.rate_limit_window)
    app[WRONG_KEYS_KEY] = WrongKeys(app[REDIS_KEY], config.wrong_key_limit, config.wrong_key_window)
    app[LOOKUPS_KEY] = CachedLookups(app[REDIS_KEY], clients.users, clients.templates)
    yield


async def projects_ctx(app: web.Application) -> AsyncIterator[None]:
    """Rows made before projects, under a key's id, move to that key's project (once per key);
    the keys stored per project (scripts/keys.py) are kept in memory, refreshed in the background."""
    owners = {digest[:16]: project for digest, project in app[KEY_HASHES_KEY]}
    await projects.adopt(app[DB_KEY], owners)
    ring = KeyRing(app[DB_KEY])
    await ring.refresh()
    app[KEY_RING_KEY] = ring
    stopping = asyncio.Event()
    task = asyncio.create_task(ring.run(stopping), name="key-ring")
    try:
        yield
    finally:
        await background.stop(task, stopping.set)


async def accept_batch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Group commit: the accepts of concurrent requests go into one INSERT."""
    batcher: Batcher[Any, Any] = Batcher(
        app[STORE_KEY].create_many, size=ACCEPT_BATCH_SIZE, delay=ACCEPT_BATCH_DELAY
    )
    app[ACCEPT_BATCH_KEY] = batcher
    try:
        yield
    finally:
        await batcher.close()


async def in_hand_ctx(app: web.Application) -> AsyncIterator[None]:
    """The work in hand, as gauges read when /metrics is scraped (no bookkeeping per request)."""
    gate, box, gauge = app[ADMISSION_KEY], app[OUTBOX_KEY], app[METRICS_KEY].in_hand
    gauge.labels("accepting").set_function(lambda: gate.in_flight)
    gauge.labels("waiting").set_function(lambda: gate.waiting)
    gauge.labels("outbox").set_function(lambda: box.backlog)
    app[METRICS_KEY].accept_limit.set_function(lambda: gate.limit)
    yield


def create_app(config: Config) -> web.Application:
    app = base_app("gateway", config)
    app[ADMISSION_KEY] = Admission(config.accept_concurrency, config.accept_queue, config.accept_time_budget)
    # First of the gateway's own: a shed request is answered before anything reads it.
    app.middlewares.append(admission.middleware)
    app.middlewares.append(inbox_api.cors)  # answers the inbox's preflights, which carry no key
    app.middlewares.append(auth.middleware(_resolve, _PUBLIC_PREFIXES, inbox_api.TICKET_PATHS))
    app.middlewares.append(ratelimit.middleware)
    app.cleanup_ctx.extend(
        [
            resources.database(lambda c: c.notifications_db_url, "postgres", maxsize=20),
            resources.status_store,
            retention.keep_up,
            amqp.broker(topology.declare),
            resources.http_client,
            resources.redis_client(),
            clients_ctx,
            projects_ctx,
            accept_batch_ctx,
            outbox,
            in_hand_ctx,
            dispatcher,
            workflows_api.engine,
            webhooks,
            fanout,
            inbox_store,
            inbox_live,
        ]
    )
    app.on_shutdown.append(inbox_api.end_streams)
    r = app.router
    for path in ("/api/v1/notifications", "/api/v1/notifications/"):
        r.add_post(path, post_notification)
    accept_api.add_routes(app)
    bulk_api.add_routes(app)
    webhooks_api.add_routes(app)
    email_links_api.add_routes(app)
    workflows_api.add_routes(app)
    inbox_api.add_routes(app)
    erasure_api.add_routes(app)  # before the proxy of /api/v1/users…
    openapi.add_routes(app)
    users = _proxy(USERS_KEY)
    templates = _proxy(TEMPLATES_KEY)
    r.add_route("*", "/api/v1/users{tail:(/.*)?}", users)
    r.add_post("/api/v1/auth/login", users)
    r.add_route("*", "/api/v1/templates{tail:(/.*)?}", templates)
    app.add_subapp("/console", console.create_app())
    return app


def main() -> None:
    config = load_config("gateway_api_keys", "internal_api_token", "jwt_secret")
    setup_logging("gateway", config.log_level, config.log_format)
    serve("gateway", lambda: create_app(config), config, 8000, processes=config.gateway_processes)


if __name__ == "__main__":
    main()
