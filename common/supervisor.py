"""Supervising child processes: the one loop behind `make run` (scripts/run_local.py) and the
gateway's parent of GATEWAY_PROCESSES children (common/runner.py).

Every child is started, then watched until SIGINT/SIGTERM, which is forwarded to each child as
SIGTERM; a child still running after the grace period is killed. A child that exits by itself
is either restarted after a backoff (1 s, doubling to 30 s; back to 1 s once it has stayed up
for a minute) or, when asked to stop on the first death, ends the whole group. Exit code 2 is
a configuration error (`common.config.load_config`): restarting cannot mend it, so it ends the
group in either mode, as `RestartPreventExitStatus=2` does for the systemd units.

Returns 0 after a stop signal, 1 when a death ended the group. Synchronous (a poll every 0.2 s)
and in the main thread: it installs signal handlers, and runs before any event loop exists.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

# Workers finish their in-flight messages within 20 s of SIGTERM (common/delivery/worker.py);
# HTTP services within their 15 s shutdown timeout plus their background loops' stop.
STOP_TIMEOUT = 25.0
POLL_INTERVAL = 0.2
# A configuration error: the same settings will fail the same way again.
NOT_RESTARTED = frozenset({2})
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Child:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None  # the whole environment; None: the parent's


@dataclass(frozen=True)
class Backoff:
    first: float = 1.0
    most: float = 30.0
    # A child up this long counts as healthy again: its next death waits `first` again.
    stable_after: float = 60.0

    def delay(self, deaths: int) -> float:
        """The pause before the restart after the `deaths`-th death in a row."""
        return min(self.first * 2 ** max(deaths - 1, 0), self.most)


@dataclass
class _Running:
    child: Child
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    deaths: int = 0  # in a row, each within `stable_after` of its start
    restart_at: float | None = None


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:  # a real-time signal has no name
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _say(prefix: str, text: str, error: bool = False) -> None:
    print(f"{prefix}: {text}", file=sys.stderr if error else sys.stdout, flush=True)


def _dies_with(parent: int) -> Callable[[], None] | None:
    """Run in the child before it execs (Linux): SIGTERM it when the supervisor dies, even by
    SIGKILL, so that no child is left holding its port and its connections with nobody to stop
    it."""
    if not sys.platform.startswith("linux"):
        return None

    def arrange() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before the line above
            os._exit(1)

    return arrange


def _start(entry: _Running, cwd: Path | None) -> None:
    entry.process = subprocess.Popen(
        list(entry.child.argv), cwd=cwd, env=entry.child.env, preexec_fn=_dies_with(os.getpid())
    )
    entry.started_at = time.monotonic()
    entry.restart_at = None


def _stop_all(entries: Sequence[_Running], timeout: float, prefix: str) -> None:
    running = [e for e in entries if e.process is not None and e.process.poll() is None]
    for entry in running:
        assert entry.process is not None
        entry.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for entry in running:
        assert entry.process is not None
        try:
            entry.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _say(prefix, f"{entry.child.name} did not stop within {timeout:g} s; killing it", error=True)
            entry.process.kill()
            entry.process.wait()


def supervise(
    children: Sequence[Child],
    *,
    restart: bool = True,
    backoff: Backoff = Backoff(),
    started: str | None = None,
    stop_timeout: float = STOP_TIMEOUT,
    prefix: str = "run",
    cwd: Path | None = None,
) -> int:
    """Run `children` until a stop signal (→ 0) or, without `restart` or on a configuration
    error, until one of them exits by itself (→ 1, naming it); stop the rest either way."""
    stop_signal: list[int] = []

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stop_signal.append(signum)

    # Installed before the first start, so that a Ctrl-C while starting still stops what started.
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    entries = [_Running(child) for child in children]
    try:
        for entry in entries:
            if not stop_signal:
                _start(entry, cwd)
        if started and not stop_signal:
            _say(prefix, started)
        while not stop_signal:
            now = time.monotonic()
            for entry in entries:
                if entry.restart_at is not None:
                    if now >= entry.restart_at:
                        _start(entry, cwd)
                        assert entry.process is not None
                        _say(prefix, f"{entry.child.name} restarted (pid {entry.process.pid})")
                    continue
                assert entry.process is not None
                returncode = entry.process.poll()
                # A Ctrl-C reaches the children too (one process group), and one may be gone
                # before our handler has run: that is the stop asked for, not a death.
                if returncode is None or stop_signal:
                    continue
                how = f"{entry.child.name} {describe_exit(returncode)}"
                if not restart or returncode in NOT_RESTARTED:
                    _say(prefix, f"{how}; stopping the others", error=True)
                    return 1
                if now - entry.started_at >= backoff.stable_after:
                    entry.deaths = 0
                entry.deaths += 1
                delay = backoff.delay(entry.deaths)
                entry.restart_at = now + delay
                _say(prefix, f"{how}; restarting it in {delay:g} s", error=True)
            time.sleep(POLL_INTERVAL)
        _say(prefix, f"{signal.Signals(stop_signal[0]).name}: stopping everything")
        return 0
    finally:
        _stop_all(entries, stop_timeout, prefix)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
