"""The inbox API against the real stack: lists, counts, read state, who may see what, paging,
bad input, CORS, retention and erasure."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from common.data import retention
from common.keys import DB_KEY, INBOX_KEY
from tests.conftest import API_KEY, Stack
from tests.features.inbox.conftest import ORIGIN, PROJECT, bearer, deliver, new_user

KEY = {"Authorization": f"Bearer {API_KEY}"}


async def _get(stack: Stack, path: str, headers: dict[str, str]) -> tuple[int, dict]:
    response = await stack.gateway.get(path, headers=headers)
    return response.status, await response.json()


async def _post(stack: Stack, path: str, headers: dict[str, str]) -> tuple[int, dict]:
    response = await stack.gateway.post(path, headers=headers)
    return response.status, await response.json()


async def test_list_counts_read_archive_and_read_all(inbox: Stack) -> None:
    user_id, token = await new_user(inbox)
    me = bearer(token)
    first = await deliver(inbox, user_id, "First", workflow_key="welcome")
    second = await deliver(inbox, user_id, "Second")
    third = await deliver(inbox, user_id, "Third")

    status, body = await _get(inbox, "/api/v1/inbox/messages", me)
    assert status == 200, body
    assert [m["title"] for m in body["data"]] == ["Third", "Second", "First"]  # newest first
    shown = body["data"][2]
    assert shown == {
        "id": str(first["id"]),
        "notification_id": str(first["notification_id"]),
        "title": "First",
        "body": "First, body",
        "link": "https://example.com/x",
        "image_url": None,
        "data": {"k": 1},
        "workflow_key": "welcome",
        "created_at": shown["created_at"],
        "seen_at": None,
        "read_at": None,
        "archived_at": None,
    }
    assert body["meta"] == {"limit": 20, "next": None, "has_next": False}
    assert (await _get(inbox, "/api/v1/inbox/counts", me))[1]["data"] == {
        "unread": 3,
        "unseen": 3,
        "total": 3,
    }

    status, body = await _post(inbox, f"/api/v1/inbox/messages/{second['id']}/read", me)
    assert status == 200 and body["data"]["read_at"] and body["data"]["seen_at"], body
    assert (await _get(inbox, "/api/v1/inbox/counts", me))[1]["data"] == {
        "unread": 2,
        "unseen": 2,
        "total": 3,
    }
    status, body = await _get(inbox, "/api/v1/inbox/messages?status=unread", me)
    assert [m["title"] for m in body["data"]] == ["Third", "First"]
    status, body = await _get(inbox, "/api/v1/inbox/messages?status=read", me)
    assert [m["title"] for m in body["data"]] == ["Second"]
    status, body = await _post(inbox, f"/api/v1/inbox/messages/{second['id']}/unread", me)
    assert status == 200 and body["data"]["read_at"] is None and body["data"]["seen_at"]

    status, body = await _post(inbox, f"/api/v1/inbox/messages/{third['id']}/seen", me)
    assert status == 200 and body["data"]["seen_at"] and body["data"]["read_at"] is None
    status, body = await _post(inbox, f"/api/v1/inbox/messages/{first['id']}/archive", me)
    assert status == 200 and body["data"]["archived_at"]
    assert (await _get(inbox, "/api/v1/inbox/counts", me))[1]["data"] == {
        "unread": 2,
        "unseen": 0,
        "total": 2,
    }
    assert [m["title"] for m in (await _get(inbox, "/api/v1/inbox/messages", me))[1]["data"]] == [
        "Third",
        "Second",
    ]
    archived = (await _get(inbox, "/api/v1/inbox/messages?archived=true", me))[1]["data"]
    assert [m["title"] for m in archived] == ["First"]

    status, body = await _post(inbox, "/api/v1/inbox/read-all", me)
    assert status == 200 and body["data"] == {"unread": 0, "unseen": 0, "total": 2}, body
    status, body = await _post(inbox, f"/api/v1/inbox/messages/{first['id']}/unarchive", me)
    assert status == 200 and body["data"]["archived_at"] is None and body["data"]["read_at"]
    assert (await _get(inbox, "/api/v1/inbox/counts", me))[1]["data"] == {
        "unread": 0,
        "unseen": 0,
        "total": 3,
    }

    # Delivery is idempotent by the notification.
    again = await deliver(inbox, user_id, "First", notification_id=first["notification_id"])
    assert again["id"] == first["id"] and again["event_seq"] is None
    state = await inbox.apps["gateway"][INBOX_KEY].read_state([first["notification_id"], uuid.uuid4()])
    assert list(state) == [first["notification_id"]] and all(state[first["notification_id"]])


async def test_another_users_messages_are_not_found(inbox: Stack) -> None:
    owner, _ = await new_user(inbox)
    other, token = await new_user(inbox)
    theirs = await deliver(inbox, owner)
    for action in ("read", "unread", "seen", "archive", "unarchive"):
        status, body = await _post(inbox, f"/api/v1/inbox/messages/{theirs['id']}/{action}", bearer(token))
        assert status == 404 and body["error"] == "not_found", (action, body)
    for bad in (uuid.uuid4(), "not-a-uuid"):
        assert (await _post(inbox, f"/api/v1/inbox/messages/{bad}/read", bearer(token)))[0] == 404
    assert (await _get(inbox, "/api/v1/inbox/counts", bearer(token)))[1]["data"] == {
        "unread": 0,
        "unseen": 0,
        "total": 0,
    }
    assert (await _get(inbox, "/api/v1/inbox/messages", bearer(token)))[1]["data"] == []
    # A user's token is theirs only, even with ?user_id= of another.
    assert (await _get(inbox, f"/api/v1/inbox/messages?user_id={owner}", bearer(token)))[0] == 403
    assert (await _post(inbox, "/api/v1/inbox/read-all", bearer(token)))[1]["data"]["total"] == 0
    assert (await _get(inbox, f"/api/v1/inbox/messages?user_id={other}", bearer(token)))[0] == 200
    # Nor without credentials.
    assert (await inbox.gateway.get("/api/v1/inbox/counts")).status == 401


async def test_a_client_key_acts_for_the_user_it_names(inbox: Stack) -> None:
    user_id, _ = await new_user(inbox)
    message = await deliver(inbox, user_id)
    status, body = await _get(inbox, "/api/v1/inbox/messages", KEY)
    assert status == 400 and "user_id" in body["data"]["fields"], body
    assert (await _get(inbox, "/api/v1/inbox/counts?user_id=bad%20id", KEY))[0] == 400
    status, body = await _get(inbox, f"/api/v1/inbox/messages?user_id={user_id}", KEY)
    assert status == 200 and [m["id"] for m in body["data"]] == [str(message["id"])]
    status, body = await _post(inbox, f"/api/v1/inbox/messages/{message['id']}/read?user_id={user_id}", KEY)
    assert status == 200 and body["data"]["read_at"]
    status, body = await _post(
        inbox, f"/api/v1/inbox/messages/{message['id']}/read?user_id=someone-else", KEY
    )
    assert status == 404
    assert (await _get(inbox, f"/api/v1/inbox/counts?user_id={user_id}", KEY))[1]["data"]["unread"] == 0
    status, body = await _post(inbox, "/api/v1/inbox/tickets", KEY)
    assert status == 400


async def test_keyset_paging_returns_every_message_once(inbox: Stack) -> None:
    user_id, token = await new_user(inbox)
    made = [str((await deliver(inbox, user_id, f"m{i}"))["id"]) for i in range(23)]
    seen: list[str] = []
    path = "/api/v1/inbox/messages?limit=5"
    pages = 0
    while True:
        status, body = await _get(inbox, path, bearer(token))
        assert status == 200, body
        seen += [m["id"] for m in body["data"]]
        pages += 1
        if body["meta"]["next"] is None:
            assert body["meta"]["has_next"] is False
            break
        path = f"/api/v1/inbox/messages?limit=5&after={body['meta']['next']}"
        # A message arriving meanwhile goes on top, not into the pages still to come.
        if pages == 2:
            await deliver(inbox, user_id, "late")
    assert pages == 5 and seen == list(reversed(made))


async def test_bad_input_is_a_400_naming_the_field(inbox: Stack) -> None:
    _, token = await new_user(inbox)
    for query, name in (
        ("status=foo", "status"),
        ("limit=\u00b2", "limit"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("after=-1", "after"),
        ("after=1e3", "after"),
        ("archived=maybe", "archived"),
    ):
        status, body = await _get(inbox, f"/api/v1/inbox/messages?{query}", bearer(token))
        assert status == 400 and name in body["data"]["fields"], (query, body)
    status, body = await _get(inbox, "/api/v1/inbox/events?last_event_id=x", bearer(token))
    assert status == 400, body


async def test_cors_opens_the_inbox_to_the_allowed_origin_only(inbox: Stack) -> None:
    _, token = await new_user(inbox)
    asking = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    response = await inbox.gateway.options("/api/v1/inbox/messages", headers={"Origin": ORIGIN, **asking})
    assert response.status == 204, await response.text()
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert "Last-Event-ID" in response.headers["Access-Control-Allow-Headers"]
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert int(response.headers["Access-Control-Max-Age"]) > 0 and response.headers["Vary"] == "Origin"

    for origin in ("https://evil.example.com", ORIGIN + ".evil.com", "http://app.example.com"):
        response = await inbox.gateway.options("/api/v1/inbox/messages", headers={"Origin": origin, **asking})
        assert response.status == 403 and "Access-Control-Allow-Origin" not in response.headers, origin
        response = await inbox.gateway.get(
            "/api/v1/inbox/counts", headers={"Origin": origin, **bearer(token)}
        )
        assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers

    response = await inbox.gateway.get("/api/v1/inbox/counts", headers={"Origin": ORIGIN, **bearer(token)})
    assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == ORIGIN
    response = await inbox.gateway.get("/api/v1/inbox/counts", headers={"Origin": ORIGIN})
    assert response.status == 401 and response.headers["Access-Control-Allow-Origin"] == ORIGIN
    # Nothing outside the inbox is opened.
    response = await inbox.gateway.options("/api/v1/notifications/", headers={"Origin": ORIGIN, **asking})
    assert "Access-Control-Allow-Origin" not in response.headers
    response = await inbox.gateway.get("/api/v1/notifications/", headers={"Origin": ORIGIN, **KEY})
    assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers


async def test_retention_and_erasure_delete_the_inbox(inbox: Stack) -> None:
    database = inbox.apps["gateway"][DB_KEY]
    old_user, _ = await new_user(inbox)
    old = await deliver(inbox, old_user, "old")
    await database.execute(
        "UPDATE inbox_messages SET created_at = now() - interval '100 days' WHERE id = %s", old["id"]
    )
    await database.execute(
        "UPDATE inbox_events SET created_at = now() - interval '8 days' WHERE message_id = %s", old["id"]
    )
    young = await deliver(inbox, old_user, "young")
    await retention.purge_finished(database, 90, datetime.now(UTC))
    assert await database.fetchval("SELECT count(*) FROM inbox_messages WHERE id = %s", old["id"]) == 0
    assert await database.fetchval("SELECT count(*) FROM inbox_events WHERE message_id = %s", old["id"]) == 0
    assert await database.fetchval("SELECT count(*) FROM inbox_messages WHERE id = %s", young["id"]) == 1
    assert (
        await database.fetchval("SELECT count(*) FROM inbox_events WHERE message_id = %s", young["id"]) == 1
    )
    await retention.purge_finished(database, 90, datetime.now(UTC) + timedelta(days=8))
    assert (
        await database.fetchval("SELECT count(*) FROM inbox_events WHERE message_id = %s", young["id"]) == 0
    )

    user_id, _ = await new_user(inbox)
    await deliver(inbox, user_id)
    response = await inbox.gateway.delete(f"/api/v1/users/{user_id}", headers=KEY)
    assert response.status == 200, await response.text()
    for table in ("inbox_messages", "inbox_events"):
        count = await database.fetchval(
            f"SELECT count(*) FROM {table} WHERE project_id = %s AND user_id = %s", PROJECT, user_id
        )
        assert count == 0, table
