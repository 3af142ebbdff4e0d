"""Helpers for running the services on this machine, shared by the tests and the benchmarks:
a RabbitMQ vhost of one's own, a free port, and a Config turned into a process environment."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import urllib.request
from base64 import b64encode
from dataclasses import fields

from common.config import Config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_env(config: Config) -> dict[str, str]:
    """The environment that makes a process read exactly this config (no stray settings from
    the caller's environment or .env)."""
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
    for f in fields(config):
        value = getattr(config, f.name)
        if value is None or value == ():
            continue
        env[f.name.upper()] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return env


def rabbitmq_vhost(action: str, vhost: str, host: str = "127.0.0.1") -> None:
    """Create ("add") or delete a vhost: rabbitmqctl on this machine, else the management API
    (as on CI's service containers)."""
    if shutil.which("rabbitmqctl"):
        if action == "add":
            subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], capture_output=True, check=False)
            subprocess.run(
                ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                capture_output=True,
                check=True,
            )
        else:
            subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, check=False)
        return
    base = f"http://{host}:15672/api"
    auth = {
        "Authorization": "Basic " + b64encode(b"guest:guest").decode(),
        "Content-Type": "application/json",
    }
    requests = (
        [
            (f"{base}/vhosts/{vhost}", "PUT", b"{}"),
            (f"{base}/permissions/{vhost}/guest", "PUT", b'{"configure":".*","write":".*","read":".*"}'),
        ]
        if action == "add"
        else [(f"{base}/vhosts/{vhost}", "DELETE", None)]
    )
    for url, method, data in requests:
        urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=auth))
