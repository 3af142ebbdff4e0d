"""The deployment files agree with the code: docker-compose.yml, the Dockerfile, the Prometheus and
Grafana configuration and the CI/CD workflows. Static checks only: no Docker, no services."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from common import supervisor
from common.config import Config
from common.data.migrate import databases
from common.metrics import Metrics
from scripts import compose_env, healthcheck

ROOT = Path(__file__).resolve().parent.parent
# DESIGN.md, "Layout": the service modules and their ports.
DESIGN_PORTS = {
    "gateway": 8000,
    "user_service": 8001,
    "template_service": 8002,
    "email_worker": 8003,
    "push_worker": 8004,
    "inbox_worker": 8005,
}
WORKERS = ("email_worker", "push_worker", "inbox_worker")
CONFIG_VARIABLES = {f.name.upper() for f in fields(Config)}
SECRET_VARIABLES = {"GATEWAY_API_KEYS", "INTERNAL_API_TOKEN", "JWT_SECRET", "UNSUBSCRIBE_SECRET"}
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _yaml(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _yaml("docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _ours(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services that run the notify image (built from our Dockerfile)."""
    return {name: s for name, s in services.items() if "build" in s}


def _one_shot(services: dict[str, dict[str, Any]]) -> set[str]:
    """Jobs other services wait for with `service_completed_successfully`."""
    return {
        dep
        for s in services.values()
        for dep, rule in (s.get("depends_on") or {}).items()
        if isinstance(rule, dict) and rule.get("condition") == "service_completed_successfully"
    }


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR:?message}, as with an empty environment and every
    required secret set to a placeholder."""

    def replace(match: re.Match[str]) -> str:
        _, operator, argument = match.groups()
        if operator and operator.endswith("-"):
            return argument
        return "placeholder" if operator else ""

    return _INTERPOLATION.sub(replace, value)


def _ports(service: dict[str, Any]) -> list[tuple[str | None, int]]:
    """(host port, or None for an ephemeral one; container port) of each published port."""
    found: list[tuple[str | None, int]] = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published = entry.get("published")
            found.append((str(published) if published else None, int(entry["target"])))
            continue
        spec = str(entry).split("/", 1)[0]
        parts = spec.rsplit(":", 2) if spec.count(":") >= 2 else spec.split(":")
        container = int(parts[-1])
        host = parts[-2] if len(parts) >= 2 else None
        found.append((host or None, container))
    return found


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    return shlex.split(command) if isinstance(command, str) else list(command or [])


def _module_file(argv: list[str]) -> Path:
    """The file `python X.py` or `python -m pkg.mod` starts."""
    assert argv and argv[0] in ("python", "python3"), argv
    if argv[1] == "-m":
        base = ROOT.joinpath(*argv[2].split("."))
        return base / "__main__.py" if base.is_dir() else base.with_suffix(".py")
    return ROOT / argv[1]


# --- docker-compose.yml --------------------------------------------------------------------------


def test_every_long_running_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    one_shot = _one_shot(services)
    assert one_shot == {"migrate", "topology"}
    for name, service in services.items():
        if name in one_shot:
            assert service.get("restart") == "no", f"{name} is a one-shot job; it must not restart"
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_depends_on_waits_for_health_or_completion(services: dict[str, dict[str, Any]]) -> None:
    one_shot = _one_shot(services)
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for dep, rule in depends.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = rule.get("condition")
            if dep in one_shot:
                assert condition == "service_completed_successfully", (name, dep)
            else:
                assert condition == "service_healthy", (name, dep)
                assert services[dep].get("healthcheck"), (name, dep)
    # The order that matters: schema and queues exist before anything uses them.
    for name in DESIGN_PORTS:
        if name in ("gateway", *WORKERS):
            assert {"migrate", "topology"} <= set(services[name]["depends_on"]), name
    assert services["email_worker"]["depends_on"]["mailpit"]["condition"] == "service_healthy"


def test_services_listen_on_the_ports_of_design(services: dict[str, dict[str, Any]]) -> None:
    ours = _ours(services)
    assert set(DESIGN_PORTS) <= set(ours)
    assert healthcheck.SERVICE_PORTS == DESIGN_PORTS
    for name, port in DESIGN_PORTS.items():
        env = _environment(ours[name])
        assert env.get("PORT") == str(port), name
        assert env.get("HOST") == "0.0.0.0", f"{name} must listen beyond the container's loopback"
        published = _ports(ours[name])
        assert [container for _, container in published] == [port], name
        host_port = published[0][0]
        if name in WORKERS:
            # `docker compose up --scale email_worker=4`: replicas must not share a host port.
            assert host_port is None, f"{name} publishes the fixed host port {host_port}"
        else:
            assert host_port == str(port), name


def test_no_two_services_claim_the_same_host_port(services: dict[str, dict[str, Any]]) -> None:
    claimed: dict[str, str] = {}
    for name, service in services.items():
        for port, _ in _ports(service):
            if port:
                assert port not in claimed, f"{name} and {claimed[port]} both publish {port}"
                claimed[port] = name


def test_every_variable_set_on_our_services_is_a_config_field(services: dict[str, dict[str, Any]]) -> None:
    for name, service in _ours(services).items():
        unknown = set(_environment(service)) - CONFIG_VARIABLES
        assert not unknown, f"{name} sets {sorted(unknown)}, which no Config field reads"


def test_compose_settings_parse_and_point_at_compose_services(services: dict[str, dict[str, Any]]) -> None:
    for name, service in _ours(services).items():
        env = {key: _interpolate(value) for key, value in _environment(service).items()}
        Config.from_env(env)  # raises ConfigError naming the variable on a malformed value
        for key, value in env.items():
            # PUBLIC_BASE_URL is where people's mail clients reach the gateway, not a service.
            if key.endswith("_URL") and value and key != "PUBLIC_BASE_URL":
                host = urlsplit(value).hostname
                assert host in services, f"{name}: {key} points at {host}, not a compose service"
        if "SMTP_HOST" in env:
            assert env["SMTP_HOST"] in services, name


def test_topology_and_workers_agree_on_the_queues(services: dict[str, dict[str, Any]]) -> None:
    """The retry queues' TTLs and the queue type are declared by `topology` and used by workers."""
    for key in ("RETRY_DELAYS", "QUEUE_TYPE", "RABBITMQ_URL"):
        values = {name: _environment(services[name]).get(key) for name in ("topology", "gateway", *WORKERS)}
        assert len(set(values.values())) == 1, (key, values)


