"""A three-node RabbitMQ cluster on this machine, for the cluster test and for trying it out.

    python -m scripts.rabbit_cluster up        # start notify1..3@localhost, join them, print the URLs
    python -m scripts.rabbit_cluster status    # which nodes run, and the cluster as one of them sees it
    python -m scripts.rabbit_cluster down      # stop them and remove the scratch directory

It uses the installed `rabbitmq-server` (3.10 here) and nothing else: each node has its own name
(`notify1@localhost` …), AMQP port (5701-5703), distribution port (25701-25703), data, log and
config files, and one Erlang cookie, all under a scratch directory (`NOTIFY_RABBIT_CLUSTER_DIR`,
default /tmp/notify-rabbit-cluster). The machine's own node (rabbit@localhost on 5672) is never
touched: every command names its node and carries this cluster's environment, and the machine's
/etc/rabbitmq files are not read (they name rabbit@localhost). No plugin is enabled, so nothing
listens beyond the AMQP and distribution ports on 127.0.0.1.

`NOTIFY_RABBIT_CLUSTER_PORT` moves the ports (AMQP base; distribution = base + 20000).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
BOOT_TIMEOUT = 90.0


@dataclass(frozen=True)
class Node:
    index: int
    amqp_port: int
    prefix: str = "notify"

    @property
    def short(self) -> str:
        return f"{self.prefix}{self.index}"

    @property
    def name(self) -> str:
        return f"{self.short}@localhost"

    @property
    def dist_port(self) -> int:
        return self.amqp_port + 20000

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"


def installed() -> bool:
    """The RabbitMQ server scripts and Erlang are on this machine."""
    return Path(SERVER).exists() and Path(CTL).exists() and shutil.which("erl") is not None


class Cluster:
    def __init__(
        self, base: Path | None = None, first_port: int | None = None, size: int = 3, prefix: str = "notify"
    ) -> None:
        """`prefix` names the nodes (`<prefix>1@localhost` …): two clusters on one machine (a test
        run beside a developer's) need names, ports and directories of their own."""
        self.base = base or Path(os.environ.get("NOTIFY_RABBIT_CLUSTER_DIR", "/tmp/notify-rabbit-cluster"))
        port = first_port or int(os.environ.get("NOTIFY_RABBIT_CLUSTER_PORT", "5701"))
        self.nodes = [Node(i, port + i - 1, prefix) for i in range(1, size + 1)]

    # -- the environment every rabbitmq script of this cluster runs in ---------------------------

    def urls(self, vhost: str = "") -> list[str]:
        return [f"{node.url}{vhost}" for node in self.nodes]

    def node(self, name_or_port: str | int) -> Node:
        for node in self.nodes:
            if name_or_port in (node.name, node.amqp_port, str(node.index), node.short):
                return node
        raise KeyError(f"no node {name_or_port!r} in this cluster")

    def _env(self, node: Node) -> dict[str, str]:
        base = self.base
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                # The Erlang cookie is read from $HOME/.erlang.cookie, by the nodes and the CLI.
                "HOME": str(base / "home"),
                # The machine's rabbitmq-env.conf sets NODENAME=rabbit@localhost: not read here.
                "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(base / f"{node.short}.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(node.amqp_port),
                "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_PID_FILE": str(self._pid_file(node)),
                "RABBITMQ_PLUGINS_EXPAND_DIR": str(base / "plugins-expand" / node.name),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                # A crash dump (the CLI's too) goes with the logs, not into the caller's folder.
                "ERL_CRASH_DUMP": str(base / "log" / f"erl_crash.{node.short}.dump"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        return env

    def _pid_file(self, node: Node) -> Path:
        return self.base / f"{node.short}.pid"

    def _prepare(self) -> None:
        home = self.base / "home"
        for folder in (home, self.base / "mnesia", self.base / "log"):
            folder.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        (self.base / "rabbitmq-env.conf").write_text("# this cluster's settings come from the environment\n")
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "advanced.config").write_text("[].\n")
        for node in self.nodes:
            (self.base / f"{node.short}.conf").write_text(
                "\n".join(
                    [
                        f"listeners.tcp.1 = 127.0.0.1:{node.amqp_port}",
                        "log.console = false",
                        "log.file.level = warning",
                        # A stopped node (the test stops one on purpose) must not stop the others.
                        "cluster_partition_handling = ignore",
                        "",
                    ]
                )
            )

    def ctl(self, node: Node, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        result = subprocess.run(
            [CTL, "-n", node.name, *args],
            env=self._env(node),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl -n {node.name} {' '.join(args)} exited {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result.stdout

    # -- one node -----------------------------------------------------------------------------

    def running(self, node: Node) -> bool:
        if not (self.base / "home" / ".erlang.cookie").exists():
            return False  # never started (or removed): no cookie to ask with
        try:
            out = subprocess.run(
                [CTL, "-n", node.name, "-q", "eval", "rabbit:is_running()."],
                env=self._env(node),
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return out.returncode == 0 and out.stdout.strip() == "true"

    def start_node(self, node: Node) -> None:
        """Start the node's Erlang VM and RabbitMQ, and wait until it accepts connections."""
        self._prepare()
        # `wait` watches the pid file: one left by an earlier run would read as started.
        self._pid_file(node).unlink(missing_ok=True)
        log = (self.base / "log" / f"{node.name}.out").open("ab")
        # A session of its own: the node outlives this process (`up` returns) and a Ctrl-C in
        # the caller's terminal does not reach it.
        subprocess.Popen(
            [SERVER],
            env=self._env(node),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.base,
        )
        self.ctl(
            node,
            "wait",
            "--timeout",
            str(int(BOOT_TIMEOUT)),
            str(self._pid_file(node)),
            timeout=BOOT_TIMEOUT + 10,
        )

    def stop_node(self, node: Node) -> None:
        """Stop the node (RabbitMQ and its Erlang VM), as a lost machine would be lost, but cleanly."""
        pid = self._pid()
        self.ctl(node, "stop", timeout=60, check=False)
        deadline = time.monotonic() + 30
        pid_of_node = pid.get(node.name)
        while pid_of_node and _alive(pid_of_node) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_of_node and _alive(pid_of_node):
            os.kill(pid_of_node, signal.SIGKILL)

    def _pid(self) -> dict[str, int]:
        found = {}
        for node in self.nodes:
            try:
                found[node.name] = int(self._pid_file(node).read_text().strip())
            except (OSError, ValueError):
                continue
        return found

    # -- the cluster --------------------------------------------------------------------------

    def up(self) -> list[str]:
        """Start the three nodes (in parallel: each takes seconds to boot) and join them."""
        if not installed():
            raise RuntimeError(f"rabbitmq-server is not installed here ({SERVER} and erl are needed)")
        self._prepare()
        pending = [node for node in self.nodes if not self.running(node)]
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(self.start_node, pending))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            if first.name in self.members(node):
                continue
            self.ctl(node, "stop_app")
            self.ctl(node, "reset")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        for node in self.nodes:
            self.ctl(node, "await_startup", "--timeout", str(int(BOOT_TIMEOUT)), timeout=BOOT_TIMEOUT + 10)
        return self.urls()

    def members(self, node: Node) -> list[str]:
        """The running members of the cluster as `node` sees it."""
        out = self.ctl(node, "-q", "cluster_status", "--formatter", "json", check=False)
        try:
            return sorted(json.loads(out).get("running_nodes", []))
        except ValueError:
            return []

    def down(self, remove: bool = True) -> None:
        """Stop every node (cleanly, then by signal), and remove the scratch directory."""
        if not self.base.exists():
            return
        pids = self._pid()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: self.ctl(n, "stop", timeout=60, check=False), self.nodes))
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)

    def status(self) -> dict[str, bool]:
        return {node.name: self.running(node) for node in self.nodes}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.rabbit_cluster", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=("up", "down", "status", "stop-node", "start-node"))
    parser.add_argument("node", nargs="?", help="for stop-node/start-node: notify1, notify2 or notify3")
    parser.add_argument("--keep", action="store_true", help="down: keep the scratch directory")
    args = parser.parse_args(argv)
    cluster = Cluster()
    if args.action == "up":
        started = time.monotonic()
        urls = cluster.up()
        print(f"cluster up in {time.monotonic() - started:.0f} s: {', '.join(n.name for n in cluster.nodes)}")
        print(f"RABBITMQ_URL={','.join(urls)} QUEUE_TYPE=quorum")
        return 0
    if args.action == "down":
        cluster.down(remove=not args.keep)
        print("cluster down" + ("" if args.keep else f"; {cluster.base} removed"))
        return 0
    if args.action in ("stop-node", "start-node"):
        if not args.node:
            parser.error(f"{args.action} needs a node: notify1, notify2 or notify3")
        node = cluster.node(args.node)
        (cluster.stop_node if args.action == "stop-node" else cluster.start_node)(node)
        return 0
    states = cluster.status()
    for name, up in states.items():
        print(f"{name}: {'running' if up else 'stopped'}")
    running = [n for n in cluster.nodes if states[n.name]]
    if running:
        members = ", ".join(cluster.members(running[0]))
        print(f"cluster members running (as {running[0].name} sees it): {members}")
    return 0 if all(states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
