"""`python3 -m scripts.compose_env`: put the secrets docker-compose.yml needs into `.env`.

docker-compose.yml holds no secret values: it reads them from the environment or from `.env`
next to it, and refuses to start while one is missing. This adds each missing one to `.env`
with a fresh random value (URL-safe, because the passwords go into database and broker URLs)
and leaves every value already there alone, so it is safe to run again, also after `make run`
wrote its own `.env`. `.env` is git-ignored and made readable by its owner only.

`--make-run` also adds the settings that point `make run` at the dependencies of the compose file
(`docker compose up -d postgres redis rabbitmq mailpit`), for a machine without PostgreSQL, Redis
or RabbitMQ of its own: the three database URLs and RABBITMQ_URL with the compose users and
passwords, REDIS_URL and SMTP_PORT, at the ports docker-compose.yml publishes on 127.0.0.1.
Here too, a setting already in `.env` is left as it is.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

ENV_FILE = Path(__file__).resolve().parent.parent / ".env"

# name → how to make a value; the names docker-compose.yml marks `${NAME:?...}`.
SECRETS = {
    "GATEWAY_API_KEYS": lambda: f"dev-{secrets.token_urlsafe(24)}",
    "INTERNAL_API_TOKEN": lambda: secrets.token_urlsafe(32),
    "JWT_SECRET": lambda: secrets.token_urlsafe(32),
    "UNSUBSCRIBE_SECRET": lambda: secrets.token_urlsafe(32),
    "POSTGRES_PASSWORD": lambda: secrets.token_urlsafe(24),
    "RABBITMQ_PASSWORD": lambda: secrets.token_urlsafe(24),
    "GRAFANA_ADMIN_PASSWORD": lambda: secrets.token_urlsafe(18),
}


# Where docker-compose.yml publishes its dependencies on 127.0.0.1 (tests/test_deploy.py checks
# that the two agree).
PUBLISHED_PORTS = {"postgres": 15432, "redis": 16379, "rabbitmq": 5672, "mailpit": 11025}


def values(text: str) -> dict[str, str]:
    """Name → non-empty value of each setting in .env text."""
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            value = value.strip().strip("'\"")
            if value:
                found[key.strip().removeprefix("export ").strip()] = value
    return found


def present(text: str) -> set[str]:
    """Names given a non-empty value in .env text."""
    return set(values(text))


def missing_lines(text: str) -> list[str]:
    have = present(text)
    return [f"{name}={make()}" for name, make in SECRETS.items() if name not in have]


def make_run_lines(text: str) -> list[str]:
    """The settings that send `make run` to the compose dependencies, for those .env text (which
    must already hold the compose passwords) lacks."""
    env = values(text)
    # Users and passwords as compose gives them to PostgreSQL and RabbitMQ; quoted, because a
    # password someone chose may hold characters that mean something in a URL.
    pg = f"{quote(env.get('POSTGRES_USER', 'notify'), safe='')}:{quote(env['POSTGRES_PASSWORD'], safe='')}"
    mq = f"{quote(env.get('RABBITMQ_USER', 'notify'), safe='')}:{quote(env['RABBITMQ_PASSWORD'], safe='')}"
    postgres = f"postgresql://{pg}@127.0.0.1:{PUBLISHED_PORTS['postgres']}"
    wanted = {
        "USERS_DB_URL": f"{postgres}/users_db",
        "TEMPLATES_DB_URL": f"{postgres}/templates_db",
        "NOTIFICATIONS_DB_URL": f"{postgres}/notifications_db",
        "RABBITMQ_URL": f"amqp://{mq}@127.0.0.1:{PUBLISHED_PORTS['rabbitmq']}/",
        "REDIS_URL": f"redis://127.0.0.1:{PUBLISHED_PORTS['redis']}/0",
        # SMTP_HOST stays at its default, 127.0.0.1: Mailpit is published there.
        "SMTP_PORT": str(PUBLISHED_PORTS["mailpit"]),
    }
    return [f"{name}={value}" for name, value in wanted.items() if name not in env]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m scripts.compose_env", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--make-run",
        action="store_true",
        help="also point `make run` at `docker compose up -d postgres redis rabbitmq mailpit`",
    )
    args = parser.parse_args(argv)
    text = ENV_FILE.read_text() if ENV_FILE.exists() else ""
    lines = missing_lines(text)
    if args.make_run:
        extra = make_run_lines(text + "\n" + "\n".join(lines))
        if extra:
            lines += ["# make run: the dependencies of docker-compose.yml (compose_env --make-run)", *extra]
    if not lines:
        wanted = "every secret docker compose needs" + (" and the make run settings" if args.make_run else "")
        print(f"compose_env: {ENV_FILE.name} already has {wanted}")
        return 0
    prefix = "" if not text or text.endswith("\n") else "\n"
    header = "" if text else "# Local secrets (make run, docker compose); never committed.\n"
    with ENV_FILE.open("a") as fh:
        fh.write(prefix + header + "\n".join(lines) + "\n")
    ENV_FILE.chmod(0o600)
    names = ", ".join(line.split("=", 1)[0] for line in lines if not line.startswith("#"))
    print(f"compose_env: added {names} to {ENV_FILE.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
