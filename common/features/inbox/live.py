"""Live inbox events across gateway processes: Redis pub/sub for the wake-up, PostgreSQL for
the events themselves.

Whoever changes a user's inbox commits the change with its `inbox_events` row, then
`announce`s it: a PUBLISH on the user's channel, best effort. Each gateway process holds ONE
Redis subscription (a pattern over every inbox channel) and a table of its open streams by
(project, user); a message wakes that user's streams, and each reads `events_after` its own last
seq from the database and sends what it finds. Order and completeness come from the database,
never from pub/sub: a lost PUBLISH, a subscription that dropped, or two announcements out of
order delay an event until the stream's next look (a wake-up, the POLL_INTERVAL fallback, or
the resubscription after a Redis outage, which wakes every stream), and lose nothing.

Channels are `notify:inbox:<redis db>:<project>:<user id>`: a project name has no `:`, so the
user id is what follows it; the database number keeps deployments sharing one Redis server
(pub/sub ignores database numbers) apart, as their keys are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from common import background
from common.keys import CONFIG_KEY, INBOX_LIVE_KEY
from common.resources import connect_redis

log = logging.getLogger(__name__)

MAX_STREAMS_PER_USER = 5  # open event streams of one user, per gateway process
MAX_STREAMS_PER_PROCESS = 5000  # open event streams of every user, per gateway process
POLL_INTERVAL = 10.0  # seconds: a stream looks at the database at least this often
RESUBSCRIBE_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)  # after a Redis error, the 1st, 2nd, … retry
HEALTH_CHECK_INTERVAL = 15  # seconds: the subscription's connection is pinged when idle this long


def _namespace(client: aioredis.Redis) -> str:
    return f"notify:inbox:{client.connection_pool.connection_kwargs.get('db', 0)}:"


def channel(client: aioredis.Redis, project: str, user_id: str) -> str:
    return f"{_namespace(client)}{project}:{user_id}"


async def announce(redis: aioredis.Redis, project: str, user_id: str, seq: int) -> None:
    """Wake the user's open streams in every gateway process: their inbox has events up to
    `seq`. Call it after the change has committed. Best effort: on a Redis error it logs, and
    the streams find the event at their next look at the database."""
    try:
        await redis.publish(channel(redis, project, user_id), str(seq))
    except (RedisError, OSError) as exc:
        log.warning("inbox: announcing event %s failed (streams will poll): %s", seq, exc)


class TooManyStreams(Exception):
    """The process (or the user) has as many open streams as it may."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"at most {limit} open event streams {scope}")
        self.scope = scope
        self.limit = limit


@dataclass(eq=False)
class Stream:
    """One open event stream: `wake` is set when its user's inbox may have changed."""

    project: str
    user_id: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Live:
    """The open streams of this process, by (project, user), and the subscription feeding them."""

    def __init__(self) -> None:
        self.streams: dict[tuple[str, str], set[Stream]] = {}
        self.count = 0
        self.stopping = asyncio.Event()  # the app is shutting down: streams end
        self.subscribed = asyncio.Event()  # the subscription is up (tests, health)

    def open(self, project: str, user_id: str) -> Stream:
        """A new stream of the user's, or TooManyStreams."""
        mine = self.streams.get((project, user_id), set())
        if len(mine) >= MAX_STREAMS_PER_USER:
            raise TooManyStreams("per user", MAX_STREAMS_PER_USER)
        if self.count >= MAX_STREAMS_PER_PROCESS:
            raise TooManyStreams("per process", MAX_STREAMS_PER_PROCESS)
        stream = Stream(project, user_id)
        self.streams.setdefault((project, user_id), set()).add(stream)
        self.count += 1
        return stream

    def close(self, stream: Stream) -> None:
        mine = self.streams.get((stream.project, stream.user_id))
        if mine is None or stream not in mine:
            return
        mine.discard(stream)
        self.count -= 1
        if not mine:
            del self.streams[(stream.project, stream.user_id)]

    def wake(self, project: str, user_id: str) -> None:
        for stream in self.streams.get((project, user_id), ()):
            stream.wake.set()

    def wake_all(self) -> None:
        for streams in self.streams.values():
            for stream in streams:
                stream.wake.set()

    def stop(self) -> None:
        self.stopping.set()
        self.wake_all()

    def dispatch(self, namespace: str, name: str) -> None:
        """A message on channel `name`: wake the streams of the user it names."""
        if not name.startswith(namespace):
            return
        project, sep, user_id = name[len(namespace) :].partition(":")
        if sep:
            self.wake(project, user_id)

    async def run(self, client: aioredis.Redis, stopping: asyncio.Event) -> None:
        """Keep the one subscription up until `stopping`; after each (re)subscription every
        stream looks at the database, for what it may have missed meanwhile."""
        namespace = _namespace(client)
        failures = 0
        while not stopping.is_set():
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(namespace + "*")
                self.subscribed.set()
                if failures:
                    log.info("inbox: live events subscription restored")
                failures = 0
                self.wake_all()
                while not stopping.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "pmessage":
                        name = message["channel"]
                        self.dispatch(namespace, name.decode() if isinstance(name, bytes) else str(name))
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                delay = RESUBSCRIBE_DELAYS[min(failures, len(RESUBSCRIBE_DELAYS) - 1)]
                failures += 1
                log.warning(
                    "inbox: live events subscription lost (%s: %s); streams poll every %gs, "
                    "resubscribing in %gs",
                    type(exc).__name__,
                    exc,
                    POLL_INTERVAL,
                    delay,
                )
                await background.sleep(stopping, delay)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), 2)
        self.subscribed.clear()


async def live(app: web.Application) -> AsyncIterator[None]:
    """A cleanup context: this process's table of open streams (INBOX_LIVE_KEY) and its one
    Redis subscription, on a connection of its own (no read timeout: it waits for messages)."""
    client = connect_redis(
        app[CONFIG_KEY].redis_url,
        socket_connect_timeout=1,
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )
    table = Live()
    app[INBOX_LIVE_KEY] = table
    stopping = asyncio.Event()
    task = asyncio.create_task(table.run(client, stopping), name="inbox-live")
    try:
        yield
    finally:
        table.stop()
        await background.stop(task, stopping.set)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.aclose(), 5)
