"""Configuration: one frozen dataclass, read once from the environment.

Defaults are the ones in DESIGN.md, for a machine running PostgreSQL, Redis and RabbitMQ locally.
A malformed value stops the process with a message naming the variable, before anything starts.
"""

from __future__ import annotations

import base64
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

SMTP_TLS_MODES = ("none", "starttls", "tls")
EMAIL_PROVIDER_NAMES = ("smtp", "sendgrid", "mailgun")
LOG_FORMATS = ("json", "text")
QUEUE_TYPES = ("classic", "quorum")


_SECRET_WORDS = ("KEY", "SECRET", "PASSWORD", "TOKEN")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def max_attempts(retry_delays: Sequence[float]) -> int:
    """Attempts in all: the first, and one after each retry delay."""
    return len(retry_delays) + 1


@dataclass(frozen=True, slots=True)
class Config:
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    users_db_url: str = "postgresql://postgres@127.0.0.1:5432/users_db"
    templates_db_url: str = "postgresql://postgres@127.0.0.1:5432/templates_db"
    notifications_db_url: str = "postgresql://postgres@127.0.0.1:5432/notifications_db"
    user_service_url: str = "http://127.0.0.1:8001"
    template_service_url: str = "http://127.0.0.1:8002"
    gateway_api_keys: tuple[str, ...] = ()
    internal_api_token: str = ""
    jwt_secret: str = ""
    jwt_ttl_seconds: int = 3600
    host: str = "127.0.0.1"
    port: int | None = None
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_tls: str = "none"
    smtp_timeout: float = 10.0
    # SMTP connections kept open; 0 sizes the pool to WORKER_PREFETCH, so every message in
    # flight has a connection and none waits behind another.
    smtp_pool_size: int = 0
    email_from: str = "notify@localhost"
    email_providers: tuple[str, ...] = ("smtp",)
    sendgrid_api_key: str | None = None
    sendgrid_base_url: str = "https://api.sendgrid.com"
    mailgun_api_key: str | None = None
    mailgun_domain: str | None = None
    mailgun_base_url: str = "https://api.mailgun.net"
    fcm_credentials_file: str | None = None
    fcm_base_url: str = "https://fcm.googleapis.com"
    fcm_token_url: str = "https://oauth2.googleapis.com/token"
    onesignal_app_id: str | None = None
    onesignal_api_key: str | None = None
    onesignal_base_url: str = "https://api.onesignal.com"
    vapid_private_key: str | None = None
    vapid_subject: str | None = None
    webpush_allowed_hosts: tuple[str, ...] = ()
    max_devices_per_user: int = 20
    push_ttl: int = 86400
    retry_delays: tuple[float, ...] = (1.0, 5.0, 25.0, 125.0, 625.0)
    worker_prefetch: int = 32
    claim_timeout: float = 120.0
    # Seconds a non-final notification may sit unmoved beyond its expected time before the
    # reconciler republishes it from the status store.
    reconcile_after: float = 300.0
    # Seconds between the dispatcher's looks for scheduled notifications that are due: how
    # close to its send_at one is released.
    dispatch_interval: float = 0.5
    # Days notifications and their history are kept; older ones go by whole monthly partitions.
    retention_days: int = 90
    # Bound on every PostgreSQL call (connect, query, waiting for a pooled connection).
    db_timeout: float = 5.0
    # Connections each process keeps open to each of its databases, at most; 0: the service's
    # own (20 for the gateway, whose engines query beside its requests; 10 for the others).
    # Sized against PostgreSQL's max_connections with every process counted.
    db_pool_size: int = 0
    # Hot status-store statements are prepared once per connection (a generic plan). Off behind
    # a pooler in transaction mode (PgBouncer), which cannot keep a session's statements.
    db_prepared_statements: bool = True
    # Load shedding at the gateway (common/web/admission.py): accept requests worked on at once
    # at most (the limit adapts below it), more waiting for a slot, and the time budget: the
    # longest one waits, and the time in hand above which the gateway works on fewer at once.
    accept_concurrency: int = 256
    accept_queue: int = 1024
    accept_time_budget: float = 0.5
    rate_limit: int = 1000
    rate_limit_window: float = 1.0
    login_rate_limit: int = 10
    login_rate_window: float = 60.0
    # Wrong API keys presented from one client address per window (seconds) at the gateway;
    # past it, that address is refused (even with a right key) until the window ends. 0: off.
    wrong_key_limit: int = 30
    wrong_key_window: float = 300.0
    queue_type: str = "classic"
    http_timeout: float = 10.0
    event_loop: str = "uvloop"
    # Gateway processes sharing one port (SO_REUSEPORT) under one parent, each with its own
    # event loop and pools: one per core the gateway may use (common/runner.py).
    gateway_processes: int = 1
    log_level: str = "INFO"
    log_format: str = "json"
    # Email delivery: unsubscribe links, circuit breakers, bounce webhooks.
    public_base_url: str = "http://127.0.0.1:8000"
    unsubscribe_secret: str = ""
    circuit_failure_threshold: int = 5
    circuit_cooldown: float = 30.0
    sendgrid_webhook_public_key: str | None = None
    sendgrid_webhook_secret: str | None = None
    mailgun_webhook_signing_key: str | None = None
    # Client status webhooks: hosts (or host:port) the SSRF guard lets through over http, for
    # local receivers; seconds of failing deliveries after which an endpoint is disabled.
    webhook_allowed_hosts: tuple[str, ...] = ()
    webhook_disable_after: float = 259200.0
    # The operator console (/console): keys that may sign in besides GATEWAY_API_KEYS, how long
    # a session lasts, and the key its cookies are signed with (JWT_SECRET when not set).
    console_keys: tuple[str, ...] = ()
    console_session_ttl: int = 8 * 3600
    console_secret: str = ""
    # The in-app inbox: browser origins (scheme://host[:port]) that may call /api/v1/inbox/
    # from a web page (CORS); none by default.
    inbox_allowed_origins: tuple[str, ...] = ()

    @property
    def client_keys(self) -> tuple[tuple[str, str], ...]:
        """GATEWAY_API_KEYS as (project, key): an entry `project:key` belongs to that project, a
        bare key to project `default`. Several keys of one project share its data."""
        return tuple(_project_key(entry) for entry in self.gateway_api_keys)

    @property
    def console_client_keys(self) -> tuple[tuple[str, str], ...]:
        """CONSOLE_KEYS as (project, key), like GATEWAY_API_KEYS."""
        return tuple(_project_key(entry) for entry in self.console_keys)

    @property
    def rabbitmq_urls(self) -> tuple[str, ...]:
        """RABBITMQ_URL as a list: one URL, or one per node of a cluster (comma-separated)."""
        return _csv(self.rabbitmq_url)

    @property
    def max_attempts(self) -> int:
        return max_attempts(self.retry_delays)

    @property
    def unsubscribe_key(self) -> str:
        """Signs unsubscribe links; JWT_SECRET when UNSUBSCRIBE_SECRET is not set."""
        return self.unsubscribe_secret or self.jwt_secret

    @property
    def console_key(self) -> str:
        """Signs console session cookies; JWT_SECRET when CONSOLE_SECRET is not set."""
        return self.console_secret or self.jwt_secret

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.name.upper()
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            parser = _PARSERS.get(f.name, _str)
            try:
                values[f.name] = parser(raw.strip())
            except ValueError as exc:
                # Secrets are named, never echoed: this message goes to logs.
                shown = name if any(w in name for w in _SECRET_WORDS) else f"{name}={raw!r}"
                raise ConfigError(f"{shown} is not valid: {exc}") from None
        return cls(**values)

    def require(self, *names: str) -> None:
        """Refuse to start without the settings this service cannot work without."""
        missing = [n.upper() for n in names if not getattr(self, n)]
        if missing:
            raise ConfigError(f"{', '.join(missing)} must be set for this service")


