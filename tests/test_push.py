"""Push worker: FCM, OneSignal and Web Push against local servers that speak their protocols."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from common.config import Config, ConfigError
from common.delivery.egress import (
    REPLY_CAP,
    NonPublicAddress,
    UnsafeEndpoint,
    check_endpoint,
    guarded_session,
    read_capped,
)
from tests.conftest import Stack
from tests.processes import ROOT, ServiceProcess
from tests.push_servers import (
    BombPushService,
    FakeFcm,
    FakeOneSignal,
    FakePushService,
    Subscriber,
    gzip_bomb,
    serve,
    unavailable,
    unregistered,
    vapid_key,
)

VAPID_SUBJECT = "mailto:ops@example.com"


@dataclass
class Push:
    stack: Stack
    fcm: FakeFcm
    onesignal: FakeOneSignal
    webpush: FakePushService

    async def user_with(self, *devices: dict[str, Any]) -> dict[str, Any]:
        user = await self.stack.create_user()
        for device in devices:
            response = await self.stack.gateway.post(
                f"/api/v1/users/{user['id']}/devices", json=device, headers=self.stack.headers()
            )
            assert response.status == 201, await response.text()
        return user

    async def devices(self, user_id: str) -> list[dict[str, Any]]:
        response = await self.stack.gateway.get(
            f"/api/v1/users/{user_id}/devices", headers=self.stack.headers()
        )
        return list((await response.json())["data"])

    async def template(self) -> str:
        code = f"push-{time.time_ns()}"
        await self.stack.create_template(
            code,
            notification_type="push",
            subject=None,
            title="Hi {{ name }}",
            body="Your order {{ order }} shipped",
            image_url="https://img.example.com/{{ order }}.png",
            link="https://shop.example.com/orders/{{ order }}",
        )
        return code

    async def send(self, user_id: str, code: str) -> str:
        status, body, _ = await self.stack.send(
            {
                "notification_type": "push",
                "user_id": user_id,
                "template_code": code,
                "variables": {"name": "Ada", "order": "A-17"},
                "request_id": str(uuid.uuid4()),
            }
        )
        assert status == 202, body
        return str(body["data"]["notification_id"])


@pytest.fixture
async def push(stack_factory: Any, tmp_path: Path) -> AsyncIterator[Push]:
    fcm = FakeFcm(tmp_path / "service-account.json")
    onesignal = FakeOneSignal()
    webpush = FakePushService(VAPID_SUBJECT)
    fcm.server = await serve(fcm.app)
    onesignal.server = await serve(onesignal.app)
    webpush.server = await serve(webpush.app)
    stack = await stack_factory(
        push=True,
        fcm_credentials_file=str(fcm.credentials_path),
        fcm_base_url=fcm.url,
        fcm_token_url=f"{fcm.url}/token",
        onesignal_app_id=onesignal.app_id,
        onesignal_api_key=onesignal.api_key,
        onesignal_base_url=str(onesignal.server.make_url("")).rstrip("/"),
        vapid_private_key=vapid_key(),
        vapid_subject=VAPID_SUBJECT,
        webpush_allowed_hosts=("127.0.0.1",),
    )
    yield Push(stack, fcm, onesignal, webpush)
    for server in (fcm.server, onesignal.server, webpush.server):
        await server.close()


async def test_web_push_payload_decrypts_to_the_rendered_notification(push: Push) -> None:
    subscriber = push.webpush.subscribe()
    user = await push.user_with(
        {"platform": "webpush", "subscription": subscriber.subscription(push.webpush.url)}
    )
    notification_id = await push.send(user["id"], await push.template())
    record = await push.stack.wait_for(notification_id, "delivered")
    assert record["provider"] == "webpush"
    [(receiver, payload)] = push.webpush.received
    assert receiver == subscriber.id
    assert payload == {
        "title": "Hi Ada",
        "body": "Your order A-17 shipped",
        "image": "https://img.example.com/A-17.png",
        "link": "https://shop.example.com/orders/A-17",
        "notification_id": notification_id,
    }


async def test_all_three_providers_and_a_dead_token_is_pruned(push: Push) -> None:
    subscriber = push.webpush.subscribe()
    push.fcm.script["dead-fcm-token"] = [unregistered()]
    user = await push.user_with(
        {"platform": "fcm", "token": "live-fcm-token"},
        {"platform": "fcm", "token": "dead-fcm-token"},
        {"platform": "onesignal", "token": "os-sub-1"},
        {"platform": "webpush", "subscription": subscriber.subscription(push.webpush.url)},
    )
    notification_id = await push.send(user["id"], await push.template())
    record = await push.stack.wait_for(notification_id, "delivered")
    assert set(record["provider"].split(",")) == {"fcm", "onesignal", "webpush"}

    [fcm_message] = push.fcm.messages
    assert fcm_message["token"] == "live-fcm-token"
    assert fcm_message["notification"] == {
        "title": "Hi Ada",
        "body": "Your order A-17 shipped",
        "image": "https://img.example.com/A-17.png",
    }
    assert fcm_message["webpush"]["fcm_options"]["link"] == "https://shop.example.com/orders/A-17"
    assert fcm_message["data"]["notification_id"] == notification_id
    [onesignal_request] = push.onesignal.requests
    assert onesignal_request["include_subscription_ids"] == ["os-sub-1"]
    assert onesignal_request["headings"]["en"] == "Hi Ada"
    assert onesignal_request["contents"]["en"] == "Your order A-17 shipped"
    assert onesignal_request["big_picture"] == "https://img.example.com/A-17.png"
    assert onesignal_request["url"] == "https://shop.example.com/orders/A-17"
    assert onesignal_request["idempotency_key"] == notification_id
    assert len(push.webpush.received) == 1

    # One result per device in the history, and the dead token is gone from the user.
    device_results = {(h["provider"], h["status"]) for h in record["history"] if h["device"]}
    assert device_results == {
        ("fcm", "delivered"),
        ("fcm", "removed"),
        ("onesignal", "delivered"),
        ("webpush", "delivered"),
    }
    tokens = {d["token"] for d in await push.devices(user["id"])}
    assert "dead-fcm-token" not in tokens and "live-fcm-token" in tokens and len(tokens) == 3


async def test_gone_subscriptions_are_removed(push: Push) -> None:
    gone = push.webpush.subscribe()
    push.webpush.script[gone.id] = [410]
    push.onesignal.invalid = {"os-dead"}
    user = await push.user_with(
        {"platform": "webpush", "subscription": gone.subscription(push.webpush.url)},
        {"platform": "onesignal", "token": "os-dead"},
        {"platform": "onesignal", "token": "os-live"},
    )
    notification_id = await push.send(user["id"], await push.template())
    await push.stack.wait_for(notification_id, "delivered")
    assert [d["token"] for d in await push.devices(user["id"])] == ["os-live"]


async def test_a_503_is_retried_only_for_the_device_that_failed(push: Push) -> None:
    push.onesignal.script = [unavailable()]
    user = await push.user_with(
        {"platform": "fcm", "token": "fcm-ok"}, {"platform": "onesignal", "token": "os-1"}
    )
    notification_id = await push.send(user["id"], await push.template())
    record = await push.stack.wait_for(notification_id, "delivered", timeout=20)
    assert record["attempts"] == 2
    assert len(push.fcm.messages) == 1  # not sent again on the retry
    assert len(push.onesignal.requests) == 1  # the retry, after the 503
    statuses = [h["status"] for h in record["history"] if not h["device"]]
    assert statuses == ["pending", "sending", "retrying", "sending", "delivered"]
    assert push.fcm.token_requests == 1  # the access token is cached


async def test_fcm_credentials_rejected_is_a_failure_not_a_retry(push: Push) -> None:
    push.fcm.auth_status = 401
    user = await push.user_with({"platform": "fcm", "token": "t"})
    notification_id = await push.send(user["id"], await push.template())
    record = await push.stack.wait_for(notification_id, "failed")
    assert record["attempts"] == 1 and "FCM auth failed: 401" in record["error"]


async def test_a_user_without_devices_fails_with_the_reason(push: Push) -> None:
    user = await push.user_with()
    notification_id = await push.send(user["id"], await push.template())
    record = await push.stack.wait_for(notification_id, "failed")
    assert record["error"] == "the user has no push devices"


class Listener:
    """A TCP listener that only counts connections: nothing may ever arrive."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self, host: str) -> int:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(accept, host, 0)
        return int(self.server.sockets[0].getsockname()[1])


