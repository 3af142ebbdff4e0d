"""Services as real processes, for tests that kill or stop them with signals."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from common.config import Config
from scripts.localenv import config_env, free_port

ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess:
    def __init__(self, module: str, config: Config, log_path: Path) -> None:
        self.module = module
        self.port = free_port()
        self.env = {**config_env(config), "PORT": str(self.port), "LOG_FORMAT": "json"}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 20) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: ASYNC220 - spawning returns at once
                [sys.executable, self.module], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.module} exited: {self.log_path.read_text()[-2000:]}")
                try:
                    async with session.get(self.url + "/health") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.module} did not become ready: {self.log_path.read_text()[-2000:]}")

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        assert self.process is not None
        return await asyncio.to_thread(self.process.wait, timeout)

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as session, session.get(self.url + "/metrics") as response:
            return await response.text()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