def _str(raw: str) -> str:
    return raw


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or a positive whole number")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise ValueError("must be a port number between 1 and 65535")
    return value


_PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _project_key(entry: str) -> tuple[str, str]:
    project, sep, key = entry.partition(":")
    if sep and key and _PROJECT_NAME.match(project):
        return project, key
    return "default", entry


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return parse


def _providers(raw: str) -> tuple[str, ...]:
    names = tuple(p.lower() for p in _csv(raw))
    unknown = [n for n in names if n not in EMAIL_PROVIDER_NAMES]
    if unknown or not names:
        raise ValueError(f"each provider must be one of {', '.join(EMAIL_PROVIDER_NAMES)}")
    return names


def _delays(raw: str) -> tuple[float, ...]:
    delays = tuple(_positive_float(p) for p in _csv(raw))
    if not delays:
        raise ValueError("needs at least one delay in seconds")
    return delays


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"must be a {' or '.join(schemes)} URL with a host")
        return raw.rstrip("/") if parts.scheme.startswith("http") else raw

    return parse


def _amqp_urls(raw: str) -> str:
    """One AMQP URL, or several separated by commas (the nodes of a cluster); kept as given."""
    urls = _csv(raw)
    if not urls:
        raise ValueError("must be an amqp or amqps URL with a host, or several separated by commas")
    check = _url("amqp", "amqps")
    for url in urls:
        check(url)
    return ",".join(urls)


def _origins(raw: str) -> tuple[str, ...]:
    """Web origins, comma-separated: each `http(s)://host[:port]`, nothing after it; `*` is not
    one (the inbox answers each allowed origin by name)."""
    found = []
    for entry in _csv(raw):
        parts = urlsplit(entry)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or port == -1
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username is not None
            or entry.endswith("/")
        ):
            raise ValueError(
                f"{entry!r} is not an origin: write scheme://host[:port], e.g. https://app.example.com"
            )
        found.append(f"{parts.scheme}://{parts.netloc.lower()}")
    return tuple(dict.fromkeys(found))


