"""Digest and throttle steps against the real stack (PostgreSQL, Redis, RabbitMQ, the SMTP sink):
one email per window whatever the concurrency, across two gateways and a SIGKILL; the events in a
template; a daily digest at a local time in a half-hour zone; throttle; lookback."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp

from common.data import db
from tests.conftest import API_KEY, Stack
from tests.processes import ServiceProcess

COMMENTS = {
    "subject": "{{ digest.count }} new comments on {{ post_id }}",
    "body": "<p>{% for e in digest.events %}[{{ e.author }}]{% endfor %} last: {{ digest.last.author }}</p>",
}


def _key(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def put(stack: Stack, key: str, steps: list[dict[str, Any]]) -> None:
    response = await stack.gateway.put(
        f"/api/v1/workflows/{key}", json={"name": key, "steps": steps}, headers=stack.headers()
    )
    assert response.status == 201, await response.text()


async def trigger(stack: Stack, key: str, user_id: str, payload: dict[str, Any]) -> str:
    response = await stack.gateway.post(
        f"/api/v1/workflows/{key}/trigger",
        json={"to": user_id, "payload": payload, "request_id": f"t-{uuid.uuid4()}"},
        headers=stack.headers(),
    )
    assert response.status == 202, await response.text()
    return str((await response.json())["data"]["runs"][0]["run_id"])


async def run_of(stack: Stack, run_id: str) -> dict[str, Any]:
    response = await stack.gateway.get(f"/api/v1/workflow-runs/{run_id}", headers=stack.headers())
    assert response.status == 200, await response.text()
    return dict((await response.json())["data"])


async def wait_mail(stack: Stack, address: str, count: int, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    while len(found := stack.smtp.to(address)) < count:
        assert time.monotonic() < deadline, f"{len(found)} emails to {address}, wanted {count}"
        await asyncio.sleep(0.1)
    return found


def _body(message: Any) -> str:
    part = message.get_body(("html", "plain"))
    return str(part.get_content())


async def test_230_concurrent_triggers_through_two_gateways_one_sigkilled_make_two_emails(
    stack_factory: Any, tmp_path: Path
) -> None:
    stack: Stack = await stack_factory()  # its gateway survives; a second one is killed mid-window
    template = await stack.create_template(**COMMENTS)
    user = await stack.create_user()
    key = _key("comments")
    window = 8.0
    await put(
        stack,
        key,
        [
            {"name": "gather", "type": "digest", "window": window, "key": "{{ payload.post_id }}"},
            {"name": "mail", "type": "email", "template_code": template["code"]},
        ],
    )
    doomed = ServiceProcess("gateway.py", stack.config, tmp_path / "doomed.log")
    await doomed.start()
    database = await db.connect(stack.config.notifications_db_url, maxsize=2)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            events = [("p1", i) for i in range(200)] + [("p2", i) for i in range(30)]
            limit = asyncio.Semaphore(40)

            async def one(index: int, post: str, n: int) -> str:
                body = {
                    "to": user["id"],
                    "payload": {"post_id": post, "author": f"{post}-{n}"},
                    "request_id": f"{post}-{n}",
                }
                async with limit:
                    if index % 2:  # every other trigger through the gateway that will die
                        async with session.post(
                            f"{doomed.url}/api/v1/workflows/{key}/trigger", json=body
                        ) as response:
                            assert response.status == 202, await response.text()
                            answer = await response.json()
                    else:
                        response = await stack.gateway.post(
                            f"/api/v1/workflows/{key}/trigger", json=body, headers=stack.headers()
                        )
                        assert response.status == 202, await response.text()
                        answer = await response.json()
                return str(answer["data"]["runs"][0]["run_id"])

            started = datetime.now(UTC)
            run_ids = await asyncio.gather(*(one(i, post, n) for i, (post, n) in enumerate(events)))
        # Every event has joined its window (merged) or opened it (waiting) before the kill.
        deadline = time.monotonic() + window / 2
        while (
            joined := await database.fetchval(
                "SELECT count(*) FROM workflow_runs"
                " WHERE workflow_key = %s AND status IN ('merged', 'waiting')",
                key,
            )
        ) < 230:
            assert time.monotonic() < deadline, f"only {joined} of 230 runs reached the digest"
            await asyncio.sleep(0.05)
        windows = await database.fetch(
            "SELECT digest_key, status, closes_at, carrier FROM workflow_digests WHERE workflow_key = %s", key
        )
        assert sorted((w["digest_key"], w["status"]) for w in windows) == [("p1", "open"), ("p2", "open")]
        assert all(w["closes_at"] > datetime.now(UTC) for w in windows)  # killed mid-window
        doomed.signal(signal.SIGKILL)
        await doomed.wait(10)

        # The windows close on time through the surviving gateway: two emails, 200 and 30.
        mails = await wait_mail(stack, user["email"], 2, timeout=window + 20)
        closes = max(w["closes_at"] for w in windows)
        arrived = datetime.now(UTC)
        assert arrived - closes < timedelta(seconds=10), (closes, arrived)
        by_subject = {str(m["Subject"]): m for m in mails}
        assert set(by_subject) == {"200 new comments on p1", "30 new comments on p2"}
        small = _body(by_subject["30 new comments on p2"])
        listed = small.removeprefix("<p>").split(" last:")[0]
        assert sorted(listed.split("]")[:-1]) == sorted(f"[p2-{n}" for n in range(30))
        big = _body(by_subject["200 new comments on p1"])
        assert big.count("[p1-") == 100  # max_events: the first 100 listed, all 200 counted
        await asyncio.sleep(0.5)
        assert len(stack.smtp.to(user["email"])) == 2

        # The runs say it: the carriers completed with their counts, the others merged into them.
        carriers = {w["digest_key"]: str(w["carrier"]) for w in windows}
        carrier = await run_of(stack, carriers["p1"])
        gather = carrier["steps"][0]
        assert carrier["status"] == "completed" and gather["count"] == 200
        assert datetime.fromisoformat(gather["opened_at"]) >= started - timedelta(seconds=1)
        assert datetime.fromisoformat(gather["closes_at"]) == next(
            w["closes_at"] for w in windows if w["digest_key"] == "p1"
        )
        merged = await run_of(stack, next(r for r in run_ids[:200] if r != carriers["p1"]))
        assert merged["status"] == "merged" and merged["merged_into"] == carriers["p1"]
        assert merged["steps"][0]["status"] == "merged" and merged["steps"][1]["status"] == "skipped"

        # An event after its window went opens a new one: never lost, never added to a sent one.
        late = await trigger(stack, key, user["id"], {"post_id": "p1", "author": "late"})
        mails = await wait_mail(stack, user["email"], 3, timeout=window + 20)
        assert "1 new comments on p1" in {str(m["Subject"]) for m in mails}
        assert (await run_of(stack, late))["steps"][0]["count"] == 1
    finally:
        doomed.stop()
        await database.close()


async def test_a_throttle_lets_exactly_three_of_twenty_concurrent_triggers_through(
    stack_factory: Any,
) -> None:
    stack: Stack = await stack_factory()
    template = await stack.create_template()
    user = await stack.create_user()
    key = _key("throttled")
    await put(
        stack,
        key,
        [
            {"name": "limit", "type": "throttle", "limit": 3, "window": "PT1M"},
            {"name": "mail", "type": "email", "template_code": template["code"]},
        ],
    )
    payload = {"name": "Ada", "link": "https://example.com"}
    run_ids = await asyncio.gather(*(trigger(stack, key, user["id"], payload) for _ in range(20)))
    deadline = time.monotonic() + 30
    while True:
        runs = [await run_of(stack, r) for r in run_ids]
        if all(r["status"] in ("completed", "throttled") for r in runs):
            break
        assert time.monotonic() < deadline, [r["status"] for r in runs]
        await asyncio.sleep(0.2)
    assert sorted(r["status"] for r in runs) == ["completed"] * 3 + ["throttled"] * 17
    held = next(r for r in runs if r["status"] == "throttled")
    assert held["steps"][0]["status"] == "throttled"
    assert "3 run(s) of this user passed 'limit' within the last 60 s" in held["reason"]
    await wait_mail(stack, user["email"], 3, timeout=20)
    await asyncio.sleep(0.5)
    assert len(stack.smtp.to(user["email"])) == 3
    # Another user has places of their own.
    other = await stack.create_user()
    assert (await run_of(stack, await trigger(stack, key, other["id"], payload)))["status"] != "throttled"


async def test_lookback_sends_the_first_event_of_a_burst_at_once_and_digests_the_rest(
    stack_factory: Any,
) -> None:
    stack: Stack = await stack_factory()
    template = await stack.create_template(**COMMENTS)
    user = await stack.create_user()
    key = _key("lookback")
    await put(
        stack,
        key,
        [
            {"name": "gather", "type": "digest", "window": 3, "mode": "lookback"},
            {"name": "mail", "type": "email", "template_code": template["code"]},
        ],
    )
    started = time.monotonic()
    first = await trigger(stack, key, user["id"], {"post_id": "p", "author": "first"})
    [mail] = await wait_mail(stack, user["email"], 1, timeout=10)
    assert time.monotonic() - started < 3  # at once, not at the end of a window
    assert str(mail["Subject"]) == "1 new comments on p"
    assert (await run_of(stack, first))["steps"][0]["count"] == 1
    for n in range(4):
        await trigger(stack, key, user["id"], {"post_id": "p", "author": f"burst-{n}"})
    await asyncio.sleep(1)
    assert len(stack.smtp.to(user["email"])) == 1  # the rest of the burst waits for its window
    mails = await wait_mail(stack, user["email"], 2, timeout=15)
    assert str(mails[1]["Subject"]) == "4 new comments on p"
    assert "[burst-0][burst-1][burst-2][burst-3]" in _body(mails[1])


async def test_a_daily_digest_at_a_local_time_in_a_half_hour_zone(stack_factory: Any) -> None:
    stack: Stack = await stack_factory()
    template = await stack.create_template(**COMMENTS)
    user = await stack.create_user(timezone="Asia/Kolkata")
    kolkata = ZoneInfo("Asia/Kolkata")
    # The next whole minute of Kolkata's clock at least 15 s away: long enough to see nothing
    # sent before it. The digest says "HH:MM", Kolkata being UTC+05:30.
    now = datetime.now(UTC)
    local = (now + timedelta(seconds=75)).astimezone(kolkata).replace(second=0, microsecond=0)
    if local - now.astimezone(kolkata) > timedelta(seconds=75):
        local -= timedelta(minutes=1)
    at = local.strftime("%H:%M")
    key = _key("daily")
    await put(
        stack,
        key,
        [
            {"name": "daily", "type": "digest", "at": at},
            {"name": "mail", "type": "email", "template_code": template["code"]},
        ],
    )
    first = await trigger(stack, key, user["id"], {"post_id": "p", "author": "one"})
    await trigger(stack, key, user["id"], {"post_id": "p", "author": "two"})
    deadline = time.monotonic() + 10
    while (run := await run_of(stack, first))["steps"][0].get("count") != 2:  # both events in
        assert time.monotonic() < deadline, run
        await asyncio.sleep(0.1)
    closes_at = datetime.fromisoformat(run["steps"][0]["closes_at"])
    assert closes_at == local.astimezone(UTC)
    # Half an hour off UTC's minutes: the zone's offset, not UTC's clock, decided it.
    assert closes_at.astimezone(kolkata).strftime("%H:%M") == at
    assert closes_at.minute == (local.minute + 30) % 60
    while datetime.now(UTC) < closes_at - timedelta(seconds=1):
        assert stack.smtp.to(user["email"]) == [], "sent before the digest's local time"
        await asyncio.sleep(0.5)
    [mail] = await wait_mail(stack, user["email"], 1, timeout=20)
    assert str(mail["Subject"]) == "2 new comments on p"
    assert datetime.now(UTC) >= closes_at
