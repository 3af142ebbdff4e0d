"""Every typed key of every application and request, in one place (aiohttp's `web.AppKey`).

A resource is opened by one cleanup context, stored under its key here, and read wherever it is
needed through `request.config_dict[...]` (sub-apps, such as the console, see their parent's
keys that way). A service holds one database, so one `DB_KEY` serves them all.

The types are imported for the type checker only: at run time this module imports nothing of the
project, so any module, floor or feature, can import it without a cycle, and the floor's runtime
imports (checked by `tests/test_layout.py`) stay clear of the features whose objects live here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jinja2
from aiohttp import web

if TYPE_CHECKING:
    import aiohttp
    import redis.asyncio as aioredis

    from common.broker.amqp import Broker
    from common.broker.outbox import Outbox
    from common.config import Config
    from common.data.api_keys import KeyRing
    from common.data.db import Database
    from common.data.store import StatusStore
    from common.features.bulk.fanout import Fanout
    from common.features.bulk.store import BatchStore
    from common.features.inbox.live import Live
    from common.features.inbox.store import InboxStore
    from common.features.webhooks.store import WebhookStore
    from common.features.workflows.engine import Engine
    from common.features.workflows.fanout import TopicFanout
    from common.features.workflows.store import WorkflowStore
    from common.group_commit import Batcher
    from common.lookups.cache import CachedLookups, ProfileCache
    from common.lookups.clients import ServiceClient
    from common.metrics import Metrics
    from common.rendering.renderer import RenderPool
    from common.web.admission import Admission
    from common.web.auth import Principal
    from common.web.http import Check
    from common.web.ratelimit import RateLimiter, Verdict, WrongKeys
    from console.session import Session

# Every service
CONFIG_KEY: web.AppKey[Config] = web.AppKey("config")
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics")
HEALTH_KEY: web.AppKey[dict[str, Check]] = web.AppKey("health_checks")
SERVICE_KEY: web.AppKey[str] = web.AppKey("service")

# Resources (common/resources.py, common/broker/)
DB_KEY: web.AppKey[Database] = web.AppKey("db")
STORE_KEY: web.AppKey[StatusStore] = web.AppKey("status_store")
BROKER_KEY: web.AppKey[Broker] = web.AppKey("broker")
OUTBOX_KEY: web.AppKey[Outbox] = web.AppKey("outbox")
HTTP_KEY: web.AppKey[aiohttp.ClientSession] = web.AppKey("http")
REDIS_KEY: web.AppKey[aioredis.Redis] = web.AppKey("redis")
RENDER_KEY: web.AppKey[RenderPool] = web.AppKey("render_pool")

# The gateway
USERS_KEY: web.AppKey[ServiceClient] = web.AppKey("user_service")
TEMPLATES_KEY: web.AppKey[ServiceClient] = web.AppKey("template_service")
# (key digest, project) of every client key
KEY_HASHES_KEY: web.AppKey[tuple[tuple[str, str], ...]] = web.AppKey("api_key_hashes")
# the keys created per project and stored hashed (scripts/keys.py)
KEY_RING_KEY: web.AppKey[KeyRing] = web.AppKey("key_ring")
LIMITER_KEY: web.AppKey[RateLimiter] = web.AppKey("rate_limiter")
# wrong API keys per client address (read by common.web.auth's middleware where it is set)
WRONG_KEYS_KEY: web.AppKey[WrongKeys] = web.AppKey("wrong_keys")
LOOKUPS_KEY: web.AppKey[CachedLookups] = web.AppKey("lookups")
ACCEPT_BATCH_KEY: web.AppKey[Batcher[Any, Any]] = web.AppKey("accept_batch")
# the bound on the accept requests in hand (load shedding, common/web/admission.py)
ADMISSION_KEY: web.AppKey[Admission] = web.AppKey("admission")
BATCHES_KEY: web.AppKey[BatchStore] = web.AppKey("batches")
FANOUT_KEY: web.AppKey[Fanout] = web.AppKey("fanout")
WEBHOOKS_KEY: web.AppKey[WebhookStore] = web.AppKey("webhooks")
WORKFLOWS_KEY: web.AppKey[WorkflowStore] = web.AppKey("workflows")
WORKFLOW_ENGINE_KEY: web.AppKey[Engine] = web.AppKey("workflow_engine")
WORKFLOW_FANOUT_KEY: web.AppKey[TopicFanout] = web.AppKey("workflow_fanout")
# the in-app inbox: its store, and this process's open event streams with their subscription
INBOX_KEY: web.AppKey[InboxStore] = web.AppKey("inbox")
INBOX_LIVE_KEY: web.AppKey[Live] = web.AppKey("inbox_live")
CONSOLE_TEMPLATES_KEY: web.AppKey[jinja2.Environment] = web.AppKey("console_templates")

# The user service
PROFILE_CACHE_KEY: web.AppKey[ProfileCache] = web.AppKey("profile_cache")
LOGIN_LIMITER_KEY: web.AppKey[RateLimiter] = web.AppKey("login_limiter")

# The workers
PUSH_PROVIDERS_KEY: web.AppKey[dict[str, Any]] = web.AppKey("push_providers")
EMAIL_ROUTES_KEY: web.AppKey[tuple[Any, ...]] = web.AppKey("email_routes")

# Per request
PRINCIPAL_KEY: web.RequestKey[Principal] = web.RequestKey("principal")
CONSOLE_SESSION_KEY: web.RequestKey[Session] = web.RequestKey("console_session")
VERDICT_KEY: web.RequestKey[Verdict] = web.RequestKey("rate_limit_verdict")
