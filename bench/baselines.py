"""Baseline servers the gateway is measured against, each in its own process like a service:

- `bare`: an aiohttp handler that reads the JSON body and answers 202 with a small JSON envelope
  — the ceiling for any aiohttp service on this machine;
- `insert`: the same plus one `INSERT … ON CONFLICT DO NOTHING` through an aiopg pool (the
  size the services use) — the least an accepting service that stores what it accepts can do.

`python -m bench.baselines bare|insert --port P [--dsn postgresql://…]`. Both use asyncio's
default event loop, as the services do, so the ratio compares code, not loops.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator

import aiopg
import orjson
from aiohttp import web

POOL_KEY = web.AppKey("pool", aiopg.Pool)

TABLE = """
CREATE TABLE IF NOT EXISTS bench_baseline (
    id          uuid PRIMARY KEY,
    request_id  text NOT NULL UNIQUE,
    body        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
)"""


def _answer(data: dict[str, object]) -> web.Response:
    body = {"success": True, "data": data, "error": None, "message": "accepted", "meta": None}
    return web.Response(body=orjson.dumps(body), status=202, content_type="application/json")


async def bare(request: web.Request) -> web.Response:
    payload = orjson.loads(await request.read())
    return _answer({"notification_id": str(uuid.uuid4()), "request_id": payload["request_id"]})


async def insert(request: web.Request) -> web.Response:
    payload = orjson.loads(await request.read())
    notification_id = uuid.uuid4()
    async with request.app[POOL_KEY].acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "INSERT INTO bench_baseline (id, request_id, body) VALUES (%s, %s, %s)"
            " ON CONFLICT (request_id) DO NOTHING",
            (str(notification_id), payload["request_id"], orjson.dumps(payload).decode()),
        )
    return _answer({"notification_id": str(notification_id), "request_id": payload["request_id"]})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(kind: str, dsn: str | None) -> web.Application:
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/api/v1/notifications/", bare if kind == "bare" else insert)
    if kind == "insert":
        if not dsn:
            raise SystemExit("bench.baselines insert needs --dsn")

        async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
            pool = await aiopg.create_pool(dsn, minsize=1, maxsize=10, enable_hstore=False)
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(TABLE)
            app[POOL_KEY] = pool
            yield
            pool.close()
            await pool.wait_closed()

        app.cleanup_ctx.append(pool_ctx)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines")
    parser.add_argument("kind", choices=("bare", "insert"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn")
    args = parser.parse_args()
    web.run_app(create_app(args.kind, args.dsn), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
