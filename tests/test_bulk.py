"""One request, many recipients: bulk sends, topics, and the topic fan-out (issue 18)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from common.broker import amqp
from common.data import db
from common.features.bulk import api as bulk_api
from common.keys import BATCHES_KEY, FANOUT_KEY
from common.lookups.cache import user_key
from tests.conftest import API_KEY, Stack
from tests.processes import ServiceProcess
from tests.smtp_sink import free_port

OTHER_KEY = "test-other-topics-key-9876543210"
THIRD_KEY = "test-third-topics-key-5555555555"


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def _post(stack: Stack, path: str, body: Any) -> tuple[int, dict[str, Any], Any]:
    response = await stack.gateway.post(path, json=body, headers=stack.headers())
    return response.status, await response.json(), response.headers


async def _get(stack: Stack, path: str) -> tuple[int, dict[str, Any]]:
    response = await stack.gateway.get(path, headers=stack.headers())
    return response.status, await response.json()


async def _batch(stack: Stack, batch_id: str) -> dict[str, Any]:
    status, answer = await _get(stack, f"/api/v1/batches/{batch_id}")
    assert status == 200, answer
    return answer["data"]


async def _wait_batch(
    stack: Stack, batch_id: str, want: dict[str, int], timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        batch = await _batch(stack, batch_id)
        if batch["by_status"] == want and batch["completed_at"] is not None:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch stayed {batch}, wanted {want}")
        await asyncio.sleep(0.1)


async def test_bulk_answers_each_recipient_and_delivers_once(stack: Stack) -> None:
    code = (await stack.create_template())["code"]  # needs name and link
    good = [await stack.create_user(name=f"U{i}") for i in range(3)]
    opted_out = await stack.create_user(preferences={"email": False, "push": True})
    no_name = await stack.create_user()
    unknown = str(uuid.uuid4())
    body = {
        "notification_type": "email",
        "template_code": code,
        "variables": {"link": "https://example.com/shared", "name": "Everyone"},
        "request_id": f"bulk-{uuid.uuid4()}",
        "recipients": [
            {"user_id": good[0]["id"], "variables": {"name": "Ada"}},
            {"user_id": good[1]["id"]},
            {"user_id": good[2]["id"], "variables": {"link": "https://example.com/own"}},
            {"user_id": good[0]["id"], "variables": {"name": "Twice"}},  # duplicate: the first counts
            {"user_id": opted_out["id"]},
            {"user_id": unknown},
        ],
    }
    status, answer, _ = await _post(stack, "/api/v1/notifications/bulk", body)
    assert status == 202, answer
    data = answer["data"]
    assert (data["total"], data["accepted"], data["skipped"]) == (5, 3, 1)
    assert [r["user_id"] for r in data["rejected"]] == [unknown]
    assert data["rejected"][0]["error"].startswith("user_not_found")
    batch = await _wait_batch(stack, data["batch_id"], {"delivered": 3, "skipped": 1})
    assert batch["total"] == 5 and batch["kind"] == "bulk"
    status, listed = await _get(stack, f"/api/v1/notifications/?batch_id={data['batch_id']}")
    assert status == 200 and sorted(n["user_id"] for n in listed["data"]) == sorted(
        [u["id"] for u in good] + [opted_out["id"]]
    )
    # Each says which batch it belongs to, in the list and alone.
    assert {n["batch_id"] for n in listed["data"]} == {data["batch_id"]}
    status, one = await _get(stack, f"/api/v1/notifications/{listed['data'][0]['notification_id']}")
    assert status == 200 and one["data"]["batch_id"] == data["batch_id"]
    [first] = stack.smtp.to(good[0]["email"])
    assert "Ada" in first["Subject"]
    [own] = stack.smtp.to(good[2]["email"])
    assert "https://example.com/own" in own.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert len(stack.smtp.to(good[1]["email"])) == 1
    assert stack.smtp.to(opted_out["email"]) == []

    # A replay: the same answer and batch, nothing sent again.
    status, again, headers = await _post(stack, "/api/v1/notifications/bulk", body)
    assert status == 202 and headers["Idempotent-Replayed"] == "true"
    assert again["data"] == data
    await asyncio.sleep(1.0)
    assert sum(len(stack.smtp.to(u["email"])) for u in good) == 3
    # The same request_id with another body: refused.
    changed = {**body, "recipients": [*body["recipients"], {"user_id": no_name["id"]}]}
    status, refused, _ = await _post(stack, "/api/v1/notifications/bulk", changed)
    assert status == 422 and refused["error"] == "idempotency_conflict"


async def test_bulk_rejects_a_missing_variable_one_by_one_and_over_the_limit_whole(stack: Stack) -> None:
    code = (await stack.create_template())["code"]
    named, unnamed = await stack.create_user(), await stack.create_user()
    body = {
        "notification_type": "email",
        "template_code": code,
        "variables": {"link": "l"},
        "request_id": f"bulk-{uuid.uuid4()}",
        "recipients": [{"user_id": named["id"], "variables": {"name": "N"}}, {"user_id": unnamed["id"]}],
    }
    status, answer, _ = await _post(stack, "/api/v1/notifications/bulk", body)
    assert status == 202, answer
    assert answer["data"]["accepted"] == 1
    [rejected] = answer["data"]["rejected"]
    assert rejected["user_id"] == unnamed["id"] and "name" in rejected["error"]

    too_many = {**body, "request_id": "big", "recipients": [{"user_id": str(uuid.uuid4())}] * 1001}
    status, answer, _ = await _post(stack, "/api/v1/notifications/bulk", too_many)
    assert status == 413 and "1000" in answer["message"]
    bad = {**body, "request_id": "bad", "recipients": [{"user_id": "not an id!"}]}
    status, answer, _ = await _post(stack, "/api/v1/notifications/bulk", bad)
    assert status == 400 and "recipients[0].user_id" in answer["data"]["fields"]


async def test_topic_crud_and_keyset_paging(stack: Stack) -> None:
    key = f"project-{uuid.uuid4().hex[:8]}"
    status, answer, _ = await _post(stack, "/api/v1/topics/x/subscribers", {"user_ids": [str(uuid.uuid4())]})
    assert status == 404
    response = await stack.gateway.put(
        f"/api/v1/topics/{key}", json={"name": "Followers"}, headers=stack.headers()
    )
    assert response.status == 201
    response = await stack.gateway.put(
        f"/api/v1/topics/{key}", json={"name": "Renamed"}, headers=stack.headers()
    )
    assert response.status == 200
    ids = sorted(str(u["id"]) for u in await _direct_users(stack, 25))
    status, answer, _ = await _post(stack, f"/api/v1/topics/{key}/subscribers", {"user_ids": ids[:20]})
    assert status == 200 and answer["data"]["added"] == 20
    status, answer, _ = await _post(stack, f"/api/v1/topics/{key}/subscribers", {"user_ids": ids})
    assert (answer["data"]["added"], answer["data"]["already_subscribed"]) == (5, 20)
    status, answer, _ = await _post(
        stack, f"/api/v1/topics/{key}/subscribers", {"user_ids": [str(uuid.uuid4())] * 1001}
    )
    assert status == 413
    response = await stack.gateway.delete(
        f"/api/v1/topics/{key}/subscribers/{ids[3]}", headers=stack.headers()
    )
    assert (await response.json())["data"]["removed"] is True
    status, topic = await _get(stack, f"/api/v1/topics/{key}")
    assert status == 200 and topic["data"]["name"] == "Renamed" and topic["data"]["subscribers"] == 24

    seen: list[str] = []
    after = ""
    while True:
        status, page = await _get(stack, f"/api/v1/topics/{key}/subscribers?limit=10{after}")
        assert status == 200
        seen.extend(r["user_id"] for r in page["data"])
        if not page["meta"]["has_next"]:
            break
        after = f"&after={page['meta']['next']}"
    assert seen == [u for u in ids if u != ids[3]]
    # Owned by the key: another client does not see it (the internal token is not a client).
    response = await stack.gateway.get(
        f"/api/v1/topics/{key}", headers={"Authorization": f"Bearer {stack.config.internal_api_token}"}
    )
    assert response.status in (403, 404)


async def _subscriber_ids(stack: Stack, key: str) -> list[str]:
    status, page = await _get(stack, f"/api/v1/topics/{key}/subscribers?limit=1000")
    assert status == 200, page
    return [r["user_id"] for r in page["data"]]


async def test_only_the_projects_users_can_be_subscribed(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False, gateway_api_keys=(API_KEY, f"other:{OTHER_KEY}"))
    key = await _topic_with(stack, [])
    mine = [str(u["id"]) for u in await _direct_users(stack, 3)]
    theirs = (await stack.create_user(key=OTHER_KEY))["id"]  # a user, of another project
    unknown = [str(uuid.uuid4()) for _ in range(24)]
    status, answer, _ = await _post(
        stack, f"/api/v1/topics/{key}/subscribers", {"user_ids": [*mine, theirs, *unknown]}
    )
    assert status == 422 and answer["error"] == "unknown_users", answer
    # Named (the first 20, in the order given), counted, and nothing subscribed, not even the known.
    assert answer["data"] == {"user_ids": [theirs, *unknown][:20], "count": 25}
    assert await _subscriber_ids(stack, key) == []
    status, answer, _ = await _post(stack, f"/api/v1/topics/{key}/subscribers", {"user_ids": mine})
    assert status == 200 and answer["data"]["added"] == 3
    assert sorted(await _subscriber_ids(stack, key)) == sorted(mine)


async def test_subscribing_while_the_user_service_is_away_is_a_503(stack_factory: Any) -> None:
    away = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    stack = await stack_factory(workers=False, gateway_config={"user_service_url": away})
    key = await _topic_with(stack, [])
    status, answer, headers = await _post(
        stack, f"/api/v1/topics/{key}/subscribers", {"user_ids": [str(uuid.uuid4())]}
    )
    assert status == 503 and answer["error"] == "service_unavailable", answer
    assert headers["Retry-After"] == "1"
    assert await _subscriber_ids(stack, key) == []


async def test_the_topic_caps_hold_under_concurrent_requests(stack_factory: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(bulk_api, "MAX_TOPICS_PER_PROJECT", 5)
    monkeypatch.setattr(bulk_api, "MAX_TOPIC_SUBSCRIBERS", 10)
    # Projects of their own: no topic of another test counts.
    project, third = f"caps{uuid.uuid4().hex[:8]}", f"caps{uuid.uuid4().hex[:8]}"
    stack = await stack_factory(
        workers=False, gateway_api_keys=(API_KEY, f"{project}:{OTHER_KEY}", f"{third}:{THIRD_KEY}")
    )
    auth = stack.headers(OTHER_KEY)

    async def put(key: str) -> tuple[int, dict[str, Any]]:
        response = await stack.gateway.put(f"/api/v1/topics/{key}", json={"name": key}, headers=auth)
        return response.status, await response.json()

    async def add(key: str, user_ids: list[str]) -> tuple[int, dict[str, Any]]:
        response = await stack.gateway.post(
            f"/api/v1/topics/{key}/subscribers", json={"user_ids": user_ids}, headers=auth
        )
        return response.status, await response.json()

    # 20 new topics at once: exactly 5 made, the others refused naming the limit.
    answers = await asyncio.gather(*(put(f"t{i:02d}") for i in range(20)))
    made = [i for i, (status, _) in enumerate(answers) if status == 201]
    refused = [answer for status, answer in answers if status == 409]
    assert len(made) == 5 and len(refused) == 15, [status for status, _ in answers]
    assert {a["error"] for a in refused} == {"too_many_topics"} and "at most 5 topics" in refused[0][
        "message"
    ]
    # Renaming one is not a new topic; another project's topics are counted apart.
    key = f"t{made[0]:02d}"
    assert (await put(key))[0] == 200
    response = await stack.gateway.put(
        "/api/v1/topics/t99", json={"name": "x"}, headers=stack.headers(THIRD_KEY)
    )
    assert response.status == 201
    notes = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        assert await notes.fetchval("SELECT count(*) FROM topics WHERE client_id = %s", project) == 5
    finally:
        await notes.close()

    # 14 users added one each, at once, to a topic that takes 10: exactly 10 subscribed.
    users = [str(u["id"]) for u in await _direct_users(stack, 14, project=project)]
    answers = await asyncio.gather(*(add(key, [u]) for u in users))
    assert sorted(status for status, _ in answers) == [200] * 10 + [409] * 4, answers
    refused = [answer for status, answer in answers if status == 409]
    assert {a["error"] for a in refused} == {"too_many_subscribers"}
    assert "at most 10 subscribers" in refused[0]["message"]
    response = await stack.gateway.get(f"/api/v1/topics/{key}", headers=auth)
    assert (await response.json())["data"]["subscribers"] == 10
    subscribed = {u for u, (status, _) in zip(users, answers, strict=True) if status == 200}
    left = [u for u in users if u not in subscribed]
    # One removed, two added: one too many, so neither is; one already there and one new: fine.
    gone = sorted(subscribed)[0]
    response = await stack.gateway.delete(f"/api/v1/topics/{key}/subscribers/{gone}", headers=auth)
    assert (await response.json())["data"]["removed"] is True
    status, answer = await add(key, left[:2])
    assert status == 409 and answer["error"] == "too_many_subscribers"
    response = await stack.gateway.get(f"/api/v1/topics/{key}", headers=auth)
    assert (await response.json())["data"]["subscribers"] == 9
    status, answer = await add(key, [sorted(subscribed)[1], left[0]])
    assert status == 200 and (answer["data"]["added"], answer["data"]["already_subscribed"]) == (1, 1)


async def _topic_with(stack: Stack, users: list[dict[str, Any]]) -> str:
    key = f"t-{uuid.uuid4().hex[:10]}"
    response = await stack.gateway.put(f"/api/v1/topics/{key}", json={"name": key}, headers=stack.headers())
    assert response.status == 201
    if not users:
        return key
    status, _, _ = await _post(
        stack, f"/api/v1/topics/{key}/subscribers", {"user_ids": [u["id"] for u in users]}
    )
    assert status == 200
    return key


async def test_topic_fanout_delivers_once_each_in_pages(stack: Stack) -> None:
    stack.gateway.app[FANOUT_KEY].page = 4  # several pages
    code = (await stack.create_template())["code"]
    users = [await stack.create_user() for _ in range(10)]
    users[4] = await stack.create_user(preferences={"email": False, "push": True})
    key = await _topic_with(stack, users)
    body = {
        "notification_type": "email",
        "topic": key,
        "template_code": code,
        "variables": {"name": "All", "link": "l"},
        "request_id": f"topic-{uuid.uuid4()}",
    }
    status, answer, _ = await stack.send(body)
    assert status == 202, answer
    assert answer["data"]["total"] == 10
    batch_id = answer["data"]["batch_id"]
    batch = await _wait_batch(stack, batch_id, {"delivered": 9, "skipped": 1})
    assert batch["fanned_out"] is True
    status, again, headers = await stack.send(body)
    assert (
        status == 202 and again["data"]["batch_id"] == batch_id and headers["Idempotent-Replayed"] == "true"
    )
    status, refused, _ = await stack.send({**body, "variables": {"name": "Other", "link": "l"}})
    assert status == 422 and refused["error"] == "idempotency_conflict"
    await asyncio.sleep(1.0)
    assert [len(stack.smtp.to(u["email"])) for u in users] == [1, 1, 1, 1, 0, 1, 1, 1, 1, 1]
    status, _, _ = await stack.send({**body, "request_id": "x", "topic": "no-such-topic"})
    assert status == 404


async def _fanout_messages(amqp_channel: Any, batch_id: str) -> int:
    """Takes every message off fanout.queue; how many were for `batch_id`."""
    queue = await amqp_channel.get_queue(amqp.work_queue(amqp.FANOUT))
    count = 0
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        count += orjson.loads(message.body)["batch_id"] == batch_id
    return count


async def test_a_replay_of_an_unfinished_fanout_publishes_no_second_message(
    stack_factory: Any, amqp_channel: Any
) -> None:
    stack = await stack_factory(workers=False)
    fanout = stack.gateway.app[FANOUT_KEY]
    await fanout.channel.close()  # nobody takes the fan-out: it stays unfinished, its message queued
    fanout.stalled_after = 1.0  # (the redrive loop keeps its own 60 s)
    code = (await stack.create_template())["code"]
    key = await _topic_with(stack, [await stack.create_user()])
    body = {
        "notification_type": "email",
        "topic": key,
        "template_code": code,
        "variables": {"name": "N", "link": "l"},
        "request_id": f"replayed-{uuid.uuid4()}",
    }
    status, answer, _ = await stack.send(body)
    assert status == 202, answer
    batch_id = answer["data"]["batch_id"]
    try:
        for _ in range(3):  # replays while the first message waits: none published
            status, again, headers = await stack.send(body)
            assert status == 202 and headers["Idempotent-Replayed"] == "true"
            assert again["data"]["batch_id"] == batch_id
        assert await _fanout_messages(amqp_channel, batch_id) == 1
        # Nothing has touched it for longer than the stall threshold (its message lost, say): a
        # replay publishes it again, once.
        await asyncio.sleep(1.5)
        await asyncio.gather(*(stack.send(body) for _ in range(3)))
        assert await _fanout_messages(amqp_channel, batch_id) == 1
    finally:  # left unfinished, a later test's redrive would fan it out
        notes = await db.connect(stack.config.notifications_db_url, maxsize=1)
        try:
            await notes.execute("UPDATE batches SET failed_at = now() WHERE id = %s", batch_id)
        finally:
            await notes.close()


async def _direct_users(
    stack: Stack, count: int, opted_out: int = 0, project: str = "default"
) -> list[dict[str, Any]]:
    """`count` users of `project` written in SQL (fast), the first `opted_out` of them off email."""
    tag = uuid.uuid4().hex[:8]
    users = await db.connect(stack.config.users_db_url, maxsize=1)
    try:
        return await users.fetch(
            "INSERT INTO users (project_id, name, email, password_hash, preferences)"
            " SELECT %s, 'Sub ' || i, 'sub-' || %s || '-' || i || '@example.com', 'x',"
            " jsonb_build_object('email', i > %s, 'push', true)"
            " FROM generate_series(1, %s) AS i ORDER BY i RETURNING id, email",
            project,
            tag,
            opted_out,
            count,
        )
    finally:
        await users.close()


async def _direct_subscribers(stack: Stack, key: str, count: int, project: str = "default") -> list[str]:
    """`count` users of `project` and their subscriptions to its topic `key`, written in SQL
    (fast); returns their emails."""
    rows = await _direct_users(stack, count, project=project)
    notes = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        client_id = await notes.fetchval(
            "SELECT client_id FROM topics WHERE key = %s AND client_id = %s", key, project
        )
        await notes.execute(
            "INSERT INTO topic_subscribers (client_id, topic_key, user_id) SELECT %s, %s, unnest(%s::uuid[])",
            client_id,
            key,
            [r["id"] for r in rows],
        )
    finally:
        await notes.close()
    return [r["email"] for r in rows]


async def test_a_large_topic_does_not_hold_up_another_projects_small_one(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False, gateway_api_keys=(API_KEY, f"other:{OTHER_KEY}"))
    fanout = stack.gateway.app[FANOUT_KEY]
    fanout.page = 50  # 60 pages for the large topic
    fanout.queue_bound = 10**6  # no worker: the queue only grows, and must not hold either up
    body = {"notification_type": "email", "variables": {"name": "N", "link": "l"}}
    large = await _topic_with(stack, [])
    await _direct_subscribers(stack, large, 3000)
    small = f"small-{uuid.uuid4().hex[:8]}"
    response = await stack.gateway.put(
        f"/api/v1/topics/{small}", json={"name": small}, headers=stack.headers(OTHER_KEY)
    )
    assert response.status == 201
    await _direct_subscribers(stack, small, 5, project="other")
    large_code = (await stack.create_template())["code"]
    small_code = (await stack.create_template(key=OTHER_KEY))["code"]
    notes = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        status, answer, _ = await stack.send(
            {**body, "topic": large, "template_code": large_code, "request_id": f"large-{uuid.uuid4()}"}
        )
        assert status == 202, answer
        large_id = answer["data"]["batch_id"]
        deadline = time.monotonic() + 30
        while not await notes.fetchval("SELECT count(*) FROM notifications WHERE batch_id = %s", large_id):
            assert time.monotonic() < deadline, "the large fan-out did not start"
            await asyncio.sleep(0.01)
        # Sent once the large one is under way, by another project.
        status, answer, _ = await stack.send(
            {**body, "topic": small, "template_code": small_code, "request_id": f"small-{uuid.uuid4()}"},
            Authorization=f"Bearer {OTHER_KEY}",
        )
        assert status == 202, answer
        small_id = answer["data"]["batch_id"]
        deadline = time.monotonic() + 120
        while True:
            rows = await notes.fetch(
                "SELECT id, fanned_out_at, (SELECT count(*) FROM notifications n WHERE n.batch_id = b.id)"
                " AS stored FROM batches b WHERE id = ANY(%s)",
                [uuid.UUID(large_id), uuid.UUID(small_id)],
            )
            done = {str(r["id"]): r for r in rows}
            if done[small_id]["fanned_out_at"] is not None and done[small_id]["stored"] == 5:
                # All of the small topic's accepted while the large one is still going.
                assert done[large_id]["fanned_out_at"] is None, done
                assert done[large_id]["stored"] < 3000, done
                break
            assert done[large_id]["fanned_out_at"] is None, f"the small one waited for the large one: {done}"
            assert time.monotonic() < deadline, done
            await asyncio.sleep(0.01)
        # And the large one goes on to the end, each subscriber once.
        deadline = time.monotonic() + 120
        while (await _batch(stack, large_id))["fanned_out"] is False:
            assert time.monotonic() < deadline, "the large fan-out did not finish"
            await asyncio.sleep(0.1)
        stored = await notes.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT user_id) AS users FROM notifications WHERE batch_id = %s",
            large_id,
        )
        assert stored == {"n": 3000, "users": 3000}
    finally:
        await notes.close()


async def test_duplicate_fanout_messages_send_each_subscriber_once(
    stack_factory: Any, amqp_channel: Any
) -> None:
    stack = await stack_factory(workers=False)
    fanout = stack.gateway.app[FANOUT_KEY]
    await fanout.consumer.stop(0)  # the test runs the pages itself
    fanout.page = 3
    key = await _topic_with(stack, [])
    emails = await _direct_subscribers(stack, key, 10)
    notes = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        # Two subscribers that are no users (any more): rejected by the fan-out, counted once.
        await notes.execute(
            "INSERT INTO topic_subscribers (client_id, topic_key, user_id)"
            " SELECT client_id, key, unnest(%s::text[]) FROM topics WHERE key = %s",
            [f"gone-{uuid.uuid4()}", f"gone-{uuid.uuid4()}"],
            key,
        )
        code = (await stack.create_template())["code"]
        status, answer, _ = await stack.send(
            {
                "notification_type": "email",
                "topic": key,
                "template_code": code,
                "variables": {"name": "N", "link": "l"},
                "request_id": f"dup-{uuid.uuid4()}",
            }
        )
        assert status == 202, answer
        batch_id = answer["data"]["batch_id"]
        # Four consumers on each page at once (a message, the redrive's and replays' duplicates,
        # on four gateways): one moves the cursor and publishes the rest, the others stop.
        for _ in range(10):
            await asyncio.gather(*(fanout.run(uuid.UUID(batch_id)) for _ in range(4)))
            if (batch := await _batch(stack, batch_id))["fanned_out"]:
                break
        assert batch["fanned_out"] and batch["rejected"] == 2, batch
        assert batch["by_status"] == {"pending": 10}, batch
        rows = await notes.fetch("SELECT user_id FROM notifications WHERE batch_id = %s", batch_id)
        assert len(rows) == len({r["user_id"] for r in rows}) == len(emails)
        # The first message, and one continuation per full page (12 subscribers, pages of 3).
        assert await _fanout_messages(amqp_channel, batch_id) == 1 + 4
    finally:
        await notes.close()


async def test_a_bulk_of_1000_with_unknown_opted_out_and_a_duplicate_delivers_once_each(stack: Stack) -> None:
    code = (await stack.create_template())["code"]
    users = await _direct_users(stack, 990, opted_out=10)
    recipients: list[dict[str, Any]] = [{"user_id": str(u["id"])} for u in users]
    recipients += [{"user_id": str(uuid.uuid4())} for _ in range(9)]
    recipients.append({"user_id": str(users[500]["id"]), "variables": {"name": "Again"}})
    assert len(recipients) == 1000
    body = {
        "notification_type": "email",
        "template_code": code,
        "variables": {"name": "N", "link": "l"},
        "request_id": f"thousand-{uuid.uuid4()}",
        "recipients": recipients,
    }
    status, answer, _ = await _post(stack, "/api/v1/notifications/bulk", body)
    assert status == 202, answer
    data = answer["data"]
    assert (data["total"], data["accepted"], data["skipped"], len(data["rejected"])) == (999, 980, 10, 9)
    await _wait_batch(stack, data["batch_id"], {"delivered": 980, "skipped": 10}, timeout=120)
    status, again, _ = await _post(stack, "/api/v1/notifications/bulk", body)
    assert status == 202 and again["data"] == data
    await asyncio.sleep(1.0)
    counts = Counter(m["To"] for m in stack.smtp.messages)
    assert [counts[u["email"]] for u in users] == [0] * 10 + [1] * 980


async def test_a_fanout_killed_half_way_resumes_and_sends_each_once(
    stack_factory: Any, tmp_path: Path
) -> None:
    stack = await stack_factory()
    code = (await stack.create_template())["code"]
    key = await _topic_with(stack, [])
    emails = await _direct_subscribers(stack, key, 5000)
    # The in-process gateway takes no fan-out: the doomed process must get it.
    await stack.gateway.app[FANOUT_KEY].channel.close()
    doomed = ServiceProcess("gateway.py", replace(stack.config), tmp_path / "g.log")
    survivor = ServiceProcess("gateway.py", replace(stack.config), tmp_path / "s.log")
    await doomed.start()
    notes = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        body = {
            "notification_type": "email",
            "topic": key,
            "template_code": code,
            "variables": {"name": "N", "link": "l"},
            "request_id": f"killed-{uuid.uuid4()}",
        }
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session,
            session.post(doomed.url + "/api/v1/notifications/", json=body) as response,
        ):
            assert response.status == 202, await response.text()
            batch_id = (await response.json())["data"]["batch_id"]
        deadline = time.monotonic() + 30
        while (
            await notes.fetchval("SELECT count(*) FROM notifications WHERE batch_id = %s", batch_id)
        ) < 1000:
            assert time.monotonic() < deadline, "the fan-out did not start"
            await asyncio.sleep(0.01)
        doomed.signal(signal.SIGKILL)
        await doomed.wait(10)
        at_kill = await notes.fetchrow("SELECT fanned_out_at FROM batches WHERE id = %s", batch_id)
        assert at_kill is not None and at_kill["fanned_out_at"] is None, "killed too late to show a resume"
        await survivor.start()  # its consumer gets the fan-out message back, and resumes
        batch = await _wait_batch(stack, batch_id, {"delivered": 5000}, timeout=180)
        assert batch["total"] == 5000
        await asyncio.sleep(1.0)
        counts = Counter(m["To"] for m in stack.smtp.messages)
        assert [counts[e] for e in emails] == [1] * 5000
    finally:
        doomed.stop()
        survivor.stop()
        await notes.close()


async def test_a_large_topic_fans_out_under_back_pressure_with_bounded_memory(
    stack_factory: Any, amqp_channel: Any
) -> None:
    stack = await stack_factory(workers=False)
    fanout = stack.gateway.app[FANOUT_KEY]
    fanout.queue_bound = 3000
    code = (await stack.create_template())["code"]
    key = await _topic_with(stack, [])
    count = int(os.environ.get("NOTIFY_TEST_TOPIC_SIZE", "10000"))  # 100000: the size
    await _direct_subscribers(stack, key, count)
    gc.collect()
    before = peak = _rss_mb()
    started = time.monotonic()
    status, answer, _ = await stack.send(
        {
            "notification_type": "email",
            "topic": key,
            "template_code": code,
            "variables": {"name": "N", "link": "l"},
            "request_id": f"large-{uuid.uuid4()}",
        }
    )
    assert status == 202 and answer["data"]["total"] == count
    batch_id = answer["data"]["batch_id"]
    queue = await amqp_channel.get_queue(amqp.work_queue("email"))

    # No worker: the fan-out fills the queue up to near the bound, then stops there and waits.
    # (amqp_channel is not robust: its passive declare counts now.)
    async def depth() -> int:
        declared = await amqp_channel.declare_queue(queue.name, passive=True)
        return int(declared.declaration_result.message_count or 0)

    filled = time.monotonic() + 30
    while await depth() < 3000 and time.monotonic() < filled:  # noqa: ASYNC110 - polling a broker
        await asyncio.sleep(0.2)
    await asyncio.sleep(2.0)  # time for it to go past the bound, if it would
    held = await _batch(stack, batch_id)
    assert held["fanned_out"] is False
    now = await depth()
    assert 3000 <= now <= 3000 + 2 * fanout.page, now
    # A consumer takes the messages: the fan-out goes on to the end, each recipient published.
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while True:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            seen.add(message.body.split(b'"notification_id":"', 1)[1][:36].decode())
            if len(seen) % 1000 == 0:
                peak = max(peak, _rss_mb())
            continue
        if (await _batch(stack, batch_id))["fanned_out"] and len(seen) >= count:
            break
        assert time.monotonic() < deadline, f"{len(seen)} of {count} published"
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    grown_mb = peak - before
    print(f"fan-out of {count}: {elapsed:.1f}s, resident set grew by at most {grown_mb:.0f} MB")
    assert len(seen) == count
    # The gateway, its fan-out and this test's own set of ids share the process: the fan-out
    # holds a page at a time, so the growth does not follow the topic's size.
    assert grown_mb < 60


async def test_the_user_lookup_is_internal_and_leaves_unknown_ids_out(stack: Stack) -> None:
    one, two = await stack.create_user(), await stack.create_user()
    login = await stack.gateway.post(
        "/api/v1/auth/login", json={"email": one["email"], "password": "correct horse battery"}
    )
    assert login.status == 200
    token = (await login.json())["data"]["access_token"]
    url = stack.urls["user_service"] + "/api/v1/users/lookup"
    unknown = str(uuid.uuid4())
    cache = aioredis.Redis.from_url(stack.config.redis_url)
    await cache.delete(user_key(one["id"]), user_key(two["id"]))
    async with aiohttp.ClientSession() as session:
        internal = {"Authorization": f"Bearer {stack.config.internal_api_token}"}
        async with session.post(url, json={"ids": [one["id"], two["id"], unknown]}, headers=internal) as r:
            assert r.status == 200
            found = (await r.json())["data"]
        async with session.post(
            url, json={"ids": [one["id"]]}, headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 403
        async with session.post(url, json={"ids": [unknown] * 1001}, headers=internal) as r:
            assert r.status == 400
    assert sorted(u["id"] for u in found) == sorted([one["id"], two["id"]])
    assert all("devices" in u and "password_hash" not in u for u in found)
    # Looked up together, cached as one read caches them: the workers find them in Redis.
    try:
        raw = await cache.mget([user_key(one["id"]), user_key(two["id"])])
        cached = [orjson.loads(r or b"null") for r in raw]
        assert await cache.exists(user_key(unknown)) == 0
    finally:
        await cache.aclose()
    assert cached == sorted(found, key=lambda u: u["id"] != one["id"])


async def test_a_single_request_id_cannot_take_a_bulk_recipients_key(stack: Stack) -> None:
    code = (await stack.create_template())["code"]
    user = await stack.create_user()
    request_id = f"shared-{uuid.uuid4()}"
    # A single notification whose request_id looks like "<request_id>:<user_id>" (a client's
    # own convention) is its own: a later bulk with that request_id still reaches the user.
    single = {
        "notification_type": "email",
        "user_id": user["id"],
        "template_code": code,
        "variables": {"name": "One", "link": "l"},
        "request_id": f"{request_id}:{user['id']}",
    }
    status, answer, _ = await stack.send(single)
    assert status == 202, answer
    alone = await stack.wait_for(answer["data"]["notification_id"], "delivered")
    assert alone["batch_id"] is None
    body = {
        "notification_type": "email",
        "template_code": code,
        "variables": {"name": "Many", "link": "l"},
        "request_id": request_id,
        "recipients": [{"user_id": user["id"]}],
    }
    status, answer, _ = await _post(stack, "/api/v1/notifications/bulk", body)
    assert status == 202, answer
    assert (answer["data"]["accepted"], answer["data"]["rejected"]) == (1, [])
    await _wait_batch(stack, answer["data"]["batch_id"], {"delivered": 1})
    assert sorted(m["Subject"] for m in stack.smtp.to(user["email"])) == ["Welcome, Many!", "Welcome, One!"]
    # The recipient's key uses a character no client request_id may hold.
    status, listed = await _get(stack, f"/api/v1/notifications/?batch_id={answer['data']['batch_id']}")
    key = listed["data"][0]["request_id"]
    status, refused, _ = await stack.send({**single, "request_id": key})
    assert status == 400 and "request_id" in refused["data"]["fields"], refused
    status, again, _ = await _post(stack, "/api/v1/notifications/bulk", body)
    assert status == 202 and again["data"] == answer["data"]


async def test_a_fanout_that_keeps_failing_is_given_up_with_its_reason(stack: Stack) -> None:
    fanout = stack.gateway.app[FANOUT_KEY]
    fanout.max_attempts, fanout.failure_pause = 3, 0.05
    key = await _topic_with(stack, [])
    await _direct_subscribers(stack, key, 3)
    notes = await db.connect(stack.config.notifications_db_url, maxsize=1)
    try:
        # A batch the fan-out cannot read (what a bug or a bad migration could leave behind):
        # a failure of the batch's own, not the infrastructure's, so no retry will mend it.
        batch_id = uuid.uuid4()
        await notes.execute(
            "INSERT INTO batches (id, client_id, request_id, body_hash, kind, topic_key, payload, total)"
            " SELECT %s, client_id, %s, 'x', 'topic', key, '{}', 3 FROM topics WHERE key = %s",
            batch_id,
            f"broken-{uuid.uuid4()}",
            key,
        )
        await fanout.publish(batch_id)
        deadline = time.monotonic() + 30
        while (batch := await _batch(stack, str(batch_id)))["failed_at"] is None:
            assert time.monotonic() < deadline, f"never given up: {batch}"
            await asyncio.sleep(0.1)
        assert "KeyError" in batch["error"] and "notification_type" in batch["error"], batch
        assert batch["fanned_out"] is False and batch["by_status"] == {}
        # Given up for good: no further tries, nothing sent, and the redrive leaves it alone.
        await asyncio.sleep(1.0)
        assert await notes.fetchval("SELECT fanout_attempts FROM batches WHERE id = %s", batch_id) == 3
        assert batch_id not in await stack.gateway.app[BATCHES_KEY].stalled_fanouts(0)
    finally:
        await notes.close()
