"""Group commit on the accept path: one INSERT for many requests, each still answered exactly,
and nothing lost between the commit and the publish."""

from __future__ import annotations

import asyncio
import signal
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import redis.asyncio as aioredis

from common import keys
from common.config import Config
from common.data import db
from common.data.store import Claim, NewNotification, Outcome, StatusStore
from common.group_commit import Batcher
from common.lookups.cache import CachedLookups, user_key
from common.lookups.clients import ServiceClient
from common.web.ratelimit import RateLimiter
from tests.conftest import API_KEY, Stack
from tests.processes import ServiceProcess
from tests.tcp_proxy import TcpProxy
from tests.test_black_holes import all_delivered, exactly_once
from tests.test_faults import via


def _new(client: str, request_id: str, **fields: Any) -> NewNotification:
    return NewNotification(
        id=uuid.uuid4(),
        client_id=client,
        request_id=request_id,
        body_hash="h",
        user_id=str(uuid.uuid4()),
        notification_type="email",
        template_code="t",
        language="en",
        template_version=1,
        priority=0,
        correlation_id="c",
        variables={"name": "Ada", "nested": {"list": [1, 2]}},
        **fields,
    )


async def test_one_insert_answers_each_row_with_duplicates_inside_it(base_config: Config) -> None:
    database = await db.connect(base_config.notifications_db_url, maxsize=2)
    store = StatusStore(database)
    client = f"batch-{uuid.uuid4().hex[:8]}"
    try:
        existing = _new(client, "already")
        assert await store.create(existing) is not None
        first, second, again, old = (
            _new(client, "one"),
            _new(client, "two"),
            _new(client, "one"),  # the same key twice in one batch: the first wins
            _new(client, "already"),  # stored before this batch
        )
        results = await store.create_many([first, second, again, old])
        assert [r["id"] if isinstance(r, dict) else r for r in results] == [first.id, second.id, None, None]
        assert results[0]["variables"] == {"name": "Ada", "nested": {"list": [1, 2]}}  # type: ignore[index]
        assert (await store.by_request(client, "one"))["id"] == first.id  # type: ignore[index]
        assert [h["status"] for h in await store.history(first.id)] == ["pending"]
    finally:
        await database.close()


async def test_a_row_that_breaks_the_batch_fails_alone(base_config: Config) -> None:
    database = await db.connect(base_config.notifications_db_url, maxsize=2)
    store = StatusStore(database)
    client = f"batch-{uuid.uuid4().hex[:8]}"
    try:
        good, bad, other = (
            _new(client, "good"),
            replace(_new(client, "bad"), notification_type="sms"),  # refused by a CHECK
            _new(client, "other"),
        )
        results = await store.create_many([good, bad, other])
        assert isinstance(results[1], db.InputError)
        assert results[0]["id"] == good.id and results[2]["id"] == other.id  # type: ignore[index]
    finally:
        await database.close()


async def test_the_batcher_groups_calls_and_a_failed_batch_fails_only_its_own() -> None:
    seen: list[list[int]] = []

    async def flush(items: list[int]) -> list[int | BaseException]:
        seen.append(items)
        if 13 in items:
            raise RuntimeError("this batch failed")
        return [i * 10 if i != 7 else ValueError("seven") for i in items]

    batcher: Batcher[int, int] = Batcher(flush, size=4, delay=0.05)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(6)), return_exceptions=True)
    assert seen == [[0, 1, 2, 3], [4, 5]]  # full at four, the rest after the delay
    assert results == [0, 10, 20, 30, 40, 50]
    failing = await asyncio.gather(batcher.submit(13), batcher.submit(1), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in failing)
    mixed = await asyncio.gather(batcher.submit(7), batcher.submit(2), return_exceptions=True)
    assert isinstance(mixed[0], ValueError) and mixed[1] == 20
    assert await batcher.submit(3) == 30  # the next batch starts fresh
    await batcher.close()


async def test_concurrent_accepts_with_duplicates_and_conflicts_each_get_their_answer(stack: Stack) -> None:
    user = await stack.create_user()
    code = (await stack.create_template())["code"]

    def body(request_id: str, name: str = "N") -> dict[str, Any]:
        return {
            "notification_type": "email",
            "user_id": user["id"],
            "template_code": code,
            "variables": {"name": name, "link": "l"},
            "request_id": request_id,
        }

    prefix = uuid.uuid4().hex[:8]
    fresh = [body(f"{prefix}-{i}") for i in range(30)]
    duplicates = [body(f"{prefix}-{i}") for i in range(5)]  # the same body again: one notification
    conflicts = [body(f"{prefix}-{i}", name="other") for i in range(5, 8)]  # same key, other body
    answers = await asyncio.gather(*(stack.send(b) for b in fresh + duplicates + conflicts))
    status = [s for s, _, _ in answers]
    data = [a["data"] for _, a, _ in answers]
    # Two identical requests: both 202, naming one notification.
    for i in range(5):
        assert status[i] == status[30 + i] == 202
        assert data[i]["notification_id"] == data[30 + i]["notification_id"]
    # Two bodies under one key: whichever committed first is accepted, the other refused 422.
    for i in range(3):
        assert sorted([status[5 + i], status[35 + i]]) == [202, 422]
    accepted = {d["notification_id"] for s, d in zip(status, data, strict=True) if s == 202}
    assert len(accepted) == 30 and all(status[i] == 202 for i in range(8, 30))
    await all_delivered(stack, sorted(accepted), timeout=30)
    await asyncio.sleep(0.5)
    assert sorted(stack.smtp.notification_ids(user["email"])) == sorted(accepted)


