"""Running a service as a process: the port it listens on and the event loop it runs on."""

from __future__ import annotations

from aiohttp import web

from common.config import Config
from common.keys import SERVICE_KEY


def run(app: web.Application, config: Config, default_port: int) -> None:
    port = config.port or default_port
    print(f"{app[SERVICE_KEY]} listening on http://{config.host}:{port}", flush=True)
    loop = None
    if config.event_loop == "uvloop":
        import uvloop  # only where it is asked for

        loop = uvloop.new_event_loop()
    web.run_app(app, host=config.host, port=port, print=None, shutdown_timeout=15, loop=loop)
