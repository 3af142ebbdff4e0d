"""Send later, respect the night: send_at, send_at_local, quiet hours, cancel, the dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aio_pika
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook

import email_worker
import gateway
from common import keys
from common.broker.amqp import work_queue
from common.keys import METRICS_KEY
from tests.conftest import Stack
from tests.processes import ServiceProcess
from tests.test_webhooks import Receiver, receiver  # noqa: F401 - the receiver fixture
from tests.test_webhooks import _endpoint as webhook_endpoint
from tests.test_webhooks import _stack as webhook_stack

PASSWORD = "correct horse battery"


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value)


def request(user: dict[str, Any], code: str, **extra: Any) -> dict[str, Any]:
    return {
        "notification_type": "email",
        "user_id": user["id"],
        "template_code": code,
        "variables": {"name": "Ada", "link": "https://example.com"},
        "request_id": str(uuid.uuid4()),
        **extra,
    }


async def cancel(stack: Stack, notification_id: Any) -> tuple[int, dict[str, Any]]:
    path = f"/api/v1/notifications/{notification_id}/cancel"
    response = await stack.gateway.post(path, headers=stack.headers())
    return response.status, await response.json()


async def sleep_until(moment: datetime) -> None:
    await asyncio.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()))


async def held_until(stack: Stack, moment: datetime, *pairs: tuple[str, str]) -> None:
    """Each (notification_id, email) stays scheduled and unsent until just before `moment`."""
    while datetime.now(UTC) < moment - timedelta(milliseconds=300):
        for notification_id, email in pairs:
            record = await stack.notification(notification_id)
            assert record["status"] == "scheduled", record
            assert stack.smtp.notification_ids(email) == []
        await asyncio.sleep(0.2)


def delivered_in_time(record: dict[str, Any], due: datetime) -> None:
    delivered = parse(record["delivered_at"])
    assert due <= delivered <= due + timedelta(seconds=2), (due, delivered)


async def test_send_at_waits_then_delivers_within_two_seconds(stack: Stack) -> None:
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    due = (datetime.now(UTC) + timedelta(seconds=5)).replace(microsecond=0)
    # Any offset will do; the answer is in UTC.
    send_at = due.astimezone(timezone(timedelta(hours=2))).isoformat()
    status, body, _ = await stack.send(request(user, code, send_at=send_at))
    assert status == 202, body
    assert body["data"]["status"] == "scheduled" and parse(body["data"]["send_at"]) == due
    assert body["data"]["send_at"].endswith("+00:00")
    notification_id = str(body["data"]["notification_id"])

    await held_until(stack, due, (notification_id, user["email"]))
    record = await stack.wait_for(notification_id, "delivered", timeout=10)
    delivered_in_time(record, due)
    assert [h["status"] for h in record["history"]] == ["scheduled", "pending", "sending", "delivered"]
    assert "send_at" in record["history"][0]["detail"]
    assert stack.smtp.notification_ids(user["email"]) == [notification_id]

    metrics = await (await stack.gateway.get("/metrics")).text()
    assert 'notify_dispatch_lag_seconds_count{channel="email"}' in metrics
    assert 'notify_scheduled_notifications{channel="email"}' in metrics


async def test_send_at_local_and_quiet_hours_in_the_users_time_zone(stack: Stack) -> None:
    # Both are minutes on a wall clock: the next minute boundary is "a minute away".
    now = datetime.now(UTC)
    boundary = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
    if boundary - now < timedelta(seconds=4):
        boundary += timedelta(minutes=1)
    code = (await stack.create_template())["code"]

    # Kathmandu is UTC+05:45: a window computed in UTC, or in whole hours, would not end there.
    kathmandu = ZoneInfo("Asia/Kathmandu")
    sleeper = await stack.create_user(timezone="Asia/Kathmandu")
    quiet = {
        "start": f"{(boundary - timedelta(hours=3)).astimezone(kathmandu):%H:%M}",
        "end": f"{boundary.astimezone(kathmandu):%H:%M}",
    }
    response = await stack.gateway.put(
        f"/api/v1/users/{sleeper['id']}/preferences", json={"quiet_hours": quiet}, headers=stack.headers()
    )
    assert response.status == 200, await response.text()
    # St John's is UTC-03:30 (-02:30 in summer).
    st_johns = ZoneInfo("America/St_Johns")
    planner = await stack.create_user(timezone="America/St_Johns")

    status, held, _ = await stack.send(request(sleeper, code))
    assert status == 202 and held["data"]["status"] == "scheduled", held
    assert parse(held["data"]["send_at"]) == boundary
    status, urgent, _ = await stack.send(request(sleeper, code, priority=9))
    assert status == 202 and urgent["data"]["status"] == "pending", urgent
    local = f"{boundary.astimezone(st_johns):%H:%M}"
    status, timed, _ = await stack.send(request(planner, code, send_at_local=local))
    assert status == 202 and timed["data"]["status"] == "scheduled", timed
    assert parse(timed["data"]["send_at"]) == boundary

    urgent_record = await stack.wait_for(str(urgent["data"]["notification_id"]), "delivered")
    assert parse(urgent_record["delivered_at"]) < boundary  # at once, quiet hours or not
    held_id, timed_id = str(held["data"]["notification_id"]), str(timed["data"]["notification_id"])
    record = await stack.notification(held_id)
    assert "quiet hours" in record["history"][0]["detail"]
    assert "Asia/Kathmandu" in record["history"][0]["detail"]

    await held_until(stack, boundary, (timed_id, planner["email"]))
    assert (await stack.notification(held_id))["status"] == "scheduled"
    assert stack.smtp.notification_ids(sleeper["email"]) == [str(urgent["data"]["notification_id"])]
    for notification_id in (held_id, timed_id):
        delivered_in_time(await stack.wait_for(notification_id, "delivered", timeout=10), boundary)
    assert stack.smtp.notification_ids(planner["email"]) == [timed_id]


async def test_cancel_before_send_at_and_409_once_delivered(stack: Stack) -> None:
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    due = datetime.now(UTC) + timedelta(seconds=2)
    status, body, _ = await stack.send(request(user, code, send_at=due.isoformat()))
    assert status == 202, body
    notification_id = str(body["data"]["notification_id"])

    status, cancelled = await cancel(stack, notification_id)
    assert status == 200 and cancelled["data"]["status"] == "cancelled", cancelled
    status, again = await cancel(stack, notification_id)
    assert status == 200 and again["data"]["status"] == "cancelled"  # idempotent

    await sleep_until(due + timedelta(seconds=1.5))
    record = await stack.notification(notification_id)
    assert record["status"] == "cancelled"
    assert [h["status"] for h in record["history"]] == ["scheduled", "cancelled"]
    assert stack.smtp.notification_ids(user["email"]) == []
    listed = await stack.gateway.get(
        f"/api/v1/notifications/?user_id={user['id']}&status=cancelled", headers=stack.headers()
    )
    assert [n["notification_id"] for n in (await listed.json())["data"]] == [notification_id]

    status, body, _ = await stack.send(request(user, code))
    sent_id = str(body["data"]["notification_id"])
    await stack.wait_for(sent_id, "delivered")
    status, refused = await cancel(stack, sent_id)
    assert status == 409 and refused["error"] == "not_cancellable", refused
    assert "already delivered" in refused["message"]
    assert (await cancel(stack, uuid.uuid4()))[0] == 404


async def test_a_pending_notification_cancelled_before_a_worker_claims_it_is_not_sent(
    stack_factory: Any, amqp_channel: aio_pika.abc.AbstractChannel
) -> None:
    stack = await stack_factory(workers=False)
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    status, body, _ = await stack.send(request(user, code))
    assert status == 202 and body["data"]["status"] == "pending"
    notification_id = str(body["data"]["notification_id"])
    status, cancelled = await cancel(stack, notification_id)
    assert status == 200 and cancelled["data"]["status"] == "cancelled"

    # Its message is in the queue: the worker that takes it must not send it.
    queue = await amqp_channel.declare_queue(work_queue("email"), passive=True)
    assert queue.declaration_result.message_count == 1
    worker = TestServer(email_worker.create_app(stack.config), host="127.0.0.1")
    await worker.start_server()
    try:
        registry = worker.app[METRICS_KEY].registry
        deadline = time.monotonic() + 10
        while True:
            queue = await amqp_channel.declare_queue(work_queue("email"), passive=True)
            busy = registry.get_sample_value("notify_worker_in_flight", {"channel": "email"}) or 0
            if queue.declaration_result.message_count == 0 and busy == 0:
                break
            assert time.monotonic() < deadline, "the worker did not take the message"
            await asyncio.sleep(0.05)
        record = await stack.notification(notification_id)
        assert record["status"] == "cancelled" and record["attempts"] == 0
        assert [h["status"] for h in record["history"]] == ["pending", "cancelled"]
        assert stack.smtp.notification_ids(user["email"]) == []
    finally:
        await worker.close()


async def test_send_at_validation(stack: Stack) -> None:
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    now = datetime.now(UTC)
    cases = [
        ({"send_at": (now + timedelta(hours=1)).isoformat(), "send_at_local": "09:00"}, "send_at_local"),
        ({"send_at": (now + timedelta(days=366)).isoformat()}, "send_at"),
        ({"send_at": "2030-01-31T09:00:00"}, "send_at"),  # no offset
        ({"send_at": "2030-01-31"}, "send_at"),
        ({"send_at": "tomorrow"}, "send_at"),
        ({"send_at": "0001-01-01T00:00:00+05:00"}, "send_at"),  # before the first instant there is
        ({"send_at": "2030-01-31T24:00:00Z"}, "send_at"),
        ({"send_at_local": "24:00"}, "send_at_local"),
        ({"send_at_local": "9:00"}, "send_at_local"),
    ]
    for extra, field in cases:
        status, body, _ = await stack.send(request(user, code, **extra))
        assert status == 400 and field in body["data"]["fields"], (extra, body)
    # In the past means now; 365 days ahead is allowed.
    status, body, _ = await stack.send(request(user, code, send_at=(now - timedelta(hours=1)).isoformat()))
    assert status == 202 and body["data"]["status"] == "pending" and body["data"]["send_at"] is None
    await stack.wait_for(str(body["data"]["notification_id"]), "delivered")
    far = request(user, code, send_at=(now + timedelta(days=364)).isoformat().replace("+00:00", "Z"))
    status, body, _ = await stack.send(far)
    assert status == 202 and body["data"]["status"] == "scheduled"
    # A replay answers as it did: scheduled, the same send_at; another send_at is another body.
    again_status, again, headers = await stack.send(far)
    assert again_status == 202 and headers["Idempotent-Replayed"] == "true"
    assert again["data"]["send_at"] == body["data"]["send_at"] and again["data"]["status"] == "scheduled"
    status, conflict, _ = await stack.send({**far, "send_at": (now + timedelta(days=2)).isoformat()})
    assert status == 422 and conflict["error"] == "idempotency_conflict"
    assert (await cancel(stack, body["data"]["notification_id"]))[0] == 200


async def test_quiet_hours_preference_self_service_and_validation(stack: Stack) -> None:
    user = await stack.create_user(timezone="Europe/Lisbon")
    response = await stack.gateway.post(
        "/api/v1/auth/login", json={"email": user["email"], "password": PASSWORD}
    )
    token = (await response.json())["data"]["access_token"]
    path = f"/api/v1/users/{user['id']}/preferences"
    mine = {"Authorization": f"Bearer {token}"}

    response = await stack.gateway.put(
        path, json={"quiet_hours": {"start": "22:00", "end": "07:00"}}, headers=mine
    )
    body = await response.json()
    assert response.status == 200, body
    assert body["data"] == {
        "email": True,
        "push": True,
        "in_app": True,
        "quiet_hours": {"start": "22:00", "end": "07:00"},
    }
    response = await stack.gateway.get(path, headers=mine)
    assert (await response.json())["data"]["quiet_hours"] == {"start": "22:00", "end": "07:00"}
    for bad, field in (
        ({"quiet_hours": {"start": "25:00", "end": "07:00"}}, "quiet_hours.start"),
        ({"quiet_hours": {"start": "22:00"}}, "quiet_hours"),
        ({"quiet_hours": {"start": "07:00", "end": "07:00"}}, "quiet_hours"),
        ({"quiet_hours": "22:00-07:00"}, "quiet_hours"),
    ):
        response = await stack.gateway.put(path, json=bad, headers=mine)
        body = await response.json()
        assert response.status == 400 and field in body["data"]["fields"], (bad, body)
    response = await stack.gateway.put(path, json={"quiet_hours": None}, headers=mine)
    assert response.status == 200 and (await response.json())["data"]["quiet_hours"] is None


async def test_preference_and_quiet_hours_are_checked_again_at_dispatch(stack: Stack) -> None:
    code = (await stack.create_template())["code"]
    leaver = await stack.create_user()
    sleeper = await stack.create_user(timezone="Europe/Lisbon")
    due = datetime.now(UTC) + timedelta(seconds=2)
    ids = []
    for user in (leaver, sleeper):
        status, body, _ = await stack.send(request(user, code, send_at=due.isoformat()))
        assert status == 202 and body["data"]["status"] == "scheduled"
        ids.append(str(body["data"]["notification_id"]))
    lisbon = ZoneInfo("Europe/Lisbon")
    now = datetime.now(UTC)
    window = {
        "start": f"{(now - timedelta(hours=1)).astimezone(lisbon):%H:%M}",
        "end": f"{(now + timedelta(hours=2)).astimezone(lisbon):%H:%M}",
    }
    for user, change in ((leaver, {"email": False}), (sleeper, {"quiet_hours": window})):
        response = await stack.gateway.put(
            f"/api/v1/users/{user['id']}/preferences", json=change, headers=stack.headers()
        )
        assert response.status == 200

    skipped = await stack.wait_for(ids[0], "skipped", timeout=10)
    assert skipped["error"] == "user opted out of email notifications"
    deadline = time.monotonic() + 10
    while len((record := await stack.notification(ids[1]))["history"]) < 2:
        assert time.monotonic() < deadline, record
        await asyncio.sleep(0.1)
    assert record["status"] == "scheduled" and parse(record["send_at"]) > now + timedelta(hours=1)
    assert "quiet hours" in record["history"][1]["detail"]
    assert stack.smtp.notification_ids(leaver["email"]) == stack.smtp.notification_ids(sleeper["email"]) == []
    assert (await cancel(stack, ids[1]))[0] == 200


async def test_ten_thousand_due_at_once_are_each_published_once_by_two_dispatchers(
    stack_factory: Any, amqp_channel: aio_pika.abc.AbstractChannel
) -> None:
    count = 10_000
    stack = await stack_factory(workers=False)
    second = TestServer(gateway.create_app(stack.config), host="127.0.0.1")
    await second.start_server()
    user = await stack.create_user()
    database = stack.apps["gateway"][keys.DB_KEY]
    tag = uuid.uuid4().hex
    # Stored as the gateway stores a scheduled notification, all due in the same second.
    rows = await database.fetch(
        """
        INSERT INTO notifications (id, client_id, request_id, body_hash, user_id, notification_type,
            template_code, language, template_version, priority, status, correlation_id, send_at)
        SELECT gen_random_uuid(), 'bulk', %s || '-' || g, 'x', %s, 'email', 'welcome', 'en', 1, 0,
            'scheduled', %s, date_trunc('second', now()) + interval '2 seconds'
        FROM generate_series(1, %s) AS g
        RETURNING id, send_at
        """,
        tag,
        user["id"],
        tag,
        count,
    )
    ids = [r["id"] for r in rows]
    due = rows[0]["send_at"]
    try:
        # A liveness bound, not a benchmark (about 7 s on a busy 2-core machine, both gateways
        # and this test sharing one event loop).
        deadline = due + timedelta(seconds=30)
        while True:
            left = await database.fetchval(
                "SELECT count(*) FROM notifications"
                " WHERE id = ANY(%s::uuid[]) AND (status = 'scheduled' OR publish_pending)",
                ids,
            )
            if left == 0:
                break
            assert datetime.now(UTC) < deadline, f"{left} of {count} not published 30 s after they were due"
            await asyncio.sleep(0.2)

        released = await database.fetch(
            "SELECT notification_id, count(*) AS n FROM notification_events"
            " WHERE notification_id = ANY(%s::uuid[]) AND status = 'pending' GROUP BY notification_id",
            ids,
        )
        assert len(released) == count and {r["n"] for r in released} == {1}
        # Each released by one of the two, and both took part.
        lags = [
            app[METRICS_KEY].registry.get_sample_value(
                "notify_dispatch_lag_seconds_count", {"channel": "email"}
            )
            for app in (stack.apps["gateway"], second.app)
        ]
        assert sum(lag or 0 for lag in lags) == count and all(lags), lags

        # One message each in the queue: confirmed before being marked, so all are there now.
        queue = await amqp_channel.declare_queue(work_queue("email"), passive=True)
        assert queue.declaration_result.message_count == count
        seen: list[str] = []
        await amqp_channel.set_qos(prefetch_count=1000)
        async with queue.iterator(no_ack=True) as messages:
            async for message in messages:
                seen.append(str(message.message_id))
                if len(seen) == count:
                    break
        assert sorted(seen) == sorted(str(i) for i in ids)
    finally:
        await second.close()
        await database.execute("DELETE FROM notifications WHERE id = ANY(%s::uuid[])", ids)


class Died(Exception):
    """A dispatcher's process ending in the middle of its work."""


