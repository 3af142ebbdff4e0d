"""A local server that speaks FCM HTTP v1 for the push benchmark: the OAuth2 token endpoint
(checks the service account's signed JWT, as Google does) and messages:send, which only counts.

`python -m bench.fcm_sink --port P --credentials FILE` writes a fresh service-account file
(project_id, client_email, an RSA key) for the push worker's FCM_CREDENTIALS_FILE, then serves.
GET /count answers how many messages it accepted. Unlike tests/push_servers.FakeFcm it keeps
nothing per message, so its memory stays flat over a long run.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import orjson
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

PROJECT = "notify-bench"
ACCESS_TOKEN = "bench-fcm-access-token"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
KEY_KEY = web.AppKey("key", rsa.RSAPrivateKey)
COUNT_KEY = web.AppKey("count", list)


def write_credentials(path: Path) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    account = {
        "type": "service_account",
        "project_id": PROJECT,
        "client_email": f"notify@{PROJECT}.iam.gserviceaccount.com",
        "private_key": pem,
    }
    path.write_bytes(orjson.dumps(account))
    path.chmod(0o600)
    return key


async def token(request: web.Request) -> web.Response:
    form = await request.post()
    try:
        claims = jwt.decode(
            str(form["assertion"]),
            request.app[KEY_KEY].public_key(),
            algorithms=["RS256"],
            audience=str(request.url.with_query(None)),
        )
    except (KeyError, jwt.PyJWTError) as exc:
        return web.json_response({"error": "invalid_grant", "error_description": str(exc)}, status=400)
    if claims.get("scope") != SCOPE:
        return web.json_response({"error": "invalid_scope"}, status=400)
    return web.json_response({"access_token": ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"})


async def send(request: web.Request) -> web.Response:
    if request.headers.get("Authorization") != f"Bearer {ACCESS_TOKEN}":
        return web.json_response({"error": {"code": 401, "status": "UNAUTHENTICATED"}}, status=401)
    message = orjson.loads(await request.read())["message"]
    counter = request.app[COUNT_KEY]
    counter[0] += 1
    name = f"projects/{request.match_info['project']}/messages/{counter[0]}"
    if not message.get("token"):
        return web.json_response({"error": {"code": 400, "status": "INVALID_ARGUMENT"}}, status=400)
    return web.Response(body=orjson.dumps({"name": name}), content_type="application/json")


async def count(request: web.Request) -> web.Response:
    return web.json_response({"count": request.app[COUNT_KEY][0]})


def create_app(credentials: Path) -> web.Application:
    app = web.Application()
    app[COUNT_KEY] = [0]

    async def key_ctx(app: web.Application) -> AsyncIterator[None]:
        app[KEY_KEY] = write_credentials(credentials)
        yield

    app.cleanup_ctx.append(key_ctx)
    app.router.add_post("/token", token)
    app.router.add_post("/v1/projects/{project}/messages:send", send)
    app.router.add_get("/count", count)
    app.router.add_get("/health", count)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fcm_sink")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--credentials", type=Path, required=True)
    args = parser.parse_args()
    web.run_app(create_app(args.credentials), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