async def test_unsafe_subscription_endpoints_are_refused_before_connecting(push: Push) -> None:
    listeners = []
    endpoints = []
    for host, scheme in (("127.0.0.2", "http"), ("127.0.0.2", "https"), ("::1", "https")):
        listener = Listener()
        port = await listener.start(host)
        listeners.append(listener)
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        endpoints.append(f"{scheme}://{netloc}/push/x")
    subscriber = push.webpush.subscribe()
    keys = subscriber.subscription(push.webpush.url)["keys"]

    # Plain http is refused at registration already...
    user = await push.stack.create_user()
    response = await push.stack.gateway.post(
        f"/api/v1/users/{user['id']}/devices",
        json={"platform": "webpush", "subscription": {"endpoint": endpoints[0], "keys": keys}},
        headers=push.stack.headers(),
    )
    assert response.status == 400
    # ...and the https ones to loopback addresses are refused by the worker.
    user = await push.user_with(
        *({"platform": "webpush", "subscription": {"endpoint": e, "keys": keys}} for e in endpoints[1:])
    )
    notification_id = await push.send(user["id"], await push.template())
    record = await push.stack.wait_for(notification_id, "failed")
    assert record["error"].startswith("no device accepted it")
    refusals = [h["detail"] for h in record["history"] if h["device"]]
    assert len(refusals) == 2 and all("refused" in d and "not a public address" in d for d in refusals)
    await asyncio.sleep(0.2)
    assert [listener.connections for listener in listeners] == [0, 0, 0]
    for listener in listeners:
        assert listener.server is not None
        listener.server.close()


