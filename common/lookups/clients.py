"""Calls from one service to another's REST API, with the internal token and correlation id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from common.config import Config
from common.event_loop import stale_handle
from common.logs import CORRELATION_HEADER, PROJECT_HEADER, correlation_id_var, project_var

# The most users one batch lookup of the user service takes (`POST /api/v1/users/lookup`).
LOOKUP_LIMIT = 1000


class ServiceUnavailable(Exception):
    """The other service did not answer usefully (connection error, timeout, 5xx)."""


def outgoing_headers(token: str | None = None) -> dict[str, str]:
    """Headers for a call to another service: the correlation id, the project it acts for, and
    the internal token."""
    headers = {PROJECT_HEADER: project_var.get()}
    correlation_id = correlation_id_var.get()
    if correlation_id:
        headers[CORRELATION_HEADER] = correlation_id
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]

    @property
    def data(self) -> Any:
        return self.body.get("data")

    @property
    def message(self) -> str:
        return str(self.body.get("message") or "")


@dataclass(frozen=True)
class ServiceClient:
    session: aiohttp.ClientSession
    base_url: str
    token: str
    name: str

    async def call(self, method: str, path: str, payload: Any = None) -> Reply:
        try:
            async with self.session.request(
                method,
                self.base_url + path,
                data=orjson.dumps(payload) if payload is not None else None,
                headers={**outgoing_headers(self.token), "Content-Type": "application/json"},
            ) as response:
                raw = await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ServiceUnavailable(f"{self.name} unreachable: {type(exc).__name__} {exc}") from exc
        except RuntimeError as exc:
            if not stale_handle(exc):
                raise
            raise ServiceUnavailable(f"{self.name} unreachable: could not register a new socket") from exc
        if status >= 500:
            raise ServiceUnavailable(f"{self.name} answered {status}")
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            raise ServiceUnavailable(f"{self.name} answered {status} with a body that is not JSON") from None
        return Reply(status, body if isinstance(body, dict) else {"data": body})

    async def get_user(self, user_id: str) -> Reply:
        return await self.call("GET", f"/api/v1/users/{user_id}")

    async def lookup_users(self, user_ids: list[str]) -> list[dict[str, Any]]:
        """The profiles of many users at once (the user service's `POST /api/v1/users/lookup`,
        at most LOOKUP_LIMIT); ids that do not exist are left out."""
        reply = await self.call("POST", "/api/v1/users/lookup", {"ids": user_ids})
        if reply.status != 200 or not isinstance(reply.data, list):
            raise ServiceUnavailable(f"{self.name} refused a user lookup (HTTP {reply.status})")
        return list(reply.data)

    async def get_template(self, code: str, language: str | None = None, version: int | None = None) -> Reply:
        params = {"language": language, "version": version}
        query = "&".join(f"{k}={quote(str(v))}" for k, v in params.items() if v is not None)
        return await self.call("GET", f"/api/v1/templates/{quote(code)}" + (f"?{query}" if query else ""))

    async def turn_off(self, user_id: Any, channel: str, category: str | None = None) -> bool:
        """Turn a user's channel off (or, with `category`, that category of workflows' channel);
        False when the user no longer exists. Idempotent, so a provider retrying its webhook or a
        second click changes nothing."""
        change: dict[str, Any] = (
            {"categories": {category: {channel: False}}} if category else {channel: False}
        )
        reply = await self.call("PUT", f"/api/v1/users/{user_id}/preferences", change)
        if reply.status == 404:
            return False
        if reply.status != 200:
            raise ServiceUnavailable(f"{self.name} did not take the change (HTTP {reply.status})")
        return True


@dataclass(frozen=True)
class Services:
    users: ServiceClient
    templates: ServiceClient


def services(config: Config, session: aiohttp.ClientSession) -> Services:
    """The user and template service clients, as the gateway and the workers both call them."""
    return Services(
        ServiceClient(session, config.user_service_url, config.internal_api_token, "user service"),
        ServiceClient(session, config.template_service_url, config.internal_api_token, "template service"),
    )