async def test_a_gateway_killed_between_commit_and_publish_loses_nothing(
    stack_factory: Any, base_config: Config, tmp_path: Path
) -> None:
    stack = await stack_factory()  # its gateway's relay sees the other gateway's rows through
    user = await stack.create_user()
    code = (await stack.create_template())["code"]
    target = urlsplit(base_config.rabbitmq_url)
    link = TcpProxy(target.hostname or "127.0.0.1", target.port or 5672)
    await link.start()
    doomed = ServiceProcess(
        "gateway.py",
        replace(stack.config, rabbitmq_url=via(base_config.rabbitmq_url, link)),
        tmp_path / "g.log",
    )
    await doomed.start()
    try:
        link.freeze()  # its publishes will never leave
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            ids = []
            for i in range(20):
                async with session.post(
                    doomed.url + "/api/v1/notifications/",
                    json={
                        "notification_type": "email",
                        "user_id": user["id"],
                        "template_code": code,
                        "variables": {"name": "N", "link": "l"},
                        "request_id": f"doomed-{uuid.uuid4()}-{i}",
                    },
                ) as response:
                    assert response.status == 202
                    ids.append((await response.json())["data"]["notification_id"])
        doomed.signal(signal.SIGKILL)  # committed, never published
        await doomed.wait(10)
        await all_delivered(stack, ids, timeout=30)  # by the surviving gateway's relay
        await asyncio.sleep(0.5)
        exactly_once(stack, user, ids)
    finally:
        doomed.stop()
        await link.close()


async def test_the_accept_path_still_rate_limits_in_its_one_round_trip(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False, rate_limit=4, rate_limit_window=3600.0)
    user = await stack.create_user()  # one request of the four
    code = (await stack.create_template())["code"]  # two
    statuses = []
    for _ in range(4):
        status, answer, headers = await stack.send(
            {
                "notification_type": "email",
                "user_id": user["id"],
                "template_code": code,
                "variables": {"name": "N", "link": "l"},
                "request_id": str(uuid.uuid4()),
            }
        )
        statuses.append(status)
        assert headers["X-RateLimit-Limit"] == "4"
        if status == 429:
            assert answer["error"] == "rate_limited" and int(headers["Retry-After"]) >= 1
    assert statuses == [202, 202, 429, 429]


async def test_claims_and_records_of_many_in_one_statement_are_each_judged_alone(
    base_config: Config,
) -> None:
    """The worker's group commit: one claim statement and one record statement for the messages
    in flight, each still a compare-and-set on its own row."""
    database = await db.connect(base_config.notifications_db_url, maxsize=2)
    store = StatusStore(database)
    client = f"batch-{uuid.uuid4().hex[:8]}"
    try:
        rows = [_new(client, f"w{i}") for i in range(5)]
        assert all(r is not None for r in await store.create_many(rows))
        done, copy, fresh, retried, unknown = rows[0], rows[1], rows[2], rows[3], uuid.uuid4()
        assert await store.record(done.id, "delivered", provider="smtp")
        assert await store.record(retried.id, "retrying", error="greylisted")
        tokens = [uuid.uuid4() for _ in range(6)]
        claims = [
            Claim(done.id, 1, tokens[0]),  # final: not claimed
            Claim(copy.id, 1, tokens[1]),
            Claim(copy.id, 1, tokens[2]),  # a second copy in the same batch: the first holds it
            Claim(fresh.id, 1, tokens[3]),
            Claim(retried.id, 2, tokens[4]),
            Claim(unknown, 1, tokens[5]),
        ]
        got = await store.claim_many(claims, 30)
        assert [g is not None for g in got] == [False, True, False, True, True, False]
        assert got[4]["attempts"] == 2 and got[4]["reclaimed"] is False  # type: ignore[index]
        # The same token again (a retry after a timeout that did reach the database): still ours.
        again = await store.claim_many([Claim(fresh.id, 1, tokens[3])], 30)
        assert again[0] is not None and again[0]["again"] is True
        outcomes = [
            Outcome(copy.id, "delivered", claim=tokens[1], provider="smtp"),
            Outcome(fresh.id, "delivered", claim=tokens[0], provider="smtp"),  # not its claim
            Outcome(retried.id, "failed", claim=tokens[4], error="mailbox unavailable"),
            Outcome(copy.id, "delivered", claim=tokens[1], provider="smtp"),  # written twice: a success
        ]
        assert await store.record_many(outcomes) == [True, False, True, True]
        assert (await store.get(fresh.id))["status"] == "sending"  # type: ignore[index]
        assert (await store.get(retried.id))["error"] == "mailbox unavailable"  # type: ignore[index]
        history = [h["status"] for h in await store.history(copy.id)]
        assert history == ["pending", "sending", "delivered"]
    finally:
        await database.close()


