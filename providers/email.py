"""The email provider interface and what every email provider shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Protocol


class HeaderInjection(ValueError):
    """A header value carries CR or LF: it would start a header of its own."""


@dataclass(frozen=True)
class OutgoingEmail:
    to: str
    sender: str
    subject: str
    html: str
    text: str
    message_id: str
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in (
            ("To", self.to),
            ("From", self.sender),
            ("Subject", self.subject),
            *self.headers.items(),
        ):
            if "\r" in value or "\n" in value:
                raise HeaderInjection(f"header {name} contains a line break")

    def to_mime(self) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = self.to
        msg["Subject"] = self.subject
        msg["Message-ID"] = self.message_id
        for name, value in self.headers.items():
            msg[name] = value
        msg.set_content(self.text)
        msg.add_alternative(self.html, subtype="html")
        return msg


def message_id(notification_id: str, sender: str) -> str:
    domain = sender.rsplit("@", 1)[-1].strip("> ") or "localhost"
    return make_msgid(idstring=notification_id.replace("-", ""), domain=domain)


class EmailProvider(Protocol):
    name: str

    async def send(self, email: OutgoingEmail) -> str:
        """Send; return the provider's id for it. Raise DeliveryError on failure."""

    async def close(self) -> None: ...
