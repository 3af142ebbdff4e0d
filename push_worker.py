"""Push worker (:8004): consumes push.queue and delivers to every device the user has.

The consuming, retry and dead-letter logic is common/delivery/worker.py; this module is the delivery
step: look up the user's devices, render the push template, fan out to FCM, OneSignal and Web
Push, record a result per device, prune dead tokens, and retry only the devices that failed
transiently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

import topology
from common.config import Config, ConfigError, load_config
from common.data.store import Event
from common.delivery.egress import allow_list, guarded_session
from common.delivery.interface import Delivered, DeliveryError, Job
from common.delivery.worker import BATCH_WINDOW, Preparer, worker_app
from common.faults import hold
from common.group_commit import Batcher
from common.keys import CONFIG_KEY, HTTP_KEY, PUSH_PROVIDERS_KEY, STORE_KEY
from common.logs import setup_logging
from common.lookups.clients import ServiceUnavailable
from common.runner import run
from providers.fcm import FcmProvider, fcm_credentials_problem
from providers.onesignal import OneSignalProvider
from providers.push import Device, DeviceResult, PushMessage, PushProvider
from providers.webpush import WebPushProvider

log = logging.getLogger("push_worker")


def check_settings(config: Config) -> None:
    """Provider settings that only work together, refused at start rather than at the first
    push; each problem names its variables (never their values)."""
    problems = []
    if bool(config.vapid_private_key) != bool(config.vapid_subject):
        problems.append("VAPID_PRIVATE_KEY and VAPID_SUBJECT must be set together (or neither)")
    if bool(config.onesignal_app_id) != bool(config.onesignal_api_key):
        problems.append("ONESIGNAL_APP_ID and ONESIGNAL_API_KEY must be set together (or neither)")
    if config.fcm_credentials_file:
        problem = fcm_credentials_problem(config.fcm_credentials_file)
        if problem:
            problems.append(f"FCM_CREDENTIALS_FILE {problem}")
    if problems:
        raise ConfigError("; ".join(problems))


async def providers_ctx(app: web.Application) -> AsyncIterator[None]:
    """The providers this deployment has credentials for; a device on another platform fails."""
    config = app[CONFIG_KEY]
    session = app[HTTP_KEY]
    providers: dict[str, PushProvider] = {}
    if config.fcm_credentials_file:
        providers["fcm"] = FcmProvider(
            session, config.fcm_credentials_file, config.fcm_base_url, config.fcm_token_url
        )
    if config.onesignal_app_id and config.onesignal_api_key:
        providers["onesignal"] = OneSignalProvider(
            session, config.onesignal_app_id, config.onesignal_api_key, config.onesignal_base_url
        )
    # User-supplied endpoints get a session of their own, behind the SSRF guard.
    webpush_session = None
    if config.vapid_private_key and config.vapid_subject:
        allowed = allow_list(config.webpush_allowed_hosts)
        webpush_session = guarded_session(allowed, config.http_timeout)
        providers["webpush"] = WebPushProvider(
            webpush_session, config.vapid_private_key, config.vapid_subject, allowed
        )
    app[PUSH_PROVIDERS_KEY] = providers
    log.info("push providers: %s", ", ".join(providers) or "none configured")
    try:
        yield
    finally:
        if webpush_session is not None:
            await webpush_session.close()


@dataclass
class _Progress:
    """What earlier attempts achieved, carried in the message: devices finished, and whether
    any accepted it."""

    done: set[str]
    delivered: int

    @classmethod
    def of(cls, body: dict[str, Any]) -> _Progress:
        return cls(set(body.get("devices_done") or []), int(body.get("devices_delivered") or 0))

    def merge(self, outcomes: dict[str, str]) -> None:
        """What the history says earlier attempts finished: a retry the reconciler sent again
        from the stored row carries no progress in its message."""
        for device, outcome in outcomes.items():
            if outcome != "retry" and device not in self.done:
                self.done.add(device)
                self.delivered += outcome == "delivered"

    def carry(self) -> dict[str, Any]:
        return {"devices_done": sorted(self.done), "devices_delivered": self.delivered}


class PushDelivery:
    """The push worker's delivery step: prepare, fan out to the devices not done yet, record a
    result per device, prune dead ones, and decide from the results."""

    def __init__(self, app: web.Application) -> None:
        self.config: Config = app[CONFIG_KEY]
        self.store = app[STORE_KEY]
        self.preparer = Preparer(app, "push")
        self.providers: dict[str, PushProvider] = app[PUSH_PROVIDERS_KEY]
        # The device results of the messages in flight go into the history together.
        self.history: Batcher[list[Event], None] = Batcher(self._write_events, delay=BATCH_WINDOW)

    async def _write_events(self, batches: list[list[Event]]) -> list[None]:
        await self.store.events([event for batch in batches for event in batch])
        return [None] * len(batches)

    async def deliver(self, job: Job) -> Delivered:
        prepared = await self.preparer.prepare(job)
        parts, template = prepared.parts, prepared.template
        progress = _Progress.of(job.body)
        if job.attempt > 1:
            progress.merge(await self.store.device_outcomes(job.notification_id))
        devices = [
            Device(str(d["id"]), d["platform"], d["token"], d.get("subscription"))
            for d in prepared.user.get("devices", [])
            if str(d["id"]) not in progress.done
        ]
        if not devices and not progress.delivered:
            raise DeliveryError("the user has no push devices", transient=False)
        message = PushMessage(
            notification_id=str(job.notification_id),
            title=parts["title"],
            body=parts["body"],
            image_url=parts.get("image_url") or None,
            link=parts.get("link") or None,
            language=template["language"],
            ttl=self.config.push_ttl,
        )
        results = await _fan_out(self.providers, devices, message)
        await self.record(job, results, progress)
        return self.outcome(job, results, progress, template)

    async def record(self, job: Job, results: list[DeviceResult], progress: _Progress) -> None:
        """One history entry per device; dead devices removed; progress carried forward. The
        pushes went out: their results are held until written (an infrastructure error here
        must not make the attempt look failed, which would send them again)."""
        events = [
            Event(
                job.notification_id,
                result.outcome,
                attempt=job.attempt,
                provider=result.device.platform,
                device=result.device.id,
                detail=result.detail[:1000] or None,
            )
            for result in results
        ]
        await hold("recording the device results", lambda: self.history.submit(events))
        for result in results:
            if result.outcome == "removed":
                await self.remove_device(str(job.body["user_id"]), result.device)
            if result.outcome != "retry":
                progress.done.add(result.device.id)
            if result.outcome == "delivered":
                progress.delivered += 1

    def outcome(
        self, job: Job, results: list[DeviceResult], progress: _Progress, template: dict[str, Any]
    ) -> Delivered:
        """Delivered when any device has it (now or on an earlier attempt); retried while devices
        failed transiently and attempts remain; failed otherwise."""
        retry = [r for r in results if r.outcome == "retry"]
        if retry and job.attempt < self.config.max_attempts:
            waits = [r.retry_after for r in retry if r.retry_after is not None]
            raise DeliveryError(
                f"{len(retry)} device(s) to retry: " + "; ".join(r.detail for r in retry)[:800],
                transient=True,
                provider=",".join(sorted({r.device.platform for r in retry})),
                retry_after=max(waits) if waits else None,
                carry=progress.carry(),
            )
        summary = "; ".join(
            f"{r.device.platform}:{r.device.id[:8]} {r.outcome}"
            + (f" ({r.detail[:200]})" if r.detail else "")
            for r in results
            if r.outcome != "delivered"
        )
        if progress.delivered:
            delivered_by = sorted({r.device.platform for r in results if r.outcome == "delivered"})
            return Delivered(
                ",".join(delivered_by) or "push",
                template_version=template["version"],
                language=template["language"],
                detail=None if not retry else f"some devices failed: {summary}"[:1000],
            )
        raise DeliveryError(
            f"no device accepted it: {summary}"[:1000],
            transient=bool(retry),
            provider=",".join(sorted({r.device.platform for r in results})) or None,
        )

    async def remove_device(self, user_id: str, device: Device) -> None:
        try:
            reply = await self.preparer.users.call("DELETE", f"/api/v1/users/{user_id}/devices/{device.id}")
        except ServiceUnavailable as exc:
            log.warning("could not remove dead %s device %s: %s", device.platform, device.id, exc)
            return
        if reply.status in (200, 404):
            log.info("removed dead %s device %s", device.platform, device.id)


async def _fan_out(
    providers: dict[str, PushProvider], devices: list[Device], message: PushMessage
) -> list[DeviceResult]:
    by_platform: dict[str, list[Device]] = {}
    for device in devices:
        by_platform.setdefault(device.platform, []).append(device)
    results: list[DeviceResult] = []
    calls = []
    for platform, group in by_platform.items():
        provider = providers.get(platform)
        if provider is None:
            results.extend(DeviceResult(d, "failed", f"{platform} is not configured") for d in group)
        else:
            calls.append(provider.send(group, message))
    for batch in await asyncio.gather(*calls):
        results.extend(batch)
    return results


def create_app(config: Config) -> web.Application:
    return worker_app(
        "push_worker",
        "push",
        config,
        declare=topology.declare,
        providers=providers_ctx,
        delivery=PushDelivery,
    )


def main() -> None:
    config = load_config("internal_api_token", check=check_settings)
    setup_logging("push_worker", config.log_level, config.log_format)
    run(create_app(config), config, default_port=8004)


if __name__ == "__main__":
    main()