def _ec_public_key(raw: str) -> str:
    """SendGrid's verification key: base64 DER (as its dashboard shows it) or PEM."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    body = "".join(line for line in raw.splitlines() if not line.startswith("-----"))
    try:
        key = load_der_public_key(base64.b64decode("".join(body.split()), validate=True))
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("must be the base64 verification key SendGrid shows") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("must be an elliptic-curve (ECDSA) public key")
    return "".join(body.split())


def _vapid_private_key(raw: str) -> str:
    """A P-256 private key as PEM (what `vapid --gen` and openssl write, SEC1 or PKCS#8), base64
    DER, or the raw 32-byte scalar in base64url; kept as the raw base64url form."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_der_private_key, load_pem_private_key

    text = raw.replace("\\n", "\n").strip()  # a PEM pasted into one line of an .env file
    key: Any = None
    try:
        if text.startswith("-----BEGIN"):
            key = load_pem_private_key(text.encode(), password=None)
        else:
            compact = "".join(text.split())
            padded = compact + "=" * (-len(compact) % 4)
            decoded = base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_"))
            if len(decoded) == 32:
                key = ec.derive_private_key(int.from_bytes(decoded, "big"), ec.SECP256R1())
            else:
                key = load_der_private_key(decoded, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("must be a P-256 private key: PEM, base64 DER, or 32 raw bytes in base64url")
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    return base64.urlsafe_b64encode(scalar).rstrip(b"=").decode()


def _vapid_subject(raw: str) -> str:
    if not (raw.startswith("mailto:") and "@" in raw) and not raw.startswith("https://"):
        raise ValueError("must be a mailto: address or an https: URL (RFC 8292)")
    return raw


def _log_level(raw: str) -> str:
    value = raw.upper()
    if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return value


_http = _url("http", "https")
_PARSERS: dict[str, Callable[[str], Any]] = {
    "rabbitmq_url": _amqp_urls,
    "redis_url": _url("redis", "rediss"),
    "users_db_url": _url("postgresql", "postgres"),
    "templates_db_url": _url("postgresql", "postgres"),
    "notifications_db_url": _url("postgresql", "postgres"),
    "user_service_url": _http,
    "template_service_url": _http,
    "gateway_api_keys": _csv,
    "jwt_ttl_seconds": _positive_int,
    "port": _port,
    "smtp_port": _port,
    "smtp_tls": _one_of(SMTP_TLS_MODES),
    "smtp_timeout": _positive_float,
    "smtp_pool_size": _non_negative_int,
    "email_providers": _providers,
    "sendgrid_base_url": _http,
    "mailgun_base_url": _http,
    "fcm_base_url": _http,
    "fcm_token_url": _http,
    "onesignal_base_url": _http,
    "retry_delays": _delays,
    "webpush_allowed_hosts": _csv,
    "max_devices_per_user": _positive_int,
    "push_ttl": _positive_int,
    "worker_prefetch": _positive_int,
    "claim_timeout": _positive_float,
    "reconcile_after": _positive_float,
    "dispatch_interval": _positive_float,
    "db_timeout": _positive_float,
    "db_pool_size": _non_negative_int,
    "db_prepared_statements": _flag,
    "retention_days": _positive_int,
    "accept_concurrency": _positive_int,
    "accept_queue": _non_negative_int,
    "accept_time_budget": _positive_float,
    "rate_limit": _non_negative_int,
    "rate_limit_window": _positive_float,
    "login_rate_limit": _non_negative_int,
    "login_rate_window": _positive_float,
    "wrong_key_limit": _non_negative_int,
    "wrong_key_window": _positive_float,
    "queue_type": _one_of(QUEUE_TYPES),
    "http_timeout": _positive_float,
    "event_loop": _one_of(("asyncio", "uvloop")),
    "gateway_processes": _positive_int,
    "log_level": _log_level,
    "log_format": _one_of(LOG_FORMATS),
    "public_base_url": _http,
    "circuit_failure_threshold": _positive_int,
    "circuit_cooldown": _positive_float,
    "sendgrid_webhook_public_key": _ec_public_key,
    "webhook_allowed_hosts": _csv,
    "webhook_disable_after": _positive_float,
    "console_keys": _csv,
    "console_session_ttl": _positive_int,
    "inbox_allowed_origins": _origins,
    "vapid_private_key": _vapid_private_key,
    "vapid_subject": _vapid_subject,
}


def load_config(*required: str, check: Callable[[Config], None] | None = None) -> Config:
    """Read the environment once, for a service's main(); exit 2 with a clear message on error.

    `check` adds a service's own rules about settings that only make sense together."""
    try:
        config = Config.from_env()
        config.require(*required)
        if check is not None:
            check(config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return config
