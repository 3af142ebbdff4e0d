"""Local servers that speak the push providers' protocols, for tests on 127.0.0.1.

FCM: the OAuth2 token endpoint (checks the signed service-account JWT) and messages:send.
OneSignal: POST /notifications. Web Push: a receiver that decrypts the aes128gcm body with the
subscription's private key and verifies the VAPID JWT's signature, audience and subject.
"""

from __future__ import annotations

import base64
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import http_ece
import jwt
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# A scripted answer: (status, json body, headers). Scripts are consumed first, then 200.
Answer = tuple[int, dict[str, Any], dict[str, str]]


@dataclass
class FakeFcm:
    credentials_path: Path
    project_id: str = "notify-test"
    token_requests: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)
    script: dict[str, list[Answer]] = field(default_factory=dict)  # per device token
    auth_status: int = 200
    server: TestServer | None = None

    def __post_init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.credentials_path.write_bytes(
            orjson.dumps(
                {
                    "type": "service_account",
                    "project_id": self.project_id,
                    "client_email": "notify@notify-test.iam.gserviceaccount.com",
                    "private_key": pem,
                }
            )
        )

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/v1/projects/{project}/messages:send", self._send)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        claims = jwt.decode(
            str(form["assertion"]), self._key.public_key(), algorithms=["RS256"], audience=f"{self.url}/token"
        )
        assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
        if self.auth_status != 200:
            return web.json_response({"error": "invalid_grant"}, status=self.auth_status)
        return web.json_response(
            {"access_token": "fcm-access-token", "expires_in": 3600, "token_type": "Bearer"}
        )

    async def _send(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer fcm-access-token":
            return web.json_response({"error": {"status": "UNAUTHENTICATED"}}, status=401)
        assert request.match_info["project"] == self.project_id
        message = (await request.json())["message"]
        queue = self.script.get(message["token"])
        if queue:
            status, body, headers = queue.pop(0)
            return web.json_response(body, status=status, headers=headers)
        self.messages.append(message)
        return web.json_response({"name": f"projects/{self.project_id}/messages/{len(self.messages)}"})


def unregistered() -> Answer:
    return (
        404,
        {
            "error": {
                "code": 404,
                "status": "NOT_FOUND",
                "message": "Requested entity was not found.",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                        "errorCode": "UNREGISTERED",
                    }
                ],
            }
        },
        {},
    )


def unavailable(retry_after: str = "0") -> Answer:
    return (503, {"error": {"status": "UNAVAILABLE", "message": "try later"}}, {"Retry-After": retry_after})


@dataclass
class FakeOneSignal:
    app_id: str = "onesignal-app"
    api_key: str = "onesignal-key"
    requests: list[dict[str, Any]] = field(default_factory=list)
    script: list[Answer] = field(default_factory=list)
    invalid: set[str] = field(default_factory=set)
    server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/notifications", self._notifications)
        return app

    async def _notifications(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Key {self.api_key}":
            return web.json_response({"errors": ["unauthorized"]}, status=403)
        body = await request.json()
        assert body["app_id"] == self.app_id
        if self.script:
            status, scripted, headers = self.script.pop(0)
            return web.json_response(scripted, status=status, headers=headers)
        self.requests.append(body)
        invalid = [s for s in body["include_subscription_ids"] if s in self.invalid]
        answer: dict[str, Any] = {"id": f"os-{len(self.requests)}"}
        if invalid:
            answer["errors"] = {"invalid_subscription_ids": invalid}
        return web.json_response(answer)


@dataclass
class Subscriber:
    """A browser's push subscription: its own key pair and auth secret."""

    id: str
    private_key: ec.EllipticCurvePrivateKey
    auth: bytes

    @classmethod
    def new(cls) -> Subscriber:
        return cls(os.urandom(6).hex(), ec.generate_private_key(ec.SECP256R1()), os.urandom(16))

    def subscription(self, base_url: str) -> dict[str, Any]:
        public = self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return {
            "endpoint": f"{base_url}/push/{self.id}",
            "keys": {"p256dh": b64url(public), "auth": b64url(self.auth)},
        }


@dataclass
class FakePushService:
    vapid_subject: str
    subscribers: dict[str, Subscriber] = field(default_factory=dict)
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    script: dict[str, list[int]] = field(default_factory=dict)
    server: TestServer | None = None

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber.new()
        self.subscribers[subscriber.id] = subscriber
        return subscriber

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/push/{id}", self._push)
        return app

    async def _push(self, request: web.Request) -> web.Response:
        subscriber = self.subscribers[request.match_info["id"]]
        # VAPID: "vapid t=<JWT>, k=<public key>"; the JWT must verify with k, for our origin.
        scheme, _, params = request.headers["Authorization"].partition(" ")
        assert scheme == "vapid"
        fields = dict(p.strip().split("=", 1) for p in params.split(","))
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url_decode(fields["k"]))
        claims = jwt.decode(fields["t"], public, algorithms=["ES256"], audience=self.url)
        assert claims["sub"] == self.vapid_subject and claims["exp"] > time.time()
        assert request.headers["Content-Encoding"] == "aes128gcm" and int(request.headers["TTL"]) > 0
        plain = http_ece.decrypt(
            await request.read(),
            private_key=subscriber.private_key,
            auth_secret=subscriber.auth,
            version="aes128gcm",
        )
        queue = self.script.get(subscriber.id)
        if queue:
            return web.Response(status=queue.pop(0), headers={"Retry-After": "0"})
        self.received.append((subscriber.id, orjson.loads(plain)))
        return web.Response(status=201)


def vapid_key() -> str:
    """A VAPID private key as the raw base64url string VAPID_PRIVATE_KEY takes."""
    key = ec.generate_private_key(ec.SECP256R1())
    return b64url(key.private_numbers().private_value.to_bytes(32, "big"))


async def serve(make_app: Callable[[], web.Application], host: str = "127.0.0.1") -> TestServer:
    server = TestServer(make_app(), host=host)
    await server.start_server()
    return server


def gzip_bomb(inflated: int) -> bytes:
    """`inflated` zero bytes as gzip (about 1/1000 of that), made without holding them."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1024 * 1024)
    out = [packer.compress(block) for _ in range(inflated // len(block))]
    out.append(packer.flush())
    return b"".join(out)


@dataclass
class BombPushService:
    """A Web Push endpoint run by someone hostile: it accepts every push and answers with a body
    that is small on the wire and huge once inflated."""

    inflated: int = 256 * 1024 * 1024
    pushes: int = 0
    server: TestServer | None = None
    _bomb: bytes = b""

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def app(self) -> web.Application:
        self._bomb = gzip_bomb(self.inflated)
        app = web.Application()
        app.router.add_post("/push/{id}", self._push)
        return app

    async def _push(self, request: web.Request) -> web.Response:
        await request.read()
        self.pushes += 1
        return web.Response(
            status=201,
            body=self._bomb,
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )
