"""PostgreSQL access (aiopg). Every query in the project goes through this module.

Queries use psycopg2's `%s` placeholders. Rows come back as dicts (made from plain tuples); jsonb
is decoded with orjson and uuid columns as `uuid.UUID`, both of which the envelope serialises as
they are.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiopg
import orjson
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from common.event_loop import stale_handle

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

psycopg2.extras.register_uuid()
psycopg2.extras.register_default_jsonb(loads=orjson.loads, globally=True)

# Re-exported so services can catch driver errors without importing the driver.
UniqueViolation = psycopg2.errors.UniqueViolation
DatabaseError = psycopg2.Error
OperationalError = psycopg2.OperationalError
# What bad input causes, as opposed to a server or connection in trouble.
InputError = (psycopg2.DataError, psycopg2.IntegrityError, psycopg2.ProgrammingError)
IntegrityError = psycopg2.IntegrityError
DataError = psycopg2.DataError
ProgramLimitExceeded = psycopg2.errors.ProgramLimitExceeded  # an OperationalError, yet caused by input

Row = dict[str, Any]


class Json(psycopg2.extras.Json):
    """A jsonb parameter, dumped with orjson."""

    def dumps(self, obj: Any) -> str:
        return orjson.dumps(obj).decode()


psycopg2.extensions.register_adapter(dict, Json)


def _dsn(url: str) -> str:
    # libpq wants "postgresql://"; accept the "postgres://" spelling too.
    return "postgresql://" + url.split("://", 1)[1]


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def _params(args: tuple[Any, ...]) -> Any:
    # One dict argument means %(name)s placeholders; otherwise positional %s.
    if len(args) == 1 and isinstance(args[0], dict):
        return args[0]
    return args or None


class Statement:
    """A hot query, prepared once per connection (`PREPARE … AS`, a generic plan) and then run
    by name. Planning is most of what a short statement costs the server here — about 1 ms of
    CPU for a claim or a record on the partitioned `notifications`, against under 0.1 ms to
    execute it (BENCHMARKS.md) — and a prepared generic plan pays it once per connection.

    Written with `%(name)s` placeholders like any query in this module; `params` names them in
    order with their PostgreSQL types. With `prepared=False` on the database (a pooler in
    transaction mode, which cannot keep a session's statements) it runs as a plain query."""

    def __init__(self, name: str, sql: str, params: Sequence[tuple[str, str]]) -> None:
        self.name = name
        self.sql = sql
        self.params = tuple(p for p, _ in params)
        text = sql
        for i, (param, _) in enumerate(params, 1):
            text = text.replace(f"%({param})s", f"${i}")
        if "%(" in text:
            raise ValueError(f"statement {name}: a placeholder is not among its params")
        types = ", ".join(t for _, t in params)
        # Generic plans for this session's prepared statements; unprepared queries are not
        # affected (they are planned each time whatever this says).
        self.prepare = (
            f"SET plan_cache_mode = force_generic_plan; PREPARE {name} ({types}) AS {text.replace('%%', '%')}"
        )
        self.execute = f"EXECUTE {name} ({', '.join(['%s'] * len(params))})"


# The statements each connection has prepared: a connection the pool replaced starts afresh.
_PREPARED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


async def _run(cur: Any, statement: Statement, values: dict[str, Any], prepared: bool) -> None:
    if not prepared:
        await cur.execute(statement.sql, values)
        return
    names = _PREPARED.setdefault(cur.connection.raw, set())
    args = tuple(values[p] for p in statement.params)
    if statement.name not in names:
        await cur.execute(statement.prepare)
        names.add(statement.name)
    try:
        await cur.execute(statement.execute, args)
    except psycopg2.errors.InvalidSqlStatementName:
        # The session lost it (DISCARD ALL, a pooler handing over another server session):
        # prepared again, once. Inside a transaction the error has aborted it: raised there.
        names.discard(statement.name)
        if cur.connection.raw.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            raise
        await cur.execute(statement.prepare)
        names.add(statement.name)
        await cur.execute(statement.execute, args)


def _dicts(cur: Any, rows: list[tuple[Any, ...]]) -> list[Row]:
    """Rows as dicts, built from plain tuples: psycopg2's RealDictCursor builds each row through
    a Python `__setitem__` per column, about nine times the cost of one `dict(zip())` (a few µs a
    row, on every hot statement)."""
    names = [column.name for column in cur.description]
    return [dict(zip(names, row, strict=True)) for row in rows]


class Executor:
    """Query helpers over one cursor source: the pool, or a connection inside a transaction."""

    def __init__(self, cursor_source: Any, prepared: bool = True) -> None:
        # A callable returning an async context manager that yields a cursor.
        self._cursor = cursor_source
        self.prepared = prepared

    async def fetch_statement(self, statement: Statement, values: dict[str, Any]) -> list[Row]:
        async with self._cursor() as cur:
            await _run(cur, statement, values, self.prepared)
            return _dicts(cur, await cur.fetchall())

    async def execute_statement(self, statement: Statement, values: dict[str, Any]) -> int:
        async with self._cursor() as cur:
            await _run(cur, statement, values, self.prepared)
            return int(cur.rowcount)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._cursor() as cur:
            await cur.execute(sql, _params(args))
            return _dicts(cur, await cur.fetchall())

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        async with self._cursor() as cur:
            await cur.execute(sql, _params(args))
            row = await cur.fetchone()
            return _dicts(cur, [row])[0] if row is not None else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return next(iter(row.values())) if row else None

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._cursor() as cur:
            await cur.execute(sql, _params(args))
            return int(cur.rowcount)


# After a PostgreSQL restart every pooled connection breaks at once, and a new connection can
# be handed a descriptor whose old poll handle uvloop has not let go of (common/event_loop.py).
# Tried again a moment later it gets through; after HANDLE_TRIES it is the connection error it is.
HANDLE_TRIES = 5
HANDLE_PAUSE = 0.02


class Database(Executor):
    def __init__(self, pool: aiopg.Pool, timeout: float, prepared: bool = True) -> None:
        self.pool = pool
        self.timeout = timeout
        super().__init__(self._pool_cursor, prepared)

    async def _acquire(self) -> Any:
        # aiopg bounds connecting and each query (`timeout`), not waiting for a free connection:
        # with every connection stuck on a dead server, that wait must end too.
        async def acquire() -> Any:
            attempt = 1
            while True:
                try:
                    return await self.pool.acquire()
                except RuntimeError as exc:
                    if not stale_handle(exc):
                        raise
                    if attempt == HANDLE_TRIES:
                        # A connection error like any other: a 503 or a retry, never a 500.
                        raise OperationalError(f"could not register a new connection: {exc}") from exc
                await asyncio.sleep(HANDLE_PAUSE * attempt)
                attempt += 1

        return await asyncio.wait_for(acquire(), self.timeout)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        conn = await self._acquire()
        try:
            yield conn
        finally:
            self.pool.release(conn)

    @asynccontextmanager
    async def _pool_cursor(self) -> AsyncIterator[Any]:
        async with (
            self._connection() as conn,
            conn.cursor() as cur,
        ):
            yield cur

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        async with (
            self._connection() as conn,
            conn.cursor() as cur,
        ):
            await cur.execute("BEGIN")
            try:
                yield _TxExecutor(cur, self.prepared)
            except BaseException:
                # A query cancelled mid-flight (a task cancelled, a timeout) closes its connection
                # in aiopg, and the server rolls the transaction back itself: nothing to send, and
                # trying would hide the cancellation behind an InterfaceError.
                if not cur.closed and not conn.closed:
                    await cur.execute("ROLLBACK")
                raise
            await cur.execute("COMMIT")

    async def ping(self) -> None:
        await self.fetchval("SELECT 1")

    async def close(self, timeout: float = 5.0) -> None:
        """Close, waiting a bounded time for connections in use: a connection whose query was
        cancelled half-way may never be handed back, and shutdown must not wait for it."""
        self.pool.close()
        try:
            await asyncio.wait_for(self.pool.wait_closed(), timeout)
        except TimeoutError:
            log.warning("closing the database pool: connections still in use after %gs, dropped", timeout)
            self.pool.terminate()
            await self.pool.wait_closed()


class _TxExecutor(Executor):
    def __init__(self, cur: Any, prepared: bool) -> None:
        @asynccontextmanager
        async def same_cursor() -> AsyncIterator[Any]:
            yield cur

        super().__init__(same_cursor, prepared)


async def connect(
    url: str, minsize: int = 1, maxsize: int = 10, timeout: float = 10.0, prepared: bool = True
) -> Database:
    pool = await aiopg.create_pool(
        _dsn(url), minsize=minsize, maxsize=maxsize, timeout=timeout, enable_hstore=False
    )
    return Database(pool, timeout, prepared)


async def create_database(url: str) -> bool:
    """Create the database named in `url` when it does not exist; True when it was created."""
    name = database_name(url)
    parts = urlsplit(_dsn(url))
    admin = urlunsplit(parts._replace(path="/postgres"))
    async with aiopg.connect(admin, timeout=10, enable_hstore=False) as conn, conn.cursor() as cur:
        await cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if await cur.fetchone():
            return False
        try:
            await cur.execute(f'CREATE DATABASE "{name}"')
        except psycopg2.errors.DuplicateDatabase:
            return False  # created by a concurrent runner
        return True


async def drop_database(url: str) -> None:
    name = database_name(url)
    parts = urlsplit(_dsn(url))
    admin = urlunsplit(parts._replace(path="/postgres"))
    async with aiopg.connect(admin, timeout=10, enable_hstore=False) as conn, conn.cursor() as cur:
        await cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def migrate(url: str, schema: str) -> list[str]:
    """Apply migrations/<schema>/NNN_name.sql not yet applied, in order, each once.

    `schema` names the folder (users_db, templates_db, notifications_db); `url` may name a
    database of any name, so tests can migrate their own copies. Returns the files applied.
    """
    await create_database(url)
    files = sorted((MIGRATIONS_DIR / schema).glob("[0-9][0-9][0-9]_*.sql"))
    applied: list[str] = []
    async with aiopg.connect(_dsn(url), timeout=10, enable_hstore=False) as conn, conn.cursor() as cur:
        # Two runners starting together (make run, several containers) must not both apply.
        await cur.execute("SELECT pg_advisory_lock(72616001)")
        try:
            await cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            await cur.execute("SELECT name FROM schema_migrations")
            done = {r[0] for r in await cur.fetchall()}
            for path in files:
                if path.name in done:
                    continue
                await cur.execute("BEGIN")
                try:
                    await cur.execute(path.read_text())
                    await cur.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
                except BaseException:
                    await cur.execute("ROLLBACK")
                    raise
                await cur.execute("COMMIT")
                applied.append(path.name)
                log.info("applied migration %s/%s", schema, path.name)
        finally:
            await cur.execute("SELECT pg_advisory_unlock(72616001)")
    return applied