async def test_a_dispatch_lost_mid_batch_is_still_sent_once(stack: Stack) -> None:
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    due = datetime.now(UTC) + timedelta(seconds=2)
    ids = []
    for _ in range(2):
        status, body, _ = await stack.send(request(user, code, send_at=due.isoformat()))
        assert status == 202 and body["data"]["status"] == "scheduled"
        ids.append(uuid.UUID(body["data"]["notification_id"]))
    after_commit, before_commit = ids
    database = stack.apps["gateway"][keys.DB_KEY]
    store = stack.apps["gateway"][keys.STORE_KEY]
    lock = "SELECT id FROM notifications WHERE id = %s FOR UPDATE"

    # Another dispatcher holds both when they fall due (the gateway's own skips them), then dies:
    # one batch after its commit and before publishing, the other before its commit.
    with contextlib.suppress(Died):
        async with database.transaction() as doomed:
            async with database.transaction() as committed:
                await committed.fetch(lock, after_commit)
                await doomed.fetch(lock, before_commit)
                await sleep_until(due + timedelta(seconds=1))
                for notification_id in ids:
                    assert (await stack.notification(str(notification_id)))["status"] == "scheduled"
                assert [r["id"] for r in await store.release(committed, [after_commit])] == [after_commit]
                assert len(await store.release(doomed, [before_commit])) == 1
            raise Died

    # Rolled back: still scheduled, so the next round takes it. Committed but never
    # published: the outbox relay publishes it.
    for notification_id in ids:
        record = await stack.wait_for(str(notification_id), "delivered", timeout=15)
        assert [h["status"] for h in record["history"]] == ["scheduled", "pending", "sending", "delivered"]
    await asyncio.sleep(0.5)  # time for a duplicate to arrive, were there one
    assert sorted(stack.smtp.notification_ids(user["email"])) == sorted(str(i) for i in ids)