def test_the_endpoint_check_itself() -> None:
    allowed = frozenset({"127.0.0.1"})
    for endpoint in (
        "http://push.example.com/x",
        "https://127.0.0.2/x",
        "https://[::1]/x",
        "https://10.0.0.1/x",
        "https://169.254.169.254/latest",
        "https://[::ffff:127.0.0.1]/x",
        "https:///x",
        "https://[64:ff9b::7f00:1]/x",  # NAT64 of 127.0.0.1
        "https://[64:ff9b::a9fe:a9fe]/latest",  # NAT64 of 169.254.169.254
        "https://[64:ff9b:1::808:808]/x",  # local-use NAT64: never plainly public
        "https://[2002:a00:1::]/x",  # 6to4 of 10.0.0.1
        "https://[2002:7f00:1::1]/x",  # 6to4 of 127.0.0.1
        "https://[2001:0:4136:e378:8000:63bf:80ff:fffe]/x",  # Teredo, client 127.0.0.1
        "https://[::7f00:1]/x",  # IPv4-compatible 127.0.0.1
        "https://[::a00:1]/x",  # IPv4-compatible 10.0.0.1
        "https://[::ffff:a00:1]/x",  # IPv4-mapped 10.0.0.1
    ):
        with pytest.raises(UnsafeEndpoint):
            check_endpoint(endpoint, allowed)
    check_endpoint("https://fcm.googleapis.com/fcm/send/abc", allowed)  # a name: the resolver decides
    check_endpoint("https://[64:ff9b::808:808]/x", allowed)  # NAT64 of a public address
    check_endpoint("https://[2002:808:808::1]/x", allowed)  # 6to4 of a public address
    check_endpoint("https://[2001:4860:4860::8888]/x", allowed)  # plain public IPv6
    check_endpoint("http://127.0.0.1:9999/push/1", allowed)  # allow-listed for tests


async def test_the_connector_refuses_non_public_addresses_in_any_spelling_before_connecting() -> None:
    """Smuggled past the check at creation (a row written some other way), a loopback endpoint
    in each spelling still reaches no listener: the connector judges the address it would use,
    IP literals included (yarl folds full-width and circled digits to ASCII ones, and aiohttp
    hands those to the socket without asking a resolver)."""
    connections = 0

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    guarded = guarded_session(frozenset(), 3)
    allowed = guarded_session(frozenset({"127.0.0.1"}), 3)
    try:
        for url in (
            f"https://127.0.0.1:{port}/",
            f"https://\uff11\uff12\uff17.\uff10.\uff10.\uff11:{port}/",  # full-width digits
            f"https://localhost:{port}/",  # a name that resolves to loopback
            "https://\u246f\u2468.\u2461\u2464\u2463.\u246f\u2468.\u2461\u2464\u2463/",  # 169.254.169.254
        ):
            with pytest.raises(aiohttp.ClientError) as caught:
                async with guarded.post(url, data=b"{}", allow_redirects=False):
                    pass
            assert isinstance(getattr(caught.value, "os_error", None), NonPublicAddress), (url, caught.value)
        assert connections == 0
        # Allow-listed, the same listener is reached (it hangs up at once: the connection counts).
        with contextlib.suppress(aiohttp.ClientError):
            async with allowed.post(f"http://127.0.0.1:{port}/", data=b"{}"):
                pass
    finally:
        await guarded.close()
        await allowed.close()
        server.close()
        await server.wait_closed()
    assert connections == 1


