"""The email provider interface and what every email provider shares: the message, the header
guard, and the one table that classifies provider failures as transient or permanent."""

from __future__ import annotations

import email.generator
import email.policy
import email.utils
import io
import re
import time
from dataclasses import dataclass, field
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import make_msgid
from typing import Protocol

from common.delivery.interface import DeliveryError


class HeaderInjection(ValueError):
    """A header value carries CR or LF (it would start a header of its own), or the recipient
    is not one plain address (it would add recipients)."""


# One bare addr-spec and nothing else: no display name, no second address, no whitespace.
# Validated addresses from the user service always pass; anything that could smuggle a second
# RCPT TO or header through a provider does not.
_BARE_ADDRESS = re.compile(r"^[^\s@,;<>()\[\]\"\\]{1,64}@[^\s@,;<>()\[\]\"\\]{1,255}$")


@dataclass(frozen=True)
class OutgoingEmail:
    to: str
    sender: str
    subject: str
    html: str
    text: str
    message_id: str
    headers: dict[str, str] = field(default_factory=dict)
    # Carried by the provider and handed back in its events (SendGrid custom_args, Mailgun
    # v: variables), so a bounce webhook can name the notification.
    tracking: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse line breaks in any header and anything but one plain recipient address."""
        for name, value in (
            ("To", self.to),
            ("From", self.sender),
            ("Subject", self.subject),
            ("Message-ID", self.message_id),
            *self.headers.items(),
            *self.tracking.items(),
        ):
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise HeaderInjection(f"header {name!r} contains a line break")
        if not _BARE_ADDRESS.match(self.to):
            raise HeaderInjection("the recipient must be exactly one plain address")

    @property
    def sender_address(self) -> str:
        return email.utils.parseaddr(self.sender)[1] or self.sender

    @property
    def sender_name(self) -> str:
        return email.utils.parseaddr(self.sender)[0]

    def to_mime(self) -> Message:
        """The MIME message: text and HTML alternatives, UTF-8.

        Built with the compat32 classes rather than EmailMessage: header values were checked
        for line breaks above, and the modern policy's header parsing and refolding cost about
        four times as much per message, a fifth of a worker's CPU.
        """
        self.check()  # again here: the compat32 classes below do not refuse line breaks themselves
        msg = MIMEMultipart("alternative", policy=_POLICY)
        name, address = email.utils.parseaddr(self.sender)
        msg["From"] = email.utils.formataddr((name, address), charset="utf-8") if name else self.sender
        # compat32 writes a header raw (under an 8bit policy) only when it holds surrogates:
        # the stdlib's own spelling of "these are already bytes".
        msg["To"] = self.to if self.to.isascii() else self.to.encode().decode("ascii", "surrogateescape")
        msg["Subject"] = _header(self.subject)
        msg["Message-ID"] = self.message_id
        msg["Date"] = email.utils.formatdate(localtime=False)
        for name, value in self.headers.items():
            msg[name] = _header(value)
        msg.attach(MIMEText(self.text, "plain", "utf-8", policy=_POLICY))
        msg.attach(MIMEText(self.html, "html", "utf-8", policy=_POLICY))
        return msg

    def to_bytes(self) -> bytes:
        """The message as sent over SMTP (CRLF line ends), flattened with our policy."""
        out = io.BytesIO()
        # A non-ASCII address goes out only with SMTPUTF8, whose headers are raw UTF-8 (RFC 6532):
        # an encoded word in an address is not an address.
        cte_type = "7bit" if self.to.isascii() else "8bit"
        policy = _POLICY.clone(linesep="\r\n", cte_type=cte_type)
        email.generator.BytesGenerator(out, policy=policy).flatten(self.to_mime())
        return out.getvalue()


def _header(value: str) -> str:
    return value if value.isascii() else Header(value, "utf-8").encode()


# Fold only past RFC 5322's hard limit: a folded Message-ID would start with a space.
_POLICY = email.policy.compat32.clone(max_line_length=998)


def message_id(notification_id: str, sender: str) -> str:
    domain = sender.rsplit("@", 1)[-1].strip("> ") or "localhost"
    return make_msgid(idstring=notification_id.replace("-", ""), domain=domain)


class EmailProvider(Protocol):
    name: str

    async def send(self, email: OutgoingEmail) -> str:
        """Send; return the provider's id for it. Raise DeliveryError on failure."""

    async def close(self) -> None: ...


# --- failure classes -----------------------------------------------------------------------


class UnsupportedByProvider(DeliveryError):
    """This provider cannot take this message (a non-ASCII address without SMTPUTF8), though
    another might: permanent for this provider, and the next one in EMAIL_PROVIDERS is tried."""

    def __init__(self, reason: str, provider: str) -> None:
        super().__init__(reason, transient=False, provider=provider)


TRANSIENT, PERMANENT = True, False

# The one table that decides retry (transient: another attempt, or another provider, may
# succeed) against failed (permanent: the same message would be refused again). First match
# wins; `None` codes match any failure of that kind.
FAILURE_CLASSES: tuple[tuple[str, range | None, bool], ...] = (
    ("smtp", range(400, 500), TRANSIENT),  # 421 busy, 450/451 try later, 452 storage
    ("smtp", range(500, 600), PERMANENT),  # 550 no such mailbox, 552 too big, 554 rejected
    ("http", range(429, 430), TRANSIENT),  # rate limited: honour Retry-After
    ("http", range(500, 600), TRANSIENT),  # the provider's own trouble
    ("http", range(400, 500), PERMANENT),  # 400 bad message, 401/403 key, 413 too large, ...
    ("timeout", None, TRANSIENT),
    ("network", None, TRANSIENT),  # refused, reset, DNS: the provider may be back soon
)
# Answers no row names (an HTTP redirect, an SMTP 3xx where 2xx belongs) say the provider
# is not working as expected: worth another provider and a later attempt, not a failed mail.
UNLISTED = TRANSIENT


def is_transient(kind: str, code: int | None = None) -> bool:
    for row_kind, codes, transient in FAILURE_CLASSES:
        if row_kind == kind and (codes is None or (code is not None and code in codes)):
            return transient
    return UNLISTED


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is true too, and float() refuses it
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def http_failure(provider: str, status: int, detail: str, retry_after: str | None = None) -> DeliveryError:
    """The DeliveryError for an HTTP answer that is not a success, with the provider's text."""
    text = " ".join(detail.split())[:500]
    return DeliveryError(
        f"{provider}: HTTP {status}" + (f" {text}" if text else ""),
        transient=is_transient("http", status),
        provider=provider,
        retry_after=retry_after_seconds(retry_after) if status == 429 or status >= 500 else None,
    )


def connection_failure(provider: str, exc: BaseException) -> DeliveryError:
    kind = "timeout" if isinstance(exc, TimeoutError) else "network"
    what = "timed out" if kind == "timeout" else "unreachable"
    return DeliveryError(
        f"{provider}: {what}: {type(exc).__name__} {exc}".rstrip(),
        transient=is_transient(kind),
        provider=provider,
    )
