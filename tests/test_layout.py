"""The floors of the house, read from the source (ast), so a stray import fails here before it
tangles anything:

- the ground floor (`common/` but `common/features/`) imports no feature and nothing above it
  (providers, topology, the console, a service);
- each feature (`common/features/<room>/`) imports the floor, never another feature;
- no service module imports another; the console and the providers stay on their floors;
- every typed key lives in `common/keys.py`; no module is much over 600 lines.

Imports made only for the type checker (`if TYPE_CHECKING:`) do not run, so they do not count
as a dependency; `common/keys.py` is the one floor module that names features' types that way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = {"gateway", "user_service", "template_service", "email_worker", "push_worker", "inbox_worker"}
UPPER_FLOORS = {"topology", "providers", "console", *SERVICES}
FEATURES = ROOT / "common" / "features"
FLOOR = sorted(p for p in (ROOT / "common").rglob("*.py") if FEATURES not in p.parents)
ROOMS = sorted(p for p in FEATURES.iterdir() if p.is_dir() and (p / "__init__.py").exists())
SOURCE = sorted(
    [
        *ROOT.glob("*.py"),
        *(p for d in ("common", "console", "providers", "topology") for p in (ROOT / d).rglob("*.py")),
    ]
)
MAX_LINES = 600


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, runtime_only: bool) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if runtime_only and isinstance(node, ast.If) and _type_checking_only(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def imported_modules(path: Path, package: str | None = None, runtime_only: bool = True) -> set[str]:
    """Every module a file imports when it runs, by its dotted name (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in _imports(tree, runtime_only):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            base = f"{parent}.{base}" if base else parent
        found.add(base)
        found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def room_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["common", "features"] else None


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", FLOOR, ids=rel)
def test_the_floor_imports_no_feature_and_nothing_above_it(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if top(m) in UPPER_FLOORS or room_of(m))
    assert not bad, f"{rel(path)} imports {bad}: common/ (but common/features/) is the ground floor"


@pytest.mark.parametrize("path", FLOOR, ids=rel)
def test_only_the_keys_module_names_features_even_for_the_type_checker(path: Path) -> None:
    if path.name == "keys.py" and path.parent.name == "common":
        return
    bad = sorted(m for m in imported_modules(path, runtime_only=False) if room_of(m))
    assert not bad, f"{rel(path)} names {bad}"


@pytest.mark.parametrize("room", ROOMS, ids=lambda p: p.name)
def test_a_feature_imports_the_floor_never_another_feature(room: Path) -> None:
    for path in sorted(room.rglob("*.py")):
        found = imported_modules(path, runtime_only=False)
        others = sorted(m for m in found if room_of(m) not in (None, room.name))
        assert not others, f"{rel(path)} imports {others}: features meet only on the floor"
        above = sorted(m for m in found if top(m) in {"topology", "console", *SERVICES})
        assert not above, f"{rel(path)} imports {above}: a feature sits under the services"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_no_service_imports_another(service: str) -> None:
    others = sorted(m for m in imported_modules(ROOT / f"{service}.py") if top(m) in SERVICES - {service})
    assert not others, f"{service}.py imports {others}: what two services share lives in common/"


@pytest.mark.parametrize("path", sorted((ROOT / "console").glob("*.py")), ids=lambda p: p.name)
def test_the_console_imports_no_service_nor_the_broker_topology(path: Path) -> None:
    """The gateway mounts the console, which reads the gateway's resources by their keys."""
    bad = sorted(m for m in imported_modules(path) if top(m) in UPPER_FLOORS - {"console"})
    assert not bad, f"console/{path.name} imports {bad}: it reads the gateway's keys instead"


@pytest.mark.parametrize("path", sorted((ROOT / "providers").glob("*.py")), ids=lambda p: p.name)
def test_providers_import_the_delivery_interface_not_the_worker_a_feature_or_a_service(path: Path) -> None:
    bad = sorted(
        m
        for m in imported_modules(path)
        if m.startswith("common.delivery.worker") or room_of(m) or top(m) in SERVICES
    )
    assert not bad, f"providers/{path.name} imports {bad}: providers take common.delivery.interface only"


@pytest.mark.parametrize("service", ["user_service", "template_service"])
def test_services_without_a_broker_import_no_broker_code(service: str) -> None:
    """Followed transitively through common/: the user and template services never touch RabbitMQ."""
    seen: set[str] = set()
    todo = [service]
    while todo:
        module = todo.pop()
        path = ROOT / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / module.replace(".", "/") / "__init__.py"
        if module in seen or not path.exists():
            continue
        seen.add(module)
        todo.extend(m for m in imported_modules(path) if top(m) in {"common", "topology"})
    broker = {"topology", "common.delivery.worker"} | {m for m in seen if m.startswith("common.broker")}
    assert not broker & seen, sorted(broker & seen)


@pytest.mark.parametrize("path", SOURCE, ids=rel)
def test_typed_keys_live_in_the_keys_module(path: Path) -> None:
    if rel(path) == "common/keys.py":
        return
    tree = ast.parse(path.read_text())
    made = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"AppKey", "RequestKey"}
    ]
    assert not made, f"{rel(path)} makes a key at line(s) {made}: every key is in common/keys.py"


@pytest.mark.parametrize("path", SOURCE, ids=rel)
def test_no_module_is_much_over_600_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{rel(path)} has {lines} lines: split it by what it does"


def test_the_checker_sees_a_bad_import(tmp_path: Path) -> None:
    """The tests above can fail: a file importing upward is caught, a type-only import is not
    a runtime one, and a feature importing another is seen as such."""
    bad = tmp_path / "probe.py"
    bad.write_text(
        "from typing import TYPE_CHECKING\nfrom topology import declare\nimport gateway\n"
        "from .. import providers\nif TYPE_CHECKING:\n    from common.features.bulk import store\n"
    )
    found = imported_modules(bad, package="common.sub")
    assert {"topology", "topology.declare", "gateway", "common.providers"} <= found
    assert "common.features.bulk" not in found
    assert "common.features.bulk" in imported_modules(bad, package="common.sub", runtime_only=False)
    assert room_of("common.features.bulk.store") == "bulk" and room_of("common.keys") is None
