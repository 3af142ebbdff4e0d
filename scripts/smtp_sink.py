"""A development SMTP server that prints each message it receives (what `make run` starts)."""

from __future__ import annotations

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


async def serve(host: str, port: int) -> None:
    controller = Controller(PrintingHandler(), hostname=host, port=port)
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


def main() -> None:
    asyncio.run(serve(os.environ.get("SMTP_HOST", "127.0.0.1"), int(os.environ.get("SMTP_PORT", "1025"))))


if __name__ == "__main__":
    main()
