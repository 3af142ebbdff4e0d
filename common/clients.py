"""Calls from one service to another's REST API, with the internal token and correlation id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from common.http import outgoing_headers


class ServiceUnavailable(Exception):
    """The other service did not answer usefully (connection error, timeout, 5xx)."""


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
        if status >= 500:
            raise ServiceUnavailable(f"{self.name} answered {status}")
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            raise ServiceUnavailable(f"{self.name} answered {status} with a body that is not JSON") from None
        return Reply(status, body if isinstance(body, dict) else {"data": body})

    async def get_user(self, user_id: str) -> Reply:
        return await self.call("GET", f"/api/v1/users/{user_id}")

    async def get_template(self, code: str, language: str | None = None) -> Reply:
        query = f"?language={language}" if language else ""
        return await self.call("GET", f"/api/v1/templates/{code}{query}")

    async def render(
        self, code: str, variables: dict[str, Any], language: str | None, version: int | None = None
    ) -> Reply:
        payload = {"variables": variables, "language": language, "version": version}
        return await self.call("POST", f"/api/v1/templates/{code}/render", payload)