def test_secrets_are_never_committed(services: dict[str, dict[str, Any]]) -> None:
    """Secrets are `${NAME:?message}`: compose refuses to start without them, none has a value here."""
    for name, service in services.items():
        for key, value in _environment(service).items():
            if key in SECRET_VARIABLES or re.search(r"PASSWORD|_PASS$", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), f"{name}: {key} must be ${{NAME:?…}}"
    text = (ROOT / "docker-compose.yml").read_text()
    for url in re.findall(r"[a-z]+://[^\s\"']+", text):
        credentials = url.split("://", 1)[1].partition("@")
        if credentials[1]:
            password = credentials[0].partition(":")[2]
            assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", password), f"literal password in {url}"
    # scripts/compose_env writes exactly the variables compose requires.
    required = {m.group(1) for m in _INTERPOLATION.finditer(text) if m.group(2) == ":?"}
    assert required == set(compose_env.SECRETS)


def test_each_command_starts_a_module_that_exists(services: dict[str, dict[str, Any]]) -> None:
    expected = {name: ["python", f"{name}.py"] for name in DESIGN_PORTS}
    expected |= {"migrate": ["python", "-m", "common.data.migrate"], "topology": ["python", "-m", "topology"]}
    ours = _ours(services)
    assert set(ours) == set(expected)
    for name, service in ours.items():
        argv = _command(service)
        assert argv == expected[name], name
        path = _module_file(argv)
        if name == "push_worker" and not path.exists():
            continue  # being written in parallel (issue "push worker"); checked once it lands
        assert path.is_file(), f"{name}: {path} does not exist"
        assert re.search(r"^def main\(", path.read_text(), re.M), f"{path} has no main()"


