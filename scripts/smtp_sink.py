"""A development SMTP server that prints each message it receives (what `make run` starts).

`--quiet` only counts what it receives (for benchmarks: printing each email would cost more
than receiving it) and prints the count when stopped. `--port` overrides SMTP_PORT."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from email import message_from_bytes, policy
from typing import Any

from aiosmtpd.controller import Controller


class PrintingHandler:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=policy.default)
        text = message.get_body(("plain", "html"))
        print(
            "\n".join(
                [
                    "=" * 72,
                    f"SMTP sink received mail from {envelope.mail_from} to {', '.join(envelope.rcpt_tos)}",
                    f"Subject: {message['Subject']}",
                    f"X-Notification-ID: {message['X-Notification-ID']}",
                    "",
                    text.get_content().strip() if text is not None else "(no text part)",
                    "=" * 72,
                ]
            ),
            flush=True,
        )
        return "250 Message accepted for delivery"


class CountingHandler:
    def __init__(self) -> None:
        self.received = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received += 1
        return "250 Message accepted for delivery"


async def serve(host: str, port: int, quiet: bool = False) -> None:
    handler = CountingHandler() if quiet else PrintingHandler()
    controller = Controller(handler, hostname=host, port=port)
    controller.start()
    print(f"smtp sink listening on smtp://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        controller.stop()
        if isinstance(handler, CountingHandler):
            print(f"smtp sink received {handler.received} messages", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.smtp_sink")
    parser.add_argument("--port", type=int, default=int(os.environ.get("SMTP_PORT", "1025")))
    parser.add_argument("--quiet", action="store_true", help="count messages instead of printing them")
    args = parser.parse_args()
    asyncio.run(serve(os.environ.get("SMTP_HOST", "127.0.0.1"), args.port, args.quiet))


if __name__ == "__main__":
    main()
