"""SMTP provider (aiosmtplib) with a small pool of reused connections.

Plain, STARTTLS or implicit TLS (SMTP_TLS), with AUTH LOGIN/PLAIN when SMTP_USERNAME and
SMTP_PASSWORD are set: Gmail, for one, is this provider with an app password (docs/email.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiosmtplib

from common.config import Config
from common.delivery.interface import DeliveryError
from providers.email import OutgoingEmail, UnsupportedByProvider, is_transient

log = logging.getLogger("providers.smtp")


def classify(exc: BaseException) -> DeliveryError:
    """An SMTP reply code goes through the failure table; connection trouble is transient.

    Only connection, TLS and authentication trouble, timeouts and 421 ("service not available")
    speak of the server's health; any other reply is about this message or recipient (a 451
    greylisting, a 550 unknown user) and must not open the circuit for everyone's mail."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        text = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
        transient = all(is_transient("smtp", c) for c in codes)
        return DeliveryError(
            f"SMTP {text}", transient=transient, provider="smtp", provider_fault=421 in codes
        )
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return DeliveryError(f"SMTP {exc.code} {exc.message}", transient=True, provider="smtp")
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code > 0:
        return DeliveryError(
            f"SMTP {exc.code} {exc.message}",
            transient=is_transient("smtp", exc.code),
            provider="smtp",
            provider_fault=exc.code == 421,
        )
    kind = "timeout" if isinstance(exc, TimeoutError | aiosmtplib.SMTPTimeoutError) else "network"
    return DeliveryError(
        f"SMTP connection failed: {type(exc).__name__}: {exc}", transient=is_transient(kind), provider="smtp"
    )


def envelope(email: OutgoingEmail) -> tuple[str, list[str]]:
    """MAIL FROM and RCPT TO, given explicitly rather than read back from the headers, so the
    envelope holds exactly one recipient whatever the To header says. Checked again here
    because aiosmtplib writes addresses into commands as they are."""
    sender, recipient = email.sender_address, email.to
    for address in (sender, recipient):
        if any(c in address for c in "\r\n\0<>") or not address.strip():
            raise DeliveryError(
                "refused: an envelope address would inject an SMTP command", transient=False, provider="smtp"
            )
    return sender, [recipient]


async def _options(client: aiosmtplib.SMTP, utf8: bool) -> list[str]:
    """MAIL FROM options: SMTPUTF8 for a non-ASCII address (RFC 6531), when the server offers
    it; without it such an address cannot be sent at all, which another provider may do."""
    if not utf8:
        return []
    if client.last_ehlo_response is None:
        await client.ehlo()
    if not client.supports_extension("smtputf8"):
        raise UnsupportedByProvider(
            "SMTP: the address has non-ASCII characters and the server does not offer SMTPUTF8",
            provider="smtp",
        )
    return ["SMTPUTF8"]


class SmtpProvider:
    name = "smtp"

    def __init__(self, config: Config) -> None:
        self.config = config
        self._idle: asyncio.LifoQueue[aiosmtplib.SMTP] = asyncio.LifoQueue()
        self._slots = asyncio.Semaphore(config.smtp_pool_size or config.worker_prefetch)

    def _client(self) -> aiosmtplib.SMTP:
        c = self.config
        return aiosmtplib.SMTP(
            hostname=c.smtp_host,
            port=c.smtp_port,
            username=c.smtp_username,
            password=c.smtp_password,
            use_tls=c.smtp_tls == "tls",
            start_tls=c.smtp_tls == "starttls",
            timeout=c.smtp_timeout,
        )

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[aiosmtplib.SMTP]:
        try:
            # Bounded: a send waiting behind slow ones must not outlive its claim.
            await asyncio.wait_for(self._slots.acquire(), self.config.smtp_timeout)
        except TimeoutError:
            raise DeliveryError(
                f"no SMTP connection free within {self.config.smtp_timeout:g}s",
                transient=True,
                defer=True,
                provider="smtp",
                provider_fault=False,
            ) from None
        try:
            client = None
            while not self._idle.empty():
                candidate = self._idle.get_nowait()
                if candidate.is_connected:
                    client = candidate
                    break
            if client is None:
                client = self._client()
                await client.connect()
            try:
                yield client
            except BaseException:
                # A connection that saw an error is in an unknown state: drop it.
                with contextlib.suppress(Exception):
                    client.close()
                raise
            self._idle.put_nowait(client)
        finally:
            self._slots.release()

    async def send(self, email: OutgoingEmail) -> str:
        sender, recipients = envelope(email)
        try:
            data = email.to_bytes()
        except ValueError as exc:  # the stdlib's own header guard, behind ours
            raise DeliveryError(f"refused: {exc}", transient=False, provider="smtp") from exc
        utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        for attempt in (1, 2):
            try:
                async with self._connection() as client:
                    await client.sendmail(sender, recipients, data, mail_options=await _options(client, utf8))
                return email.message_id
            except aiosmtplib.SMTPServerDisconnected as exc:
                # A pooled connection the server closed while idle: one fresh try.
                if attempt == 2:
                    raise classify(exc) from exc
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                raise classify(exc) from exc
        raise AssertionError("unreachable")

    async def close(self) -> None:
        while not self._idle.empty():
            client = self._idle.get_nowait()
            with contextlib.suppress(Exception):
                await client.quit()
