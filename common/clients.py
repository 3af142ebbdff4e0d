"""Calls from one service to another's REST API, with the internal token and correlation id."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

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

    async def get_template(self, code: str, language: str | None = None, version: int | None = None) -> Reply:
        params = {"language": language, "version": version}
        query = "&".join(f"{k}={quote(str(v))}" for k, v in params.items() if v is not None)
        return await self.call("GET", f"/api/v1/templates/{quote(code)}" + (f"?{query}" if query else ""))


class TemplateCache:
    """Template versions fetched from the template service, kept in memory.

    Keyed by code, language and version: a version never changes once written, so an entry can
    never be stale, and an update (a new version) is a new key."""

    def __init__(self, client: ServiceClient, size: int = 1024) -> None:
        self.client = client
        self.size = size
        self._entries: OrderedDict[tuple[str, str, int], dict[str, Any]] = OrderedDict()

    async def get(self, code: str, language: str, version: int) -> Reply:
        key = (code, language, version)
        if (entry := self._entries.get(key)) is not None:
            self._entries.move_to_end(key)
            return Reply(200, {"data": entry})
        reply = await self.client.get_template(code, language, version)
        if reply.status == 200 and reply.data.get("language") == language:
            self._entries[key] = reply.data
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return reply
