"""`python3 -m scripts.compose_env`: put the secrets docker-compose.yml needs into `.env`.

docker-compose.yml holds no secret values: it reads them from the environment or from `.env`
next to it, and refuses to start while one is missing. This adds each missing one to `.env`
with a fresh random value (URL-safe, because the passwords go into database and broker URLs)
and leaves every value already there alone, so it is safe to run again, also after `make run`
wrote its own `.env`. `.env` is git-ignored and made readable by its owner only.
"""

from __future__ import annotations

import secrets
from pathlib import Path

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


def present(text: str) -> set[str]:
    """Names given a non-empty value in .env text."""
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            if value.strip().strip("'\""):
                names.add(key.strip().removeprefix("export ").strip())
    return names


def missing_lines(text: str) -> list[str]:
    have = present(text)
    return [f"{name}={make()}" for name, make in SECRETS.items() if name not in have]


def main() -> int:
    text = ENV_FILE.read_text() if ENV_FILE.exists() else ""
    lines = missing_lines(text)
    if not lines:
        print(f"compose_env: {ENV_FILE.name} already has every secret docker compose needs")
        return 0
    prefix = "" if not text or text.endswith("\n") else "\n"
    header = "" if text else "# Local secrets (make run, docker compose); never committed.\n"
    with ENV_FILE.open("a") as fh:
        fh.write(prefix + header + "\n".join(lines) + "\n")
    ENV_FILE.chmod(0o600)
    names = ", ".join(line.split("=", 1)[0] for line in lines)
    print(f"compose_env: added {names} to {ENV_FILE.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