async def test_the_reconciler_releases_what_no_dispatcher_released(stack_factory: Any) -> None:
    # A gateway whose dispatcher does not come round again, as if it had died.
    stack = await stack_factory(gateway_config={"dispatch_interval": 3600.0, "reconcile_after": 1.0})
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    due = datetime.now(UTC) + timedelta(seconds=1)
    status, body, _ = await stack.send(request(user, code, send_at=due.isoformat()))
    assert status == 202 and body["data"]["status"] == "scheduled"
    notification_id = str(body["data"]["notification_id"])
    await sleep_until(due + timedelta(seconds=0.5))
    assert (await stack.notification(notification_id))["status"] == "scheduled"

    record = await stack.wait_for(notification_id, "delivered", timeout=10)
    assert [h["status"] for h in record["history"]] == ["scheduled", "pending", "sending", "delivered"]
    assert "reconciler" in record["history"][1]["detail"]
    await asyncio.sleep(0.5)
    assert stack.smtp.notification_ids(user["email"]) == [notification_id]
    registry = stack.apps["gateway"][METRICS_KEY].registry
    assert (
        registry.get_sample_value("notify_reconciled_total", {"channel": "email", "from_status": "scheduled"})
        == 1
    )


async def test_a_gateway_killed_while_dispatching_loses_nothing_and_sends_each_once(
    stack_factory: Any, tmp_path: Path
) -> None:
    # Six dispatcher batches: enough that the kill, however late a loaded machine delivers it
    # after the first batch is seen, lands with some still scheduled (two batches were not).
    count = 3000
    # The in-process gateway's dispatcher stays out of it (its relay and reconciler do not).
    stack = await stack_factory(gateway_config={"dispatch_interval": 3600.0, "reconcile_after": 2.0})
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    dispatching = ServiceProcess("gateway.py", stack.config, tmp_path / "gateway.log")
    await dispatching.start()
    database = stack.apps["gateway"][keys.DB_KEY]
    tag = uuid.uuid4().hex
    try:
        rows = await database.fetch(
            """
            INSERT INTO notifications (id, client_id, request_id, body_hash, user_id,
                notification_type, template_code, language, template_version, variables, priority,
                status, correlation_id, send_at)
            SELECT gen_random_uuid(), 'default', %s || '-' || g, 'x', %s, 'email', %s, 'en', 1,
                '{"name": "N", "link": "l"}', 0, 'scheduled', %s, now() + interval '2 seconds'
            FROM generate_series(1, %s) AS g
            RETURNING id
            """,
            tag,
            user["id"],
            code,
            tag,
            count,
        )
        ids = [r["id"] for r in rows]
        # Killed as soon as its first batch is committed: publishing it, with the next to come.
        deadline = time.monotonic() + 15
        while not await database.fetchval(
            "SELECT count(*) FROM notifications WHERE id = ANY(%s::uuid[]) AND status <> 'scheduled'", ids
        ):
            assert time.monotonic() < deadline, "the dispatching gateway released nothing"
            await asyncio.sleep(0.01)
        dispatching.signal(signal.SIGKILL)
        await dispatching.wait(10)
        left = await database.fetchval(
            "SELECT count(*) FROM notifications WHERE id = ANY(%s::uuid[]) AND status = 'scheduled'", ids
        )
        # It died with work half done: a batch released (and being published: the relay sees to
        # what it did not get confirmed) and one still scheduled (the reconciler releases it).
        assert 0 < left < count, left

        await wait_all_delivered(stack, ids, timeout=120)
        await asyncio.sleep(1)  # time for a duplicate to arrive, were there one
        received = stack.smtp.notification_ids(user["email"])
        assert len(received) == count and set(received) == {str(i) for i in ids}
    finally:
        dispatching.stop()


