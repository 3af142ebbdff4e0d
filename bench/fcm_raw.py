"""The e2e push baseline: how fast a plain aiohttp client posts the same FCM HTTP v1 requests
to the same local FCM server (`bench/fcm_sink.py`), with no queue, database or template in
between — what a push worker could reach if sending were all it did.

`python -m bench.fcm_raw --url URL --credentials FILE [--connections 16] [--count 10000]
[--duration 10]` prints JSON {sent, errors, seconds, rate, cpu}. It gets its OAuth2 access token
once, as any client does (a JWT signed with the service account's key), then builds and posts
one `messages:send` request per notification, with the body the push worker sends. Bounded by
count and duration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import orjson

from bench.load import check_loopback

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
DEVICE_TOKEN = "bench-fcm-device-token-0001"


async def access_token(session: aiohttp.ClientSession, url: str, account: dict[str, Any]) -> str:
    now = int(time.time())
    token_url = f"{url}/token"
    assertion = jwt.encode(
        {"iss": account["client_email"], "scope": SCOPE, "aud": token_url, "iat": now, "exp": now + 3600},
        account["private_key"],
        algorithm="RS256",
    )
    form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
    async with session.post(token_url, data=form) as response:
        response.raise_for_status()
        return str((await response.json())["access_token"])


def payload(seq: int) -> bytes:
    """What the push worker posts for the bench's template (title, body, link) and one device."""
    return orjson.dumps(
        {
            "message": {
                "token": DEVICE_TOKEN,
                "notification": {"title": "Hi Ada", "body": "Start here: https://example.com/start"},
                "data": {"notification_id": f"bench-{seq}"},
                "android": {"ttl": "86400s"},
                "webpush": {"fcm_options": {"link": "https://example.com/start"}},
            }
        }
    )


async def run(
    url: str, account: dict[str, Any], connections: int, count: int, duration: float
) -> dict[str, float]:
    check_loopback(urlsplit(url).hostname or "")
    counter = iter(range(count))
    sent = errors = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        token = await access_token(session, url, account)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        send_url = f"{url}/v1/projects/{account['project_id']}/messages:send"
        start = time.perf_counter()
        cpu0 = time.process_time()
        deadline = start + duration

        async def sender() -> None:
            nonlocal sent, errors
            while time.perf_counter() < deadline and (seq := next(counter, None)) is not None:
                try:
                    async with session.post(send_url, data=payload(seq), headers=headers) as response:
                        await response.read()
                        if response.status == 200:
                            sent += 1
                        else:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1

        await asyncio.gather(*(sender() for _ in range(connections)))
        seconds = time.perf_counter() - start
        cpu = (time.process_time() - cpu0) / seconds  # 1.0: the client itself was the limit
    return {"sent": sent, "errors": errors, "seconds": seconds, "rate": sent / seconds, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fcm_raw")
    parser.add_argument("--url", required=True)
    parser.add_argument("--credentials", type=Path, required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    account = orjson.loads(args.credentials.read_bytes())
    result = asyncio.run(run(args.url, account, args.connections, args.count, args.duration))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
