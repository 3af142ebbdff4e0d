"""Email worker (:8003): consumes email.queue and sends each notification by email.

The consuming, retry and dead-letter logic is common/worker.py; this module is the delivery
step: look up the address, render the template, send through the configured provider.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from common import db, resources, templating
from common.clients import ServiceClient, ServiceUnavailable, TemplateCache
from common.config import Config, load_config
from common.http import CONFIG_KEY, base_app, run
from common.logs import setup_logging
from common.store import StatusStore
from common.worker import Deliver, Delivered, DeliveryError, Job, consumer
from providers.email import EmailProvider, HeaderInjection, OutgoingEmail, message_id
from providers.smtp import SmtpProvider

log = logging.getLogger("email_worker")

DB_KEY = web.AppKey("notifications_db", db.Database)
STORE_KEY = web.AppKey("status_store", StatusStore)
BROKER_KEY = web.AppKey("broker", resources.Broker)
HTTP_KEY = web.AppKey("http", aiohttp.ClientSession)
PROVIDER_KEY = web.AppKey("email_provider", EmailProvider)


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    app[STORE_KEY] = StatusStore(app[DB_KEY])
    yield


async def provider_ctx(app: web.Application) -> AsyncIterator[None]:
    provider = SmtpProvider(app[CONFIG_KEY])
    app[PROVIDER_KEY] = provider
    try:
        yield
    finally:
        await provider.close()


def make_deliver(app: web.Application) -> Deliver:
    config = app[CONFIG_KEY]
    session = app[HTTP_KEY]
    users = ServiceClient(session, config.user_service_url, config.internal_api_token, "user service")
    templates = TemplateCache(
        ServiceClient(session, config.template_service_url, config.internal_api_token, "template service")
    )
    provider = app[PROVIDER_KEY]

    async def deliver(job: Job) -> Delivered:
        body = job.body
        try:
            user = await users.get_user(str(body["user_id"]))
            if user.status == 404:
                raise DeliveryError("user no longer exists", transient=False)
            template = await templates.get(body["template_code"], body["language"], body["template_version"])
        except ServiceUnavailable as exc:
            raise DeliveryError(str(exc), transient=True) from exc
        if template.status != 200:
            raise DeliveryError(f"template: {template.message}", transient=False)
        if user.status != 200:
            raise DeliveryError(f"user service answered {user.status}", transient=True)
        try:
            parts = await templating.render("email", template.data, body.get("variables") or {})
        except templating.RenderError as exc:
            raise DeliveryError(f"template: {exc.message}", transient=False) from exc
        notification_id = str(job.notification_id)
        try:
            email = OutgoingEmail(
                to=user.data["email"],
                sender=config.email_from,
                subject=parts["subject"],
                html=parts["body"],
                text=parts["text_body"],
                message_id=message_id(notification_id, config.email_from),
                headers={
                    "X-Notification-ID": notification_id,
                    "X-Correlation-ID": str(body.get("correlation_id") or ""),
                },
            )
        except HeaderInjection as exc:
            raise DeliveryError(f"refused: {exc}", transient=False) from exc
        await provider.send(email)
        return Delivered(
            provider.name, template_version=template.data["version"], language=template.data["language"]
        )

    return deliver


def create_app(config: Config) -> web.Application:
    app = base_app("email_worker", config)
    app.cleanup_ctx.append(resources.database(DB_KEY, lambda c: c.notifications_db_url, "postgres"))
    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.append(resources.broker(BROKER_KEY, prefetch=config.worker_prefetch))
    app.cleanup_ctx.append(resources.http_client(HTTP_KEY))
    app.cleanup_ctx.append(provider_ctx)
    app.cleanup_ctx.append(consumer("email", STORE_KEY, BROKER_KEY, make_deliver))
    return app


def main() -> None:
    config = load_config("internal_api_token")
    setup_logging("email_worker", config.log_level, config.log_format)
    run(create_app(config), config, default_port=8003)


if __name__ == "__main__":
    main()