def test_postgres_init_creates_the_databases_the_code_uses(services: dict[str, dict[str, Any]]) -> None:
    mounts = services["postgres"]["volumes"]
    init = next(m for m in mounts if "/docker-entrypoint-initdb.d/" in m)
    script = (ROOT / init.split(":", 1)[0]).read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+)", script))
    assert created == {urlsplit(url).path.lstrip("/") for url in databases(Config()).values()}
    migrate_env = _environment(services["migrate"])
    urls = [_interpolate(url) for key, url in migrate_env.items() if key.endswith("_URL")]
    assert {urlsplit(url).path.lstrip("/") for url in urls} == created


# --- Dockerfile ----------------------------------------------------------------------------------


def _dockerfile_stages() -> list[list[str]]:
    """Instructions (continuation lines joined) of each stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def _instructions(stage: list[str], keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in stage if line.split(None, 1)[0].upper() == keyword]


def test_dockerfile_is_multi_stage_and_runs_as_non_root() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2
    final = stages[-1]
    users = _instructions(final, "USER")
    assert users, "the final stage sets no USER, so it runs as root"
    user = users[-1].split(":")[0].strip()
    assert user not in ("root", "0"), user
    assert any("requirements.txt" in line for stage in stages for line in _instructions(stage, "COPY"))
    assert re.search(r"^(--\S+ +)*CMD ", _instructions(final, "HEALTHCHECK")[-1]), "no HEALTHCHECK"
    assert "scripts.healthcheck" in _instructions(final, "HEALTHCHECK")[-1]


def test_dockerfile_command_and_copied_code_exist() -> None:
    final = _dockerfile_stages()[-1]
    cmd = json.loads(_instructions(final, "CMD")[-1])
    assert cmd == ["python", "gateway.py"]
    assert _module_file(cmd).is_file()
    copied = " ".join(_instructions(final, "COPY"))
    for package in ("common", "providers", "topology", "console", "migrations", "scripts"):
        assert f"{package}/" in copied, f"the image lacks {package}/"
    assert "*.py" in copied  # the service modules
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".git" in ignored
    for source in ("common", "providers", "topology", "console", "migrations", "scripts"):
        assert source not in ignored


def test_dockerfile_bakes_in_no_secret() -> None:
    for stage in _dockerfile_stages():
        for keyword in ("ENV", "ARG"):
            for line in _instructions(stage, keyword):
                for name in re.findall(r"([A-Z_]+)=", line) or [line.split("=")[0]]:
                    assert not re.search(r"PASSWORD|SECRET|TOKEN|API_KEY", name), line


# --- Prometheus and Grafana ----------------------------------------------------------------------


def _scrape_targets(config: dict[str, Any]) -> Iterator[tuple[str, str, int, str]]:
    """(job, host, port, metrics_path) of every scrape target."""
    for job in config["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        for static in job.get("static_configs") or []:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                yield job["job_name"], host, int(port), path
        for dns in job.get("dns_sd_configs") or []:
            for host in dns["names"]:
                yield job["job_name"], host, int(dns["port"]), path


def test_prometheus_scrapes_every_service_that_exists(services: dict[str, dict[str, Any]]) -> None:
    mount = next(m for m in services["prometheus"]["volumes"] if m.endswith("prometheus.yml:ro"))
    config = yaml.safe_load((ROOT / mount.split(":", 1)[0]).read_text())
    scraped = set()
    for job, host, port, path in _scrape_targets(config):
        assert host in services, f"job {job} scrapes {host}, which is not a compose service"
        scraped.add(host)
        if host in DESIGN_PORTS:
            assert port == int(_environment(services[host])["PORT"]), job
            assert path == "/metrics", job
        elif host == "rabbitmq":
            assert port == 15692 and path.startswith("/metrics"), job
    assert set(DESIGN_PORTS) | {"rabbitmq"} <= scraped


def test_rabbitmq_prometheus_plugin_is_enabled(services: dict[str, dict[str, Any]]) -> None:
    mount = next(m for m in services["rabbitmq"]["volumes"] if "enabled_plugins" in m)
    source, target = mount.split(":")[:2]
    assert target == "/etc/rabbitmq/enabled_plugins"
    plugins = (ROOT / source).read_text()
    assert "rabbitmq_prometheus" in plugins and "rabbitmq_management" in plugins
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3-management")


def exported_metrics() -> dict[str, set[str]]:
    """Every series name the services can export → the labels it carries."""
    found: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames)
        suffixes: tuple[str, ...] = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",),
        }[str(metric._type)]
        for suffix in suffixes:
            found[metric._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return found


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_PROMQL_WORDS |= {"and", "or", "unless", "inf", "nan"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression uses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    labels: set[str] = set()
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for match in re.finditer(grouping, text):
        labels |= {part.strip() for part in match.group(1).split(",") if part.strip()}
    text = re.sub(grouping, " ", text)
    for match in re.finditer(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", match.group(1)))
    text = re.sub(r"\{[^}]*\}", " ", text)
    names = {
        m.group(1)
        for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\()?", text)
        if not m.group(2)
    }
    return names - _PROMQL_WORDS, labels


def test_promql_names_reads_metrics_and_labels() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, channel) (rate(notify_x_bucket{job="a"}[$__rate_interval])))'
        ' / on (channel) sum(rabbitmq_queue_messages{queue=~"email\\\\.queue"}) > bool 2'
    )
    assert promql_names(expr) == (
        {"notify_x_bucket", "rabbitmq_queue_messages"},
        {"le", "channel", "job", "queue"},
    )


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


@pytest.fixture(scope="module")
def dashboards(services: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    mounts = {m.split(":")[1]: ROOT / m.split(":")[0] for m in services["grafana"]["volumes"] if ":" in m}
    provisioning = mounts["/etc/grafana/provisioning"]
    found = []
    for provider_file in sorted((provisioning / "dashboards").glob("*.yml")):
        for provider in yaml.safe_load(provider_file.read_text())["providers"]:
            folder = mounts[provider["options"]["path"]]
            found += [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    assert found, "no dashboard is provisioned"
    return found


def test_grafana_queries_only_metrics_the_code_exports(dashboards: list[dict[str, Any]]) -> None:
    exported = exported_metrics()
    used: set[str] = set()
    for dashboard in dashboards:
        exprs = list(_exprs(dashboard))
        assert exprs
        for expr in exprs:
            names, labels = promql_names(expr)
            assert names, expr
            used |= names
            allowed = {"job", "instance", "le"}
            for name in names:
                if name.startswith("rabbitmq_"):
                    allowed |= {"queue", "vhost"}  # RabbitMQ's own exporter (per-object metrics)
                    continue
                assert name in exported, f"{name} is not exported by common/metrics.py: {expr}"
                allowed |= exported[name]
            assert labels <= allowed, f"unknown labels {labels - allowed}: {expr}"
    # What the issue asks the dashboard to show.
    for needed in (
        "notify_notifications_accepted_total",
        "notify_notifications_delivered_total",
        "notify_notifications_failed_total",
        "notify_notifications_retried_total",
        "notify_end_to_end_latency_seconds_bucket",
        "rabbitmq_queue_messages",
    ):
        assert needed in used, needed


def test_grafana_datasource_is_the_one_dashboards_use(
    services: dict[str, dict[str, Any]], dashboards: list[dict[str, Any]]
) -> None:
    datasources = _yaml("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"]
    uids = {d["uid"] for d in datasources}
    assert all(urlsplit(d["url"]).hostname in services for d in datasources)

    def used(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                yield node["datasource"]["uid"]
            for value in node.values():
                yield from used(value)
        elif isinstance(node, list):
            for item in node:
                yield from used(item)

    for dashboard in dashboards:
        assert set(used(dashboard)) <= uids


# --- CI/CD ---------------------------------------------------------------------------------------


def _triggers(workflow: dict[Any, Any]) -> dict[str, Any]:
    # YAML 1.1 reads the key `on` as True.
    on: Any = workflow.get("on", workflow.get(True))
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    return dict(on)


def _runs(job: dict[str, Any]) -> list[str]:
    return [step["run"] for step in job.get("steps", []) if "run" in step]


def _make_target(target: str) -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    body = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        body.append(line.strip())
    return body


def test_ci_runs_what_make_test_runs_locally() -> None:
    workflow = _yaml(".github/workflows/ci.yml")
    assert {"pull_request", "push"} <= set(_triggers(workflow))
    jobs = workflow["jobs"]
    test_job = next((job for job in jobs.values() if "make test" in map(str.strip, _runs(job))), None)
    assert test_job, "no CI job runs `make test`"
    runs = [run.strip() for run in _runs(test_job)]
    # The Makefile targets themselves, not a copy of their commands that could drift.
    assert "make test" in runs and "make lint" in runs
    assert runs.index("make topology") < runs.index("make test")  # python -m topology bootstrap
    for run in runs:
        assert not re.search(r"\b(pytest|ruff|mypy|hadolint|actionlint)\b", run), f"drifting copy: {run}"
    assert any("pytest" in line for line in _make_target("test"))
    assert any("-m topology" in line for line in _make_target("topology"))
    # The services the suite expects (tests/conftest.py defaults), on their default ports.
    containers = test_job["services"]
    images = {name: c["image"] for name, c in containers.items()}
    assert images["postgres"].startswith("postgres") and images["redis"].startswith("redis")
    assert "management" in images["rabbitmq"]  # the suite creates its vhost via the management API
    ports = {p for c in containers.values() for p in c.get("ports", [])}
    assert {"5432:5432", "6379:6379", "5672:5672", "15672:15672"} <= ports
    # And the image builds.
    assert any(
        "docker/build-push-action" in step.get("uses", "") or "docker build" in step.get("run", "")
        for job in jobs.values()
        for step in job["steps"]
    )


def test_cd_pushes_the_image_tagged_with_the_commit() -> None:
    workflow = _yaml(".github/workflows/cd.yml")
    triggers = _triggers(workflow)
    assert triggers["push"]["branches"] == ["main"]
    assert workflow["permissions"]["packages"] == "write"
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    build = next(s for s in steps if "docker/build-push-action" in s.get("uses", ""))
    assert build["with"]["push"] is True
    assert "${{ github.sha }}" in build["with"]["tags"]
    assert any("ghcr.io" in json.dumps(step) for step in steps)


# --- helper scripts ------------------------------------------------------------------------------


def test_healthcheck_finds_the_service_of_the_container() -> None:
    env: dict[str, str] = {"HOST": "0.0.0.0"}
    assert healthcheck.live_url(["python", "email_worker.py"], env) == "http://127.0.0.1:8003/health/live"
    assert healthcheck.live_url(["/sbin/docker-init", "--", "python", "/app/gateway.py"], env) == (
        "http://127.0.0.1:8000/health/live"
    )
    assert (
        healthcheck.live_url(["python", "gateway.py"], {"PORT": "9000"})
        == "http://127.0.0.1:9000/health/live"
    )
    assert healthcheck.live_url(["python", "-m", "common.data.migrate"], env) is None
    assert healthcheck.live_url(["python", "-m", "topology"], {"PORT": "8000"}) is None


def test_compose_env_adds_only_missing_secrets() -> None:
    lines = compose_env.missing_lines("# comment\nGATEWAY_API_KEYS=dev-abc\nJWT_SECRET=\n")
    names = [line.split("=", 1)[0] for line in lines]
    assert "GATEWAY_API_KEYS" not in names and "JWT_SECRET" in names
    assert set(names) == set(compose_env.SECRETS) - {"GATEWAY_API_KEYS"}
    for line in lines:
        value = line.split("=", 1)[1]
        assert len(value) >= 16 and re.fullmatch(r"[A-Za-z0-9_-]+", value), line  # URL-safe


def test_compose_env_points_make_run_at_the_dependencies_compose_publishes(
    services: dict[str, dict[str, Any]],
) -> None:
    """`python3 -m scripts.compose_env --make-run` + `docker compose up -d postgres redis rabbitmq
    mailpit` is how `make run` works on a machine without them: the settings it writes must name
    the host ports compose publishes (on loopback only) and the users and passwords compose gives."""
    secrets_text = "\n".join(compose_env.missing_lines(""))
    secrets = compose_env.values(secrets_text)
    env = dict(line.split("=", 1) for line in compose_env.make_run_lines(secrets_text))
    Config.from_env(env)

    def published(service: str, container_port: int) -> int:
        for entry in services[service]["ports"]:
            spec = str(entry)
            if spec.endswith(f":{container_port}"):
                assert spec.startswith("127.0.0.1:"), f"{service} publishes {spec} beyond this machine"
                return int(spec.split(":")[1])
        raise AssertionError(f"{service} does not publish {container_port}")

    pg_user = _interpolate(_environment(services["postgres"])["POSTGRES_USER"])
    mq_user = _interpolate(_environment(services["rabbitmq"])["RABBITMQ_DEFAULT_USER"])
    names = set()
    for key in ("USERS_DB_URL", "TEMPLATES_DB_URL", "NOTIFICATIONS_DB_URL"):
        url = urlsplit(env[key])
        assert (url.hostname, url.port) == ("127.0.0.1", published("postgres", 5432)), key
        assert (url.username, url.password) == (pg_user, secrets["POSTGRES_PASSWORD"]), key
        names.add(url.path.lstrip("/"))
    assert names == {urlsplit(url).path.lstrip("/") for url in databases(Config()).values()}
    amqp = urlsplit(env["RABBITMQ_URL"])
    assert (amqp.hostname, amqp.port) == ("127.0.0.1", published("rabbitmq", 5672))
    assert (amqp.username, amqp.password) == (mq_user, secrets["RABBITMQ_PASSWORD"])
    redis_url = urlsplit(env["REDIS_URL"])
    assert (redis_url.hostname, redis_url.port) == ("127.0.0.1", published("redis", 6379))
    # SMTP_HOST keeps its default, 127.0.0.1; make run starts no sink of its own off port 1025.
    assert "SMTP_HOST" not in env and Config().smtp_host == "127.0.0.1"
    assert int(env["SMTP_PORT"]) == published("mailpit", 1025) != 1025
    # Never a setting .env already has.
    kept = compose_env.make_run_lines(secrets_text + "\nREDIS_URL=redis://elsewhere:6379/0\n")
    assert [line.split("=", 1)[0] for line in kept] == [k for k in env if k != "REDIS_URL"]


# --- systemd -------------------------------------------------------------------------------------

SYSTEMD_UNIT = ROOT / "deploy/systemd/notify@.service"


def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections → key → values (a key may repeat, as EnvironmentFile does)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_the_systemd_unit_restarts_on_failure_and_stops_within_the_services_bound() -> None:
    service = _unit(SYSTEMD_UNIT.read_text())["Service"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]  # a configuration error, as the supervisor
    assert service["KillSignal"] == ["SIGTERM"] and service["KillMode"] == ["mixed"]
    assert float(service["TimeoutStopSec"][0]) > supervisor.STOP_TIMEOUT
    assert service["EnvironmentFile"] == ["/etc/notify/notify.env", "-/etc/notify/%i.env"]
    # Every variable of the example settings file is one a service reads.
    example = (ROOT / "deploy/systemd/notify.env.example").read_text()
    names = {line.split("=", 1)[0].lstrip("# ") for line in example.splitlines() if "=" in line}
    assert names and names <= CONFIG_VARIABLES, names - CONFIG_VARIABLES


@pytest.mark.parametrize("instance", sorted(DESIGN_PORTS))
def test_the_systemd_unit_starts_a_service_module_that_exists(instance: str) -> None:
    """The command line with systemd's own substitutions (%i, then ${NOTIFY_SERVICE}) made."""
    service = _unit(SYSTEMD_UNIT.read_text())["Service"]
    env = dict(entry.replace("%i", instance).split("=", 1) for entry in service["Environment"])
    argv = shlex.split(service["ExecStart"][0].replace("${NOTIFY_SERVICE}", env["NOTIFY_SERVICE"]))
    assert argv[0] == "/opt/notify/.venv/bin/python", argv
    path = ROOT / Path(argv[1]).relative_to(service["WorkingDirectory"][0])
    assert path.is_file(), path
    assert re.search(r"^def main\(", path.read_text(), re.M), f"{path} has no main()"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """As installed under /opt/notify, but pointed at this checkout, whose .venv exists."""
    unit = tmp_path / "notify@gateway.service"
    unit.write_text(SYSTEMD_UNIT.read_text().replace("/opt/notify", str(ROOT)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
