"""The e2e email baseline: how fast plain aiosmtplib delivers to the same SMTP sink, with no
queue, database or template in between — what a worker could reach if sending were all it did.

`python -m bench.smtp_raw --port P [--connections 16] [--count 5000] [--duration 10]` prints
JSON {sent, errors, seconds, rate, cpu}. Each message is built as an EmailMessage with an HTML and a
text part and the usual headers, as the email worker's are, because building it is part of the
cost of sending one. Bounded by count and duration.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import time
from email.message import EmailMessage

import aiosmtplib

from bench.load import check_loopback

HTML = (
    "<p>Hello Ada, start here: <a href='https://example.com/start'>https://example.com/start</a></p>"
    "<p style='font-size:small'><a href='http://127.0.0.1:8000/api/v1/unsubscribe/x'>Unsubscribe</a></p>"
)
TEXT = "Hello Ada, start here: https://example.com/start\n\nUnsubscribe: http://127.0.0.1:8000/u/x\n"


TO = "ada@example.com"


def build(seq: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "notify@localhost"
    msg["To"] = "ada@example.com"
    msg["Subject"] = "Welcome, Ada!"
    msg["Message-ID"] = email.utils.make_msgid(idstring=f"bench{seq}", domain="localhost")
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["X-Notification-ID"] = f"bench-{seq}"
    msg["List-Unsubscribe"] = "<http://127.0.0.1:8000/api/v1/unsubscribe/x>"
    msg.set_content(TEXT)
    msg.add_alternative(HTML, subtype="html")
    return msg


async def run(host: str, port: int, connections: int, count: int, duration: float) -> dict[str, float]:
    check_loopback(host)
    counter = iter(range(count))
    sent = errors = 0
    clients = [aiosmtplib.SMTP(hostname=host, port=port, timeout=10) for _ in range(connections)]
    for client in clients:
        await client.connect()
    start = time.perf_counter()
    cpu0 = time.process_time()
    deadline = start + duration

    async def sender(client: aiosmtplib.SMTP) -> None:
        nonlocal sent, errors
        while time.perf_counter() < deadline and (seq := next(counter, None)) is not None:
            try:
                await client.send_message(build(seq), sender="notify@localhost", recipients=[TO])
                sent += 1
            except (aiosmtplib.SMTPException, OSError):
                errors += 1

    await asyncio.gather(*(sender(c) for c in clients))
    seconds = time.perf_counter() - start
    cpu = (time.process_time() - cpu0) / seconds  # 1.0: the sender itself was the limit
    for client in clients:
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError):
            client.close()
    return {"sent": sent, "errors": errors, "seconds": seconds, "rate": sent / seconds, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.smtp_raw")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    result = asyncio.run(run(args.host, args.port, args.connections, args.count, args.duration))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
