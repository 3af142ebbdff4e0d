"""Local HTTP servers that speak the SendGrid and Mailgun send APIs, on 127.0.0.1.

Each checks what the real API checks (credentials, the payload's shape), records what it was
asked to send in one common form, counts every request that reached it, and answers with a
scripted failure when told to."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class Received:
    """One message as a provider was asked to send it, whichever the provider."""

    to: str
    sender: str
    subject: str
    html: str
    text: str
    headers: dict[str, str]
    tracking: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_mime(cls, message: EmailMessage) -> Received:
        html, text = message.get_body(("html",)), message.get_body(("plain",))
        assert html is not None and text is not None, "both an HTML and a text part"
        return cls(
            to=str(message["To"]),
            sender=str(message["From"]),
            subject=str(message["Subject"]),
            html=html.get_content(),
            text=text.get_content(),
            headers={k: str(v) for k, v in message.items()},
        )


@dataclass
class Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class FakeProvider:
    name = ""

    def __init__(self) -> None:
        self.requests = 0
        self.request_times: list[float] = []
        self.received: list[Received] = []
        self.raw: list[Any] = []
        self.failing: Answer | None = None  # answer every request with this while set
        self.script: list[Answer] = []  # answers for the next requests, before `failing`
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def start(self) -> FakeProvider:
        self.server = TestServer(self.app(), host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    def app(self) -> web.Application:
        raise NotImplementedError

    def scripted(self) -> Answer | None:
        if self.script:
            return self.script.pop(0)
        return self.failing

    def to(self, address: str) -> list[Received]:
        return [r for r in self.received if r.to == address]


def _json(answer: Answer) -> web.Response:
    return web.json_response(answer.body, status=answer.status, headers=answer.headers)


class FakeSendGrid(FakeProvider):
    name = "sendgrid"
    api_key = "SG.test-key"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v3/mail/send", self.mail_send)
        return app

    async def mail_send(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.request_times.append(time.monotonic())
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _json(
                Answer(401, {"errors": [{"message": "The provided authorization grant is invalid"}]})
            )
        if (answer := self.scripted()) is not None:
            return _json(answer)
        if request.content_type != "application/json":
            return _json(Answer(415, {"errors": [{"message": "Content-Type must be application/json"}]}))
        body = await request.json()
        self.raw.append(body)
        problems = self.problems(body)
        if problems:
            return _json(Answer(400, {"errors": [{"message": p} for p in problems]}))
        personalization = body["personalizations"][0]
        content = {c["type"]: c["value"] for c in body["content"]}
        self.received.append(
            Received(
                to=personalization["to"][0]["email"],
                sender=body["from"]["email"],
                subject=body["subject"],
                html=content["text/html"],
                text=content["text/plain"],
                headers=body.get("headers", {}),
                tracking={**body.get("custom_args", {}), **personalization.get("custom_args", {})},
            )
        )
        return web.Response(status=202, headers={"X-Message-Id": f"sg-{time.time_ns()}"})

    @staticmethod
    def problems(body: Any) -> list[str]:
        """The rules of v3 Mail Send that a payload of ours could break."""
        found = []
        if not isinstance(body, dict):
            return ["body must be an object"]
        personalizations = body.get("personalizations")
        if not isinstance(personalizations, list) or not personalizations:
            found.append("personalizations: You must have at least one personalization")
        elif not all(p.get("to") and all("email" in t for t in p["to"]) for p in personalizations):
            found.append("personalizations.to: each needs at least one recipient with an email")
        if not isinstance(body.get("from"), dict) or "email" not in body["from"]:
            found.append("from.email: The from object must be provided")
        if not isinstance(body.get("subject"), str) or not body["subject"]:
            found.append("subject: The subject is required")
        content = body.get("content")
        if not isinstance(content, list) or not content:
            found.append("content: at least one content object is required")
        elif content[0].get("type") != "text/plain":
            found.append("content: text/plain must come first")
        for name, value in (body.get("headers") or {}).items():
            if not isinstance(value, str) or name.lower() in ("to", "from", "subject", "content-type"):
                found.append(f"headers.{name}: reserved or not a string")
        for name, value in (body.get("custom_args") or {}).items():
            if not isinstance(value, str):
                found.append(f"custom_args.{name}: must be a string")
        return found


class FakeMailgun(FakeProvider):
    name = "mailgun"
    api_key = "key-test-mailgun"
    domain = "mg.example.com"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v3/{domain}/messages", self.messages)
        return app

    async def messages(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.request_times.append(time.monotonic())
        expected = "Basic " + base64.b64encode(f"api:{self.api_key}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, text="Forbidden")
        if request.match_info["domain"] != self.domain:
            return _json(Answer(404, {"message": "Domain not found: " + request.match_info["domain"]}))
        if (answer := self.scripted()) is not None:
            return _json(answer)
        if request.content_type != "multipart/form-data":
            return _json(Answer(400, {"message": "expected a multipart/form-data body"}))
        form = await request.post()
        fields = {k: str(v) for k, v in form.items()}
        self.raw.append(fields)
        missing = [k for k in ("from", "to", "subject") if not fields.get(k)]
        if missing or not (fields.get("text") or fields.get("html")):
            return _json(Answer(400, {"message": f"'{(missing or ['text'])[0]}' parameter is missing"}))
        self.received.append(
            Received(
                to=fields["to"],
                sender=fields["from"],
                subject=fields["subject"],
                html=fields.get("html", ""),
                text=fields.get("text", ""),
                headers={k[2:]: v for k, v in fields.items() if k.startswith("h:")},
                tracking={k[2:]: v for k, v in fields.items() if k.startswith("v:")},
            )
        )
        return _json(
            Answer(200, {"id": f"<{time.time_ns()}@{self.domain}>", "message": "Queued. Thank you."})
        )