async def wait_all_delivered(stack: Stack, ids: list[uuid.UUID], timeout: float) -> None:
    database = stack.apps["gateway"][keys.DB_KEY]
    deadline = time.monotonic() + timeout
    while True:
        done = await database.fetchval(
            "SELECT count(*) FROM notifications WHERE id = ANY(%s::uuid[]) AND status = 'delivered'", ids
        )
        if done == len(ids):
            return
        assert time.monotonic() < deadline, f"{done} of {len(ids)} delivered"
        await asyncio.sleep(0.2)


async def test_a_cancel_and_a_skip_at_dispatch_reach_the_clients_status_webhook(
    stack_factory: Any,
    receiver: Receiver,  # noqa: F811 - the fixture imported above
) -> None:
    stack = await webhook_stack(stack_factory)
    endpoint = await webhook_endpoint(
        stack, receiver.url("/events"), ["notification.cancelled", "notification.skipped"]
    )
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    due = datetime.now(UTC) + timedelta(seconds=2)
    ids = []
    for _ in range(2):
        status, body, _ = await stack.send(request(user, code, send_at=due.isoformat()))
        assert status == 202 and body["data"]["status"] == "scheduled"
        ids.append(str(body["data"]["notification_id"]))
    cancelled, opted_out = ids
    assert (await cancel(stack, cancelled))[0] == 200
    response = await stack.gateway.put(
        f"/api/v1/users/{user['id']}/preferences", json={"email": False}, headers=stack.headers()
    )
    assert response.status == 200

    received = await receiver.wait("/events", 2)
    hook = Webhook(endpoint["secret"])
    events = [hook.verify(r.body, r.headers) for r in received]
    assert sorted((e["data"]["notification_id"], e["type"]) for e in events) == sorted(
        [(cancelled, "notification.cancelled"), (opted_out, "notification.skipped")]
    )
    await asyncio.sleep(0.5)
    assert len(receiver.requests) == 2
