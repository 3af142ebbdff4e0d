"""A real SMTP server (aiosmtpd) for tests, with scripted answers to make it fail on purpose."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller

from scripts.localenv import free_port


class SmtpSink:
    def __init__(self, *, smtputf8: bool = False) -> None:
        self.port = free_port()
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.attempts: list[float] = []
        # Answers to give to the next DATA commands, before accepting ("451 try later", ...).
        self.script: list[str] = []
        self.delay = 0.0  # seconds each accepted message takes, to keep work in flight
        # Greylisting, as receiving servers do: a recipient's first RCPT is answered 451.
        self.greylist: set[str] = set()  # the recipients it applies to
        self.greylisted: list[str] = []
        # When set, each accepted message is handed to it (with the time it arrived) instead of
        # being kept: a long run (bench/soak.py) would otherwise hold every message in memory.
        self.on_message: Callable[[EmailMessage, float], None] | None = None
        self.received_data = threading.Event()  # set when a DATA arrives, before it is answered
        self._lock = threading.Lock()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, enable_SMTPUTF8=smtputf8)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        with self._lock:
            if address in self.greylist and address not in self.greylisted:
                self.greylisted.append(address)
                return "451 4.7.1 Greylisted, please try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received_data.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        with self._lock:
            self.attempts.append(time.monotonic())
            if self.script:
                return self.script.pop(0)
            message = message_from_bytes(envelope.content, policy=policy.default)
            if self.on_message is not None:
                self.on_message(message, time.monotonic())
                return "250 Message accepted for delivery"
            self.messages.append(message)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"

    def notification_ids(self, to: str | None = None) -> list[str]:
        """What arrived (for one recipient: other tests' stragglers are not this test's)."""
        with self._lock:
            return [str(m["X-Notification-ID"]) for m in self.messages if to is None or m["To"] == to]

    def to(self, address: str) -> list[EmailMessage]:
        with self._lock:
            return [m for m in self.messages if m["To"] == address]
