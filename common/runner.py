"""Running a service as a process: the port it listens on and the event loop it runs on; for
the gateway, optionally as N processes on one port (GATEWAY_PROCESSES).

With N > 1 the process started is a parent that serves nothing: it starts N copies of itself
(the same command with `--reuse-port`), each binding the port with SO_REUSEPORT so the kernel
spreads connections over them, each with its own event loop, pools and background loops. The
parent is `common.supervisor.supervise`, as for `make run`: SIGTERM/SIGINT go to every child,
a child that dies is restarted after a backoff (one copy's crash must not take the port's
other copies down, nor leave the port one copy short until someone notices), a configuration
error (exit 2) stops them all, and the parent exits once they are done.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from aiohttp import web

from common.config import Config
from common.keys import SERVICE_KEY
from common.supervisor import Child, supervise

# Marks a process as one of several on the port: it binds with SO_REUSEPORT and supervises
# nothing.
REUSE_PORT_FLAG = "--reuse-port"


def run(app: web.Application, config: Config, default_port: int, reuse_port: bool = False) -> None:
    port = config.port or default_port
    print(f"{app[SERVICE_KEY]} listening on http://{config.host}:{port}", flush=True)
    loop = None
    if config.event_loop == "uvloop":
        import uvloop  # only where it is asked for

        loop = uvloop.new_event_loop()
    web.run_app(
        app,
        host=config.host,
        port=port,
        print=None,
        shutdown_timeout=15,
        loop=loop,
        reuse_port=reuse_port or None,
    )


def serve(
    name: str,
    make_app: Callable[[], web.Application],
    config: Config,
    default_port: int,
    processes: int = 1,
    argv: Sequence[str] | None = None,
) -> None:
    """Run the service: in this process, or (processes > 1) as a parent of that many on one
    port; exits with the parent's status."""
    argv = list(sys.argv if argv is None else argv)
    if REUSE_PORT_FLAG in argv or processes == 1:
        run(make_app(), config, default_port, reuse_port=REUSE_PORT_FLAG in argv)
        return
    port = config.port or default_port
    children = [
        Child(f"{name}[{n}]", [sys.executable, *argv, REUSE_PORT_FLAG]) for n in range(1, processes + 1)
    ]
    sys.exit(
        supervise(
            children,
            prefix=name,
            started=f"{processes} processes listening on http://{config.host}:{port} (SO_REUSEPORT)",
        )
    )