def _peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_a_gzip_bomb_endpoint_does_not_grow_the_push_worker(stack_factory: Any, tmp_path: Path) -> None:
    """Three pushes to an endpoint answering 256 MB of zeros as ~250 KB of gzip: the worker
    reads at most 64 KiB of a reply and never inflates it."""
    bomb, honest = BombPushService(), FakePushService(VAPID_SUBJECT)
    bomb.server = await serve(bomb.app)
    honest.server = await serve(honest.app)
    stack = await stack_factory(
        workers=False,
        vapid_private_key=vapid_key(),
        vapid_subject=VAPID_SUBJECT,
        webpush_allowed_hosts=("127.0.0.1",),
    )
    worker = ServiceProcess("push_worker.py", stack.config, tmp_path / "push_worker.log")
    await worker.start()
    try:
        push = Push(stack, None, None, honest)  # type: ignore[arg-type]
        code = await push.template()
        warm = await push.user_with(
            {"platform": "webpush", "subscription": honest.subscribe().subscription(honest.url)}
        )
        await stack.wait_for(await push.send(warm["id"], code), "delivered")
        assert worker.process is not None
        baseline = _peak_rss(worker.process.pid)

        victim = await push.user_with(
            {"platform": "webpush", "subscription": Subscriber.new().subscription(bomb.url)}
        )
        for _ in range(3):
            record = await stack.wait_for(await push.send(victim["id"], code), "delivered", "failed")
            assert record["status"] == "delivered", record["error"]
        assert bomb.pushes == 3
        grown = _peak_rss(worker.process.pid) - baseline
        assert grown < 64 * 1024 * 1024, f"peak RSS grew by {grown / 1024**2:.0f} MiB"
    finally:
        worker.stop()
        await bomb.server.close()
        await honest.server.close()


async def test_a_reply_is_read_up_to_the_cap_and_never_inflated() -> None:
    big = b"x" * (5 * 1024 * 1024)
    bomb = gzip_bomb(64 * 1024 * 1024)

    async def plain(request: web.Request) -> web.Response:
        return web.Response(status=400, body=big)

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(status=400, body=bomb, headers={"Content-Encoding": "gzip"})

    def make_app() -> web.Application:
        app = web.Application()
        app.router.add_post("/plain", plain)
        app.router.add_post("/gzip", gzipped)
        return app

    server = await serve(make_app)
    session = guarded_session(frozenset({"127.0.0.1"}), 10)
    try:
        base = str(server.make_url("")).rstrip("/")
        async with session.post(base + "/plain") as response:
            assert len(await read_capped(response)) == REPLY_CAP
        async with session.post(base + "/gzip") as response:
            assert await read_capped(response) == "(gzip reply not read)"
    finally:
        await session.close()
        await server.close()


async def test_devices_per_user_are_capped_and_tokens_fit_the_index(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False, max_devices_per_user=3)
    user = await stack.create_user()

    async def register(token: str) -> tuple[int, dict[str, Any]]:
        response = await stack.gateway.post(
            f"/api/v1/users/{user['id']}/devices",
            json={"platform": "fcm", "token": token},
            headers=stack.headers(),
        )
        return response.status, await response.json()

    for n in range(3):
        status, body = await register(f"token-{n}")
        assert status == 201, body
    status, body = await register("token-3")
    assert status == 409 and body["error"] == "too_many_devices"
    assert "MAX_DEVICES_PER_USER" in body["message"] and "3" in body["message"]
    status, _ = await register("token-1")  # the same token again is the same device: allowed
    assert status == 201

    other = await stack.create_user()
    # A token that does not compress and would not fit the unique index: 400, not 503.
    for token in (os.urandom(1800).hex(), "tökén-ünïcode", "has space"):
        response = await stack.gateway.post(
            f"/api/v1/users/{other['id']}/devices",
            json={"platform": "fcm", "token": token},
            headers=stack.headers(),
        )
        body = await response.json()
        assert response.status == 400 and "token" in body["data"]["fields"], body


