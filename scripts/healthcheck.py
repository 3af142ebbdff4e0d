"""Container health check: `python -m scripts.healthcheck` exits 0 when the service is alive.

It asks the service this container runs for `GET /health/live` (liveness: the process answers;
`/health` is the readiness view with every dependency). The port is `$PORT`, else the default
port of the service named on the container's command line (`python email_worker.py` → 8003), so
the image's HEALTHCHECK is right for every service without per-service settings. A container
running a one-shot job (`python -m common.data.migrate`, `python -m topology`) has nothing to check
and is reported healthy. Only the standard library: it runs every few seconds.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

# The ports of DESIGN.md; tests/test_deploy.py checks docker-compose.yml against this table.
SERVICE_PORTS = {
    "gateway": 8000,
    "user_service": 8001,
    "template_service": 8002,
    "email_worker": 8003,
    "push_worker": 8004,
    "inbox_worker": 8005,
}
_ANY_ADDRESS = ("", "0.0.0.0", "::", "[::]")


def service_of(argv: Sequence[str]) -> str | None:
    """The service a command line starts (`python gateway.py` → gateway), or None."""
    for arg in argv:
        name = Path(arg).name
        if name.endswith(".py") and name[:-3] in SERVICE_PORTS:
            return name[:-3]
    return None


def live_url(argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    """Where this container's service answers /health/live; None when it runs no service."""
    service = service_of(argv)
    if service is None:
        return None
    port = int(env.get("PORT") or SERVICE_PORTS[service])
    host = env.get("HOST", "").strip()
    host = "127.0.0.1" if host in _ANY_ADDRESS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/health/live"


def _container_command() -> list[str]:
    """PID 1's command line (the container's command, possibly behind an init such as tini)."""
    try:
        raw = Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def main() -> int:
    url = live_url(_container_command() + sys.argv[1:], os.environ)
    if url is None:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"healthcheck: {url}: answered {response.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
