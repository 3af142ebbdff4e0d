"""`make run` (scripts/run_local.py) for real: as a process, against the real PostgreSQL, Redis and
RabbitMQ or a closed port in their place, with the real services or small stand-in children.
Every run has its own settings file, so the repository's .env is neither read nor written."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from common.config import Config
from scripts import run_local
from scripts.localenv import config_env, free_port

ROOT = Path(__file__).resolve().parent.parent


def _run_local(env: dict[str, str], env_file: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scripts.run_local", "--env-file", str(env_file)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


# --- dependencies --------------------------------------------------------------------------------


# These two talk to the machine's own PostgreSQL, Redis and RabbitMQ at their default addresses
# (all but the one pointed at a closed port must answer), through no fixture: marked by hand.
@pytest.mark.stack
@pytest.mark.parametrize(
    ("name", "package", "settings"),
    [
        ("PostgreSQL", "postgresql", ("USERS_DB_URL", "TEMPLATES_DB_URL", "NOTIFICATIONS_DB_URL")),
        ("Redis", "redis-server", ("REDIS_URL",)),
        ("RabbitMQ", "rabbitmq-server", ("RABBITMQ_URL",)),
    ],
)
def test_an_unreachable_dependency_is_named_with_how_to_get_it(
    tmp_path: Path, name: str, package: str, settings: tuple[str, ...]
) -> None:
    closed = free_port()  # bound and released: nothing listens there
    urls = {
        "USERS_DB_URL": f"postgresql://postgres@127.0.0.1:{closed}/users_db",
        "TEMPLATES_DB_URL": f"postgresql://postgres@127.0.0.1:{closed}/templates_db",
        "NOTIFICATIONS_DB_URL": f"postgresql://postgres@127.0.0.1:{closed}/notifications_db",
        "REDIS_URL": f"redis://127.0.0.1:{closed}/0",
        "RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{closed}/",
    }
    config = Config.from_env({key: urls[key] for key in settings})
    started = time.monotonic()
    result = _run_local(config_env(config), tmp_path / ".env")
    elapsed = time.monotonic() - started

    assert result.returncode == 1, result.stdout
    out = result.stdout
    assert f"run: {name} is not reachable at 127.0.0.1:{closed} ({', '.join(settings)}): " in out, out
    # Only the one pointed at the closed port; the machine's others answer.
    assert out.count("is not reachable") == 1, out
    assert f"sudo apt-get install {package}\n" in out, out
    assert "python3 -m scripts.compose_env --make-run" in out
    assert "docker compose up -d postgres redis rabbitmq mailpit" in out
    assert ("without a password" in out) == (name == "PostgreSQL")
    # Checked before anything else: nothing migrated, nothing started.
    assert "databases migrated" not in out and "run: started" not in out
    assert elapsed < 15, elapsed
    assert (tmp_path / ".env").exists()  # the first run's settings file, with its secrets


@pytest.mark.stack
def test_every_dependency_is_tried_at_once_and_named_once_per_address() -> None:
    closed = free_port()
    config = Config(
        users_db_url=f"postgresql://postgres@127.0.0.1:{closed}/users_db",
        templates_db_url=f"postgresql://postgres@127.0.0.1:{closed}/templates_db",
        notifications_db_url="postgresql://postgres@/notifications_db",  # a Unix socket: not tried
        redis_url=f"redis://127.0.0.1:{closed}/0",
        rabbitmq_url=f"amqps://guest:guest@127.0.0.1:{closed}/",
    )
    deps = run_local.dependencies(config)
    assert [(d.name, d.port, d.settings) for d in deps] == [
        ("PostgreSQL", closed, ("USERS_DB_URL", "TEMPLATES_DB_URL")),
        ("Redis", closed, ("REDIS_URL",)),
        ("RabbitMQ", closed, ("RABBITMQ_URL",)),
    ]
    assert run_local.dependencies(Config(rabbitmq_url="amqps://u:p@broker/"))[-1].port == 5671
    missing = run_local.unreachable(deps, timeout=1.0)
    assert [d.name for d, _ in missing] == ["PostgreSQL", "Redis", "RabbitMQ"]
    assert all(reason == "connection refused" for _, reason in missing), missing
    message = run_local.unreachable_message(missing)
    assert "sudo apt-get install postgresql redis-server rabbitmq-server\n" in message
    # The machine's own, at the defaults, answer.
    assert run_local.unreachable(run_local.dependencies(Config())) == []


# --- a process that dies -------------------------------------------------------------------------


def test_a_service_that_exits_makes_make_run_exit_non_zero_naming_it(
    base_config: Config, tmp_path: Path
) -> None:
    """The real services, given a setting they refuse (an empty INTERNAL_API_TOKEN, which make run
    itself does not need): each exits with 2 at once, before it listens on its fixed port, so
    this runs beside anything else on this machine."""
    config = replace(base_config, smtp_port=free_port())  # not 1025: no SMTP sink of its own
    env = {**config_env(config), "INTERNAL_API_TOKEN": ""}
    result = _run_local(env, tmp_path / ".env")
    out = result.stdout
    assert result.returncode == 1, out
    assert "run: databases migrated" in out, out
    assert "run: started" in out, out
    # Searched in the whole output, not line by line: the services write to the same terminal at
    # the same moment, and a line of theirs may run into ours.
    died = re.findall(r"run: (\w+) exited with code 2; stopping the others", out)
    assert len(died) == 1 and died[0] in run_local.SERVICES, out
    assert "INTERNAL_API_TOKEN must be set" in out


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _sleeper(marker: Path) -> list[str]:
    """A stand-in service: says it is up (a file beside the marker), runs until SIGTERM, and
    leaves a note in the marker that SIGTERM stopped it."""
    return _child(f"""
        import signal, sys, time
        def stop(*_):
            open({str(marker)!r}, "w").write("SIGTERM")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        open({str(marker.with_suffix(".up"))!r}, "w").close()
        time.sleep(60)
    """)


def _supervise(commands: dict[str, list[str]], stop_timeout: float = 10) -> subprocess.Popen[str]:
    """run_local.supervise, the loop `make run` ends in, as a process of its own (it installs
    signal handlers)."""
    code = (
        "import sys\n"
        "from scripts.run_local import supervise\n"
        f"sys.exit(supervise({commands!r}, started='supervisor started', stop_timeout={stop_timeout}))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(paths: list[Path], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        assert time.monotonic() < deadline, f"none of {paths} after {timeout} s"
        time.sleep(0.05)


def _dies_once_up(up: Path, how: str) -> list[str]:
    """A stand-in service that dies (`how`) once the other one is up: only then has the other
    its SIGTERM handler, so that what the test sees is not a race at start."""
    return _child(f"""
        import os, pathlib, signal, sys, time
        while not pathlib.Path({str(up)!r}).exists():
            time.sleep(0.02)
        {how}
    """)


@pytest.mark.parametrize(
    ("how", "described"),
    [
        ("sys.exit(3)", "exited with code 3"),
        ("os.kill(os.getpid(), signal.SIGKILL)", "was killed by SIGKILL"),
    ],
)
def test_a_process_that_dies_stops_the_others_and_is_named(tmp_path: Path, how: str, described: str) -> None:
    marker = tmp_path / "sleeper.stopped"
    started = time.monotonic()
    gateway = _dies_once_up(marker.with_suffix(".up"), how)
    supervisor = _supervise({"sleeper": _sleeper(marker), "gateway": gateway})
    out, _ = supervisor.communicate(timeout=30)
    assert supervisor.returncode == 1, out
    assert f"run: gateway {described}; stopping the others\n" in out, out
    assert marker.read_text() == "SIGTERM"  # the other one was stopped, not left running
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_everything_and_exits_0(tmp_path: Path, sig: signal.Signals) -> None:
    markers = [tmp_path / "one.stopped", tmp_path / "two.stopped"]
    supervisor = _supervise({"one": _sleeper(markers[0]), "two": _sleeper(markers[1])})
    try:
        # Both children have their SIGTERM handler before the signal goes out.
        _wait_for([marker.with_suffix(".up") for marker in markers])
        supervisor.send_signal(sig)
        out, _ = supervisor.communicate(timeout=30)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    assert supervisor.returncode == 0, out
    assert f"run: {sig.name}: stopping everything" in out
    assert "exited with code" not in out
    assert [m.read_text() for m in markers] == ["SIGTERM", "SIGTERM"]


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    up = tmp_path / "stubborn.up"
    stubborn = _child(f"""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(up)!r}, "w").close()
        time.sleep(60)
    """)
    commands = {"stubborn": stubborn, "gateway": _dies_once_up(up, "sys.exit(1)")}
    started = time.monotonic()
    supervisor = _supervise(commands, stop_timeout=1)
    out, _ = supervisor.communicate(timeout=30)
    assert supervisor.returncode == 1, out
    assert "run: gateway exited with code 1; stopping the others" in out
    assert "run: stubborn did not stop within 1 s; killing it" in out
    assert time.monotonic() - started < 10