def _vapid_forms() -> tuple[str, dict[str, str]]:
    """One P-256 key in each form VAPID_PRIVATE_KEY accepts, and its raw base64url form."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    raw = base64.urlsafe_b64encode(key.private_numbers().private_value.to_bytes(32, "big")).rstrip(b"=")
    sec1 = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.TraditionalOpenSSL, s.NoEncryption())
    pkcs8 = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    der = key.private_bytes(s.Encoding.DER, s.PrivateFormat.PKCS8, s.NoEncryption())
    return raw.decode(), {
        "raw": raw.decode(),
        "pem_sec1": sec1.decode(),  # openssl ecparam -genkey
        "pem_pkcs8": pkcs8.decode(),  # vapid --gen
        "pem_one_line": sec1.decode().replace("\n", "\\n"),  # pasted into .env
        "der_base64": base64.b64encode(der).decode(),
        "der_base64url": base64.urlsafe_b64encode(der).decode().rstrip("="),
    }


def test_vapid_private_key_is_taken_as_pem_der_or_raw() -> None:
    raw, forms = _vapid_forms()
    for name, value in forms.items():
        assert Config.from_env({"VAPID_PRIVATE_KEY": value}).vapid_private_key == raw, name
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for bad in ("not a key", rsa_pem.decode(), base64.b64encode(b"x" * 31).decode()):
        with pytest.raises(ConfigError, match="VAPID_PRIVATE_KEY") as caught:
            Config.from_env({"VAPID_PRIVATE_KEY": bad})
        assert bad not in str(caught.value)  # a secret is named, never echoed


async def test_the_push_worker_starts_with_a_pem_vapid_key_and_delivers(
    stack_factory: Any, tmp_path: Path
) -> None:
    _, forms = _vapid_forms()
    honest = FakePushService(VAPID_SUBJECT)
    honest.server = await serve(honest.app)
    stack = await stack_factory(
        workers=False, vapid_subject=VAPID_SUBJECT, webpush_allowed_hosts=("127.0.0.1",)
    )
    worker = ServiceProcess("push_worker.py", stack.config, tmp_path / "push_worker.log")
    worker.env["VAPID_PRIVATE_KEY"] = forms["pem_pkcs8"]
    await worker.start()
    try:
        push = Push(stack, None, None, honest)  # type: ignore[arg-type]
        subscriber = honest.subscribe()
        user = await push.user_with(
            {"platform": "webpush", "subscription": subscriber.subscription(honest.url)}
        )
        record = await stack.wait_for(
            await push.send(user["id"], await push.template()), "delivered", "failed"
        )
        assert record["status"] == "delivered", record["error"]
        assert len(honest.received) == 1  # the receiver verified the VAPID signature
    finally:
        worker.stop()
        await honest.server.close()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (
            {"VAPID_PRIVATE_KEY": "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----"},
            "VAPID_PRIVATE_KEY",
        ),
        ({"VAPID_SUBJECT": "ops@example.com"}, "VAPID_SUBJECT"),
        ({"VAPID_SUBJECT": "mailto:ops@example.com"}, "VAPID_PRIVATE_KEY and VAPID_SUBJECT"),
        ({"ONESIGNAL_APP_ID": "app"}, "ONESIGNAL_API_KEY"),
        ({"FCM_CREDENTIALS_FILE": "/nonexistent/service-account.json"}, "FCM_CREDENTIALS_FILE"),
        ({"FCM_CREDENTIALS_FILE": "/etc/hostname"}, "FCM_CREDENTIALS_FILE"),
    ],
)
def test_the_push_worker_refuses_bad_provider_settings_in_one_line(
    settings: dict[str, str], named: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
    env.update(INTERNAL_API_TOKEN="t" * 20, **settings)
    result = subprocess.run(
        [sys.executable, "push_worker.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("configuration error:") and named in lines[0], lines
    assert "Traceback" not in result.stderr and "broken" not in result.stderr
