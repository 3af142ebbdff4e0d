"""The inbox's live event stream (Server-Sent Events) against the real stack: across two gateway
processes, replay after a reconnect, tickets, bounds, heartbeats, the fallback poll."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

import gateway
from common.features.inbox import api as inbox_api
from common.features.inbox import live
from common.keys import INBOX_KEY, INBOX_LIVE_KEY
from tests.conftest import API_KEY, Stack, _serve
from tests.features.inbox.conftest import PROJECT, Sse, bearer, deliver, new_user

EVENTS = "/api/v1/inbox/events"


@contextlib.asynccontextmanager
async def _stream(base: str, headers: dict[str, str] | None = None, query: str = "") -> AsyncIterator[Sse]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base}{EVENTS}{query}", headers=headers or {}) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        yield Sse(response)


async def _status(base: str, headers: dict[str, str] | None = None, query: str = "") -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base}{EVENTS}{query}", headers=headers or {}) as r,
    ):
        return r.status, (await r.json() if r.content_type == "application/json" else None)


async def test_a_message_reaches_a_stream_on_another_gateway_at_once(
    inbox: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "POLL_INTERVAL", 60.0)  # only the pub/sub wake-up can be that quick
    other = await _serve(gateway.create_app(inbox.config))
    try:
        await asyncio.wait_for(other.app[INBOX_LIVE_KEY].subscribed.wait(), 5)
        user_id, token = await new_user(inbox)
        base = str(other.make_url("")).rstrip("/")
        async with _stream(base, bearer(token)) as sse:
            hint = await sse.next()
            assert hint.retry == inbox_api.RETRY_MS
            opened = await sse.next_event()
            assert opened.event == "counts" and opened.data == {"unread": 0, "unseen": 0, "total": 0}
            assert opened.id == "0"

            started = time.monotonic()
            message = await deliver(inbox, user_id, "Live")  # through the first gateway's store
            got = await sse.next_event(timeout=2)
            took = time.monotonic() - started
            assert got.event == "message" and got.data["id"] == str(message["id"]), got
            assert got.data["title"] == "Live" and got.id == str(message["event_seq"])
            assert took < 0.5, took
            counts = await sse.next_event(timeout=2)
            assert counts.event == "counts" and counts.data["unread"] == 1 and counts.id == got.id

            # Read in another tab (through the first gateway): an update, then the counts.
            read = await inbox.gateway.post(
                f"/api/v1/inbox/messages/{message['id']}/read", headers=bearer(token)
            )
            assert read.status == 200
            updated = await sse.next_event(timeout=2)
            assert updated.event == "message.updated" and updated.data["read_at"] is not None
            assert int(updated.id or 0) > int(got.id or 0)
            assert (await sse.next_event(timeout=2)).data == {"unread": 0, "unseen": 0, "total": 1}

            await deliver(inbox, user_id, "Second")
            assert (await sse.next_event(timeout=2)).event == "message"
            await sse.next_event(timeout=2)
            response = await inbox.gateway.post("/api/v1/inbox/seen-all", headers=bearer(token))
            assert response.status == 200
            everything = await sse.next_event(timeout=2)
            assert everything.event == "message.updated" and everything.data == {
                "all": True,
                "change": "seen",
            }
            assert (await sse.next_event(timeout=2)).data == {"unread": 1, "unseen": 0, "total": 2}

            # A gateway shutting down ends its streams rather than wait for them.
            closing = asyncio.create_task(other.close())
            with pytest.raises((EOFError, aiohttp.ClientPayloadError)):
                while True:
                    await sse.next(timeout=5)
            await asyncio.wait_for(closing, 10)
    finally:
        await other.close()


async def test_a_reconnect_with_last_event_id_replays_what_it_missed(inbox: Stack) -> None:
    user_id, token = await new_user(inbox)
    base = str(inbox.gateway.make_url("")).rstrip("/")
    first = await deliver(inbox, user_id, "Before")
    async with _stream(base, bearer(token)) as sse:
        opened = await sse.next_event()
        assert opened.event == "counts" and opened.id == str(first["event_seq"])  # no replay
    missed = [await deliver(inbox, user_id, f"Missed {i}") for i in range(2)]
    response = await inbox.gateway.post(
        f"/api/v1/inbox/messages/{first['id']}/archive", headers=bearer(token)
    )
    assert response.status == 200

    async with _stream(base, {**bearer(token), "Last-Event-ID": opened.id or ""}) as sse:
        got = [await sse.next_event() for _ in range(4)]
    assert [(e.event, e.data.get("title")) for e in got] == [
        ("message", "Missed 0"),
        ("message", "Missed 1"),
        ("message.updated", "Before"),
        ("counts", None),
    ]
    assert [e.id for e in got[:2]] == [str(m["event_seq"]) for m in missed]
    assert got[3].id == got[2].id and got[3].data == {"unread": 2, "unseen": 2, "total": 2}

    # The same by query (a new EventSource cannot set the header), from the middle.
    async with _stream(base, bearer(token), f"?last_event_id={got[0].id}") as sse:
        assert [(await sse.next_event()).event for _ in range(3)] == ["message", "message.updated", "counts"]
    # An id from elsewhere (beyond this user's last event) starts from the last one: later
    # events are not hidden behind it.
    async with _stream(base, bearer(token), "?last_event_id=999999999999") as sse:
        assert (await sse.next_event()).id == got[2].id
        late = await deliver(inbox, user_id, "Late")
        event = await sse.next_event()
        assert event.event == "message" and event.id == str(late["event_seq"])


async def test_more_missed_than_the_replay_bound_is_a_reset(
    inbox: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inbox_api, "MAX_REPLAY", 3)
    user_id, token = await new_user(inbox)
    base = str(inbox.gateway.make_url("")).rstrip("/")
    made = [await deliver(inbox, user_id, f"m{i}") for i in range(5)]
    async with _stream(base, bearer(token), f"?last_event_id={made[1]['event_seq']}") as sse:
        assert [(await sse.next_event()).event for _ in range(3)] == ["message"] * 3
    async with _stream(base, bearer(token), "?last_event_id=0") as sse:
        reset = await sse.next_event()
        assert reset.event == "reset" and reset.id == str(made[-1]["event_seq"])
        assert (await sse.next_event()).event == "counts"


async def test_a_ticket_opens_one_stream_once_within_its_ttl(
    inbox: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_id, token = await new_user(inbox)
    base = str(inbox.gateway.make_url("")).rstrip("/")
    response = await inbox.gateway.post("/api/v1/inbox/tickets", headers=bearer(token))
    assert response.status == 201, await response.text()
    data = (await response.json())["data"]
    assert data["expires_in"] == 60 and len(data["ticket"]) >= 40 and token not in data["ticket"]
    ticket = data["ticket"]
    # Only for the event stream: anywhere else a ticket is no credential.
    assert (await inbox.gateway.get(f"/api/v1/inbox/counts?ticket={ticket}")).status == 401
    assert (await inbox.gateway.post(f"{EVENTS}?ticket={ticket}")).status in (401, 405)
    async with _stream(base, query=f"?ticket={ticket}") as sse:
        assert (await sse.next_event()).event == "counts"
        await deliver(inbox, user_id, "By ticket")
        assert (await sse.next_event()).data["title"] == "By ticket"
    status, body = await _status(base, query=f"?ticket={ticket}")
    assert status == 401 and body["error"] == "invalid_ticket"
    assert (await _status(base, query="?ticket=made-up"))[0] == 401
    # A ticket with credentials too is refused (which would count?); nothing at all is a 401.
    fresh = (await (await inbox.gateway.post("/api/v1/inbox/tickets", headers=bearer(token))).json())["data"]
    assert (await _status(base, bearer(token), f"?ticket={fresh['ticket']}"))[0] == 400
    assert (await _status(base))[0] == 401

    # A client key gets a ticket for the user it names; the stream is that user's.
    response = await inbox.gateway.post(
        f"/api/v1/inbox/tickets?user_id={user_id}", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert response.status == 201
    async with _stream(base, query=f"?ticket={(await response.json())['data']['ticket']}") as sse:
        assert (await sse.next_event()).data["total"] == 1

    monkeypatch.setattr(inbox_api, "TICKET_TTL", 1)
    late = (await (await inbox.gateway.post("/api/v1/inbox/tickets", headers=bearer(token))).json())["data"]
    assert late["expires_in"] == 1
    await asyncio.sleep(1.6)
    assert (await _status(base, query=f"?ticket={late['ticket']}"))[0] == 401


async def test_streams_beyond_the_bound_are_429_and_idle_ones_get_heartbeats(
    inbox: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inbox_api, "HEARTBEAT", 0.2)
    user_id, token = await new_user(inbox)
    _, other_token = await new_user(inbox)
    base = str(inbox.gateway.make_url("")).rstrip("/")
    async with contextlib.AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(_stream(base, bearer(token)))
            for _ in range(live.MAX_STREAMS_PER_USER)
        ]
        status, body = await _status(base, bearer(token))
        assert status == 429 and body["error"] == "too_many_streams"
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base}{EVENTS}", headers=bearer(token)) as r,
        ):
            assert int(r.headers["Retry-After"]) > 0
        async with _stream(base, bearer(other_token)) as sse:  # another user's are counted apart
            assert (await sse.next_event()).event == "counts"
        pings = [await streams[0].next(timeout=2) for _ in range(3)]
        assert any("ping" in e.comments for e in pings), pings
    # Closed streams free their places (noticed by the next heartbeat at the latest).
    deadline = time.monotonic() + 5
    table = inbox.apps["gateway"][INBOX_LIVE_KEY]
    while table.streams.get((PROJECT, user_id)) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert not table.streams.get((PROJECT, user_id)) and table.count == 0


async def test_a_lost_announcement_is_found_by_the_poll(
    inbox: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "POLL_INTERVAL", 0.3)
    user_id, token = await new_user(inbox)
    base = str(inbox.gateway.make_url("")).rstrip("/")
    async with _stream(base, bearer(token)) as sse:
        await sse.next_event()
        row, _ = await inbox.apps["gateway"][INBOX_KEY].deliver(  # no announce
            project=PROJECT,
            user_id=user_id,
            notification_id=uuid.uuid4(),
            workflow_key=None,
            title="Quiet",
            body="b",
            link=None,
            image_url=None,
            data={},
        )
        event = await sse.next_event(timeout=3)
        assert event.event == "message" and event.id == str(row["event_seq"])
