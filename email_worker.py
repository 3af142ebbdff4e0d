"""Email worker (:8003): consumes email.queue and sends each notification by email.

The consuming, retry and dead-letter logic is common/delivery/worker.py; this module is the delivery
step: look up the address, render the template, build the message (HTML and text, with its
ids and a signed one-click unsubscribe link), and send it through the providers in
EMAIL_PROVIDERS order. A transient failure or an open circuit moves on to the next provider;
only when every provider failed does the attempt go back to the retry queues, and when no
provider could even be tried (every circuit open) the message waits without using an attempt.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import ip_address

import aiohttp
from aiohttp import web

import topology
from common.config import Config, ConfigError, load_config
from common.delivery.interface import Delivered, DeliveryError, Job
from common.delivery.worker import Preparer, worker_app
from common.features.email_links import unsubscribe
from common.keys import CONFIG_KEY, EMAIL_ROUTES_KEY, HTTP_KEY, METRICS_KEY
from common.logs import project_var, setup_logging
from common.metrics import Metrics
from common.runner import run
from common.sending.preferences import origin_of
from providers.breaker import CircuitBreaker, State
from providers.email import EmailProvider, HeaderInjection, OutgoingEmail, UnsupportedByProvider, message_id
from providers.mailgun import MailgunProvider
from providers.sendgrid import SendGridProvider
from providers.smtp import SmtpProvider

log = logging.getLogger("email_worker")


@dataclass(frozen=True)
class Route:
    """One provider in the failover order, with its circuit breaker."""

    provider: EmailProvider
    breaker: CircuitBreaker


def check_settings(config: Config) -> None:
    """Settings that only make sense together; refused at start rather than at the first email."""
    problems = []
    if not config.unsubscribe_key:
        problems.append("UNSUBSCRIBE_SECRET (or JWT_SECRET) must be set: it signs unsubscribe links")
    if "sendgrid" in config.email_providers and not config.sendgrid_api_key:
        problems.append("SENDGRID_API_KEY must be set when EMAIL_PROVIDERS names sendgrid")
    if "mailgun" in config.email_providers and not (config.mailgun_api_key and config.mailgun_domain):
        problems.append("MAILGUN_API_KEY and MAILGUN_DOMAIN must be set when EMAIL_PROVIDERS names mailgun")
    if bool(config.smtp_username) != bool(config.smtp_password):
        problems.append("SMTP_USERNAME and SMTP_PASSWORD must be set together (or neither)")
    if problems:
        raise ConfigError("; ".join(problems))


def _is_loopback(host: str) -> bool:
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _provider(name: str, config: Config, session: aiohttp.ClientSession) -> EmailProvider:
    if name == "sendgrid":
        return SendGridProvider(config, session)
    if name == "mailgun":
        return MailgunProvider(config, session)
    return SmtpProvider(config)


async def providers_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    gauge = app[METRICS_KEY].circuit_state
    if config.smtp_username and config.smtp_tls == "none" and not _is_loopback(config.smtp_host):
        log.warning("SMTP_USERNAME is set with SMTP_TLS=none: the password crosses the network in clear")
    routes = tuple(
        Route(
            _provider(name, config, app[HTTP_KEY]),
            CircuitBreaker(name, config.circuit_failure_threshold, config.circuit_cooldown, gauge),
        )
        for name in config.email_providers
    )
    app[EMAIL_ROUTES_KEY] = routes
    log.info("email providers in failover order: %s", ", ".join(config.email_providers))
    try:
        yield
    finally:
        for route in routes:
            await route.provider.close()


async def send_with_failover(routes: tuple[Route, ...], email: OutgoingEmail, metrics: Metrics) -> Delivered:
    """Try each provider in order; the first that accepts the message delivered it."""
    skipped: list[str] = []  # open circuits: nothing was sent
    failures: list[DeliveryError] = []
    unsupported: list[DeliveryError] = []  # refused as beyond that provider only
    for route in routes:
        name = route.provider.name
        if not route.breaker.allow():
            if route.breaker.state is State.HALF_OPEN:
                skipped.append(f"{name}: circuit half-open, a probe is in flight")
            else:
                skipped.append(f"{name}: circuit open, next probe in {route.breaker.retry_in():.0f}s")
            continue
        try:
            await route.provider.send(email)
        except DeliveryError as exc:
            exc.provider = exc.provider or name
            metrics.provider_failures.labels(
                "email", name, "transient" if exc.transient else "permanent"
            ).inc()
            if not exc.transient or not exc.provider_fault:
                # The provider answered about this message or recipient (a bad address, a
                # greylisting 451): it is healthy, and another provider would hear the same
                # from the recipient's server. Retried or failed alone,
                # unless it is something only this provider cannot do (SMTPUTF8).
                route.breaker.success()
                if isinstance(exc, UnsupportedByProvider):
                    unsupported.append(exc)
                    log.info("%s cannot send this message, trying the next provider: %s", name, exc.reason)
                    continue
                raise
            route.breaker.failure()
            failures.append(exc)
            log.warning("%s failed, trying the next provider: %s", name, exc.reason)
            continue
        except BaseException:
            route.breaker.release()
            raise
        route.breaker.success()
        notes = [f.reason for f in failures] + skipped
        return Delivered(name, detail=f"delivered by {name} after: {'; '.join(notes)}" if notes else None)
    if unsupported and not failures and not skipped:
        raise DeliveryError(
            "; ".join(f.reason for f in unsupported), transient=False, provider=unsupported[-1].provider
        )
    failures += unsupported
    if not failures:
        # Nothing was tried: wait in the retry queue without using up an attempt.
        raise DeliveryError(
            "every email provider's circuit is open (" + "; ".join(skipped) + ")",
            transient=True,
            defer=True,
            retry_after=min(r.breaker.retry_in() for r in routes),
        )
    hints = [f.retry_after for f in failures if f.retry_after is not None]
    raise DeliveryError(
        "; ".join([f.reason for f in failures] + skipped),
        transient=True,
        provider=failures[-1].provider,
        retry_after=max(hints) if hints else None,
    )


class EmailDelivery:
    """The email worker's delivery step: prepare, build the message, send with failover."""

    def __init__(self, app: web.Application) -> None:
        self.config = app[CONFIG_KEY]
        self.metrics = app[METRICS_KEY]
        self.preparer = Preparer(app, "email")
        self.routes: tuple[Route, ...] = app[EMAIL_ROUTES_KEY]

    async def deliver(self, job: Job) -> Delivered:
        prepared = await self.preparer.prepare(job)
        try:
            email = self.build(job, prepared.user["email"], prepared.parts)
        except HeaderInjection as exc:
            raise DeliveryError(f"refused: {exc}", transient=False) from exc
        delivered = await send_with_failover(self.routes, email, self.metrics)
        delivered.template_version = prepared.template["version"]
        delivered.language = prepared.template["language"]
        return delivered

    def build(self, job: Job, to: str, parts: dict[str, str]) -> OutgoingEmail:
        config = self.config
        notification_id = str(job.notification_id)
        # A workflow's email turns off that workflow's category, not all email.
        origin = origin_of(job.record)
        category = origin.category if origin is not None else None
        token = unsubscribe.sign(
            config.unsubscribe_key, str(job.body["user_id"]), "email", project_var.get(), category
        )
        return OutgoingEmail(
            to=to,
            sender=config.email_from,
            subject=parts["subject"],
            html=parts["body"],
            text=parts["text_body"],
            message_id=message_id(notification_id, config.email_from),
            headers={
                "X-Notification-ID": notification_id,
                "X-Correlation-ID": str(job.body.get("correlation_id") or ""),
                # RFC 2369 and RFC 8058: mail clients show an unsubscribe button that POSTs
                # "List-Unsubscribe=One-Click" to this link, no login needed.
                "List-Unsubscribe": f"<{unsubscribe.link(config.public_base_url, token)}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
            tracking={"notification_id": notification_id},
        )


def create_app(config: Config) -> web.Application:
    check_settings(config)
    return worker_app(
        "email_worker",
        "email",
        config,
        declare=topology.declare,
        providers=providers_ctx,
        delivery=EmailDelivery,
    )


def main() -> None:
    config = load_config("internal_api_token", check=check_settings)
    setup_logging("email_worker", config.log_level, config.log_format)
    run(create_app(config), config, default_port=8003)


if __name__ == "__main__":
    main()
