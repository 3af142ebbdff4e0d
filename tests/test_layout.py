"""The floors of the house: `common/` is the ground floor and imports nothing above it; no
service module imports another. Read from the source (ast), so a stray import fails here before
it tangles anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = {"gateway", "user_service", "template_service", "email_worker", "push_worker"}
UPPER_FLOORS = {"topology", "providers", *SERVICES}


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Every module a file imports, by its dotted name (relative imports resolved to absolute)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", sorted((ROOT / "common").glob("*.py")), ids=lambda p: p.name)
def test_common_imports_nothing_above_it(path: Path) -> None:
    upward = sorted(m for m in imported_modules(path) if top(m) in UPPER_FLOORS)
    assert not upward, f"common/{path.name} imports {upward}: common/ is the ground floor"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_no_service_imports_another(service: str) -> None:
    others = sorted(m for m in imported_modules(ROOT / f"{service}.py") if top(m) in SERVICES - {service})
    assert not others, f"{service}.py imports {others}: what two services share lives in common/"


@pytest.mark.parametrize("path", sorted((ROOT / "console").glob("*.py")), ids=lambda p: p.name)
def test_the_console_imports_no_service_nor_the_broker_topology(path: Path) -> None:
    """The gateway mounts the console and hands it what it uses (`console.Wiring`)."""
    bad = sorted(m for m in imported_modules(path) if top(m) in UPPER_FLOORS)
    assert not bad, f"console/{path.name} imports {bad}: it is given the gateway's keys instead"


@pytest.mark.parametrize("path", sorted((ROOT / "providers").glob("*.py")), ids=lambda p: p.name)
def test_providers_do_not_import_the_worker_loop_or_a_service(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if m.startswith("common.worker") or top(m) in SERVICES)
    assert not bad, f"providers/{path.name} imports {bad}: providers take common.delivery only"


@pytest.mark.parametrize("service", ["user_service", "template_service"])
def test_services_without_a_broker_import_no_broker_code(service: str) -> None:
    """Followed transitively through common/: the user and template services never touch RabbitMQ."""
    seen: set[str] = set()
    todo = [service]
    while todo:
        module = todo.pop()
        path = ROOT / (module.replace(".", "/") + ".py")
        if module in seen or not path.exists():
            continue
        seen.add(module)
        todo.extend(m for m in imported_modules(path) if top(m) in {"common", "topology"})
    assert not {"common.amqp", "topology", "common.outbox", "common.worker"} & seen, sorted(seen)


def test_the_checker_sees_a_bad_import(tmp_path: Path) -> None:
    """The test above can fail: a file importing upward is caught."""
    bad = tmp_path / "probe.py"
    bad.write_text("from topology import declare\nimport gateway\nfrom .. import providers\n")
    found = imported_modules(bad, package="common.sub")
    assert {"topology", "topology.declare", "gateway", "common.providers"} <= found
