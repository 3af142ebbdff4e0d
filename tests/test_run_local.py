"""`make run` (scripts/run_local.py) for real: as a process, against the real PostgreSQL, Redis and
RabbitMQ or a closed port in their place, with the real services or small stand-in children.
Every run has its own settings file, so the repository's .env is neither read nor written."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from common.config import Config
from common.supervisor import Backoff
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


def _supervise(
    commands: dict[str, list[str]], stop_timeout: float = 10, restart: bool = False, **options: object
) -> subprocess.Popen[str]:
    """common.supervisor.supervise, the loop `make run` ends in, as a process of its own (it
    installs signal handlers). `restart=False` is `make run --stop-on-first-death`."""
    children = [(name, argv) for name, argv in commands.items()]
    code = (
        "import sys\n"
        "from common.supervisor import Backoff, Child, supervise\n"
        f"children = [Child(name, argv) for name, argv in {children!r}]\n"
        f"sys.exit(supervise(children, started='supervisor started', stop_timeout={stop_timeout},"
        f" restart={restart!r}, {', '.join(f'{k}={v!r}' for k, v in options.items())}))\n"
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


# --- restarts (the default of make run) ----------------------------------------------------------


def test_a_child_that_keeps_dying_is_restarted_with_a_growing_backoff(tmp_path: Path) -> None:
    """It exits 1 at once, every time: the pauses go 1, 2, 4 s (the defaults of make run),
    each restart is named, and a stop signal still ends everything with 0."""
    starts = tmp_path / "starts"
    flaky = _child(f"""
        import sys
        open({str(starts)!r}, "a").write("x")
        sys.exit(1)
    """)
    marker = tmp_path / "sleeper.stopped"
    supervisor = _supervise({"sleeper": _sleeper(marker), "flaky": flaky}, restart=True)
    try:
        deadline = time.monotonic() + 30
        while not (starts.exists() and len(starts.read_text()) >= 4):
            assert time.monotonic() < deadline, "the dying child was not restarted 3 times in 30 s"
            time.sleep(0.05)
        supervisor.send_signal(signal.SIGTERM)
        out, _ = supervisor.communicate(timeout=30)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    assert supervisor.returncode == 0, out
    pauses = [float(p) for p in re.findall(r"run: flaky exited with code 1; restarting it in (\S+) s", out)]
    assert pauses[:3] == [1, 2, 4], out
    assert out.count("run: flaky restarted (pid ") >= 3, out
    assert "stopping the others" not in out
    assert marker.read_text() == "SIGTERM"  # the healthy one ran all along, and was stopped


def test_the_backoff_doubles_to_its_bound() -> None:
    backoff = Backoff()
    assert [backoff.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_configuration_error_is_not_restarted(tmp_path: Path) -> None:
    marker = tmp_path / "sleeper.stopped"
    misconfigured = _dies_once_up(marker.with_suffix(".up"), "sys.exit(2)")
    commands = {"sleeper": _sleeper(marker), "gateway": misconfigured}
    supervisor = _supervise(commands, restart=True)
    out, _ = supervisor.communicate(timeout=30)
    assert supervisor.returncode == 1, out
    assert "run: gateway exited with code 2; stopping the others\n" in out, out
    assert "restarting" not in out
    assert marker.read_text() == "SIGTERM"


def _health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live", timeout=2) as response:
            return int(response.status)
    except OSError:
        return None


def _wait_healthy(port: int, process: subprocess.Popen[str], timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while _health(port) != 200:
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, f"nothing answered on {port} within {timeout} s"
        time.sleep(0.1)


def _pid_on(port: int) -> int:
    """The pid of the process listening on `port` (from /proc: the socket's inode)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(fields[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            links = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            return int(proc.name)
    raise AssertionError(f"no process listens on {port}")


def _run_children(base_config: Config, how_many: dict[str, int]) -> tuple[list[int], subprocess.Popen[str]]:
    """make run's children for these counts (run_local.children), on free base ports, run by
    the supervisor as make run runs them (restarts on)."""
    bases = {service: free_port() for service in how_many}
    children = run_local.children(how_many, bases, config_env(base_config))
    ports = [int((child.env or {})["PORT"]) for child in children]  # several copies: each has PORT
    code = (
        "import pickle, sys\n"
        "from common.supervisor import supervise\n"
        "from scripts.run_local import ROOT\n"
        "children = pickle.loads(sys.stdin.buffer.read())\n"
        "sys.exit(supervise(children, started='started', cwd=ROOT))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdin is not None
    process.stdin.buffer.write(pickle.dumps(children))  # type: ignore[attr-defined]
    process.stdin.close()
    process.stdin = None  # communicate() later reads only
    return ports, process


def test_counts_and_ports_of_several_copies() -> None:
    assert run_local.counts({}) == dict.fromkeys(run_local.SERVICES, 1)
    assert run_local.counts({"GATEWAYS": "2", "EMAIL_WORKERS": "3"})["email_worker"] == 3
    with pytest.raises(run_local.SettingError, match="GATEWAYS='0' is not valid"):
        run_local.counts({"GATEWAYS": "0"})
    found = run_local.children({"gateway": 2, "email_worker": 1}, {"gateway": 8000, "email_worker": 8003}, {})
    assert [(c.name, (c.env or {}).get("PORT")) for c in found] == [
        ("gateway-1", "8000"),
        ("gateway-2", "8100"),
        ("email_worker", None),  # alone: its own default port, as before
    ]


@pytest.mark.stack
def test_two_gateways_both_answer_and_a_sigkilled_one_comes_back(base_config: Config) -> None:
    ports, process = _run_children(base_config, {"gateway": 2})
    try:
        for port in ports:
            _wait_healthy(port, process)
        first, second = (_pid_on(port) for port in ports)
        assert first != second
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 40
        while _health(ports[0]) != 200 or _pid_on(ports[0]) == first:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the killed gateway did not come back"
            time.sleep(0.2)
        assert _pid_on(ports[1]) == second  # the other one was left alone
        restarted = _pid_on(ports[0])
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=40)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out
    assert "run: gateway-1 was killed by SIGKILL; restarting it in 1 s" in out, out
    assert "run: gateway-1 restarted (pid " in out, out
    # Both children gone with it (their pids, not their ports: a port freed here may already be
    # another test's, on another xdist worker).
    for pid in (restarted, second):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_children_are_stopped_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves the supervisor no time to stop anything: the kernel tells each child
    (PR_SET_PDEATHSIG), and each gets SIGTERM, so none is left holding its port."""
    markers = [tmp_path / "one.stopped", tmp_path / "two.stopped"]
    supervisor = _supervise({"one": _sleeper(markers[0]), "two": _sleeper(markers[1])}, restart=True)
    try:
        _wait_for([marker.with_suffix(".up") for marker in markers])
        supervisor.kill()
        supervisor.communicate(timeout=30)
        _wait_for(markers, timeout=10)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
    assert [m.read_text() for m in markers] == ["SIGTERM", "SIGTERM"]
