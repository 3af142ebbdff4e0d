"""What the inbox tests share: a stack with an allowed origin, users with their own tokens,
messages delivered the way the inbox worker will (the store's `deliver`, then `announce`), and
a small Server-Sent Events reader."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from common.features.inbox.live import announce
from common.keys import INBOX_KEY, REDIS_KEY
from tests.conftest import API_KEY, Stack

ORIGIN = "https://app.example.com"
PROJECT = "default"  # the project of the bare test key


@pytest.fixture
async def inbox(stack_factory: Any) -> Stack:
    stack: Stack = await stack_factory(workers=False, inbox_allowed_origins=(ORIGIN,))
    return stack


async def new_user(stack: Stack) -> tuple[str, str]:
    """A user identified under an id of the test's own: (id, their access token)."""
    user_id = f"in-{uuid.uuid4().hex[:12]}"
    key = {"Authorization": f"Bearer {API_KEY}"}
    made = await stack.gateway.put(
        f"/api/v1/users/{user_id}", json={"name": "Ada", "email": f"{user_id}@example.com"}, headers=key
    )
    assert made.status == 201, await made.text()
    minted = await stack.gateway.post(f"/api/v1/users/{user_id}/token", headers=key)
    assert minted.status == 200, await minted.text()
    return user_id, (await minted.json())["data"]["access_token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def deliver(stack: Stack, user_id: str, title: str = "Hello", **fields: Any) -> dict[str, Any]:
    """A message in the user's inbox, announced: what the inbox worker will do."""
    app = stack.apps["gateway"]
    row, created = await app[INBOX_KEY].deliver(
        project=PROJECT,
        user_id=user_id,
        notification_id=fields.pop("notification_id", uuid.uuid4()),
        workflow_key=fields.pop("workflow_key", None),
        title=title,
        body=fields.pop("body", f"{title}, body"),
        link=fields.pop("link", "https://example.com/x"),
        image_url=fields.pop("image_url", None),
        data=fields.pop("data", {"k": 1}),
    )
    assert not fields
    if created:
        await announce(app[REDIS_KEY], PROJECT, user_id, row["event_seq"])
    return row


@dataclass
class Event:
    event: str | None = None
    id: str | None = None
    data: Any = None
    comments: list[str] = field(default_factory=list)
    retry: int | None = None


class Sse:
    """Reads a text/event-stream response event by event."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self, timeout: float = 5.0) -> Event:
        """The next event or comment block (up to its blank line)."""
        event = Event()
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            raw = await asyncio.wait_for(self.response.content.readline(), max(left, 0.01))
            if raw == b"":
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\n")
            if line == "":
                if lines:
                    break
                continue
            lines.append(line)
        data: list[str] = []
        for line in lines:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":
                event.comments.append(value)
            elif name == "data":
                data.append(value)
            elif name == "id":
                event.id = value
            elif name == "event":
                event.event = value
            elif name == "retry":
                event.retry = int(value)
        if data:
            event.data = orjson.loads("\n".join(data))
        return event

    async def next_event(self, timeout: float = 5.0) -> Event:
        """The next event with a name (comments and retry hints skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            event = await self.next(max(deadline - time.monotonic(), 0.01))
            if event.event is not None:
                return event