async def test_concurrent_lookups_share_one_redis_round_trip_and_each_gets_its_own(
    base_config: Config,
) -> None:
    """The reads of concurrent requests go to Redis in one pipeline; each request still gets its
    own user's profile and its own rate-limit count."""
    client = aioredis.Redis.from_url(base_config.redis_url)
    async with aiohttp.ClientSession() as session:
        unused = ServiceClient(session, "http://127.0.0.1:9", "t", "users")
        lookups = CachedLookups(client, unused, unused)
        flushes: list[int] = []
        read_many = lookups._read_many

        async def counted(reads: list[Any]) -> list[Any]:
            flushes.append(len(reads))
            return await read_many(reads)

        lookups._reads._flush = counted
        limiter = RateLimiter(client, limit=1000, window=60)
        users = [str(uuid.uuid4()) for _ in range(20)]
        try:
            for i, user_id in enumerate(users):
                await client.set(user_key(user_id), orjson.dumps({"id": user_id, "n": i}))
            subjects = [f"batch-test-{uuid.uuid4().hex}" for _ in range(2)]
            reads = await asyncio.gather(
                *(lookups._read(u, limiter.count(subjects[i % 2])) for i, u in enumerate(users))
            )
            assert flushes == [20]
            assert [orjson.loads(raw or b"{}").get("n") for raw, _, _ in reads] == list(range(20))
            # Each request counted once, in order, per subject.
            assert sorted(count for _, _, count in reads[0::2]) == list(range(1, 11))
            assert sorted(count for _, _, count in reads[1::2]) == list(range(1, 11))
        finally:
            await client.delete(*(user_key(u) for u in users))
            await client.aclose()


async def test_hot_statements_run_prepared_or_plain_and_survive_a_lost_session_statement(
    base_config: Config,
) -> None:
    """Prepared once per connection (a generic plan); plain behind a pooler in transaction mode
    (DB_PREPARED_STATEMENTS=false); a statement the session lost (DISCARD ALL, a pooler handing
    over another server session) is prepared again, not an error."""
    for prepared in (True, False):
        database = await db.connect(base_config.notifications_db_url, maxsize=1, prepared=prepared)
        store = StatusStore(database)
        client = f"prep-{uuid.uuid4().hex[:8]}"
        try:
            for round_ in range(3):
                row = _new(client, f"r{round_}")
                assert (await store.create_many([row]))[0] is not None
                token = uuid.uuid4()
                assert (await store.claim_many([Claim(row.id, 1, token)], 30))[0] is not None
                assert await store.extend({row.id: token}, 30) == 1
                assert await store.record_many([Outcome(row.id, "delivered", claim=token)]) == [True]
                names = await database.fetch("SELECT name FROM pg_prepared_statements")
                assert bool(names) is prepared
                await database.execute("DEALLOCATE ALL")  # the session loses them
        finally:
            await database.close()


async def test_the_relay_leaves_alone_what_its_own_outbox_is_still_publishing(stack_factory: Any) -> None:
    """On a busy machine the outbox's queue can hold rows longer than RELAY_AGE; the relay of the
    same gateway must not publish them a second time, and takes them once they are let go."""
    stack = await stack_factory(workers=False)
    app = stack.apps["gateway"]
    outbox, database = app[keys.OUTBOX_KEY], app[keys.DB_KEY]
    store = StatusStore(database)
    row = _new(f"relay-{uuid.uuid4().hex[:8]}", "held")
    assert (await store.create_many([row]))[0] is not None
    await database.execute(
        "UPDATE notifications SET updated_at = now() - interval '1 minute' WHERE id = %s", row.id
    )
    outbox._in_hand.add(row.id)  # as if waiting in its queue
    await outbox.relay_once()
    assert (await store.get(row.id))["publish_pending"] is True  # type: ignore[index]
    outbox._in_hand.discard(row.id)
    await outbox.relay_once()
    assert (await store.get(row.id))["publish_pending"] is False  # type: ignore[index]
