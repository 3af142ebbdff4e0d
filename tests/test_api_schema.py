"""The OpenAPI document matches the gateway, and a property-based run finds no 500 and no
response that breaks the schema."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from common.openapi import load_spec
from tests.conftest import API_KEY

ROOT = Path(__file__).resolve().parent.parent


def _normalise(path: str) -> str:
    return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", path)  # {channel:email|push} -> {channel}


async def test_the_document_describes_every_route_and_nothing_else(stack_factory: Any) -> None:
    stack = await stack_factory(workers=False)
    spec = load_spec()
    documented = {
        (method.upper(), path.rstrip("/"))
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    served = set()
    for route in stack.gateway.app.router.routes():
        info = route.resource.canonical if route.resource is not None else ""
        if route.method in ("HEAD", "*") or "{tail" in info:
            continue  # HEAD is automatic; the proxied trees are documented path by path
        if info.startswith("/console"):
            continue  # browser pages, not the API: docs/console.md, tests/test_console.py
        served.add((route.method, _normalise(info).rstrip("/")))
    assert served - documented == set(), "routes missing from docs/openapi.yaml"
    proxied = ("/api/v1/users", "/api/v1/templates", "/api/v1/auth")
    assert {d for d in documented - served if not d[1].startswith(proxied)} == set()

    response = await stack.gateway.get("/openapi.json")
    assert response.status == 200 and (await response.json())["openapi"].startswith("3.")
    page = await stack.gateway.get("/docs")
    text = await page.text()
    assert page.status == 200 and "POST</span> <code>/api/v1/notifications/</code>" in text


@pytest.mark.timeout(900)  # 200 examples per operation, both modes, on a 2-core machine: minutes
async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    stack_factory: Any, tmp_path: Path
) -> None:
    stack = await stack_factory(workers=False)
    await stack.create_user()
    await stack.create_template("welcome")
    base = str(stack.gateway.make_url("")).rstrip("/")
    conformance = (
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    )
    # 200 examples per operation, then the stateful phase along the links.
    # Valid data: every answer must match the document. Invalid data (which may even turn a
    # path into another route, e.g. an empty {code}): never a 500, always a clear 4xx.
    for mode, checks in (("positive", conformance), ("negative", "not_a_server_error")):
        command = [
            str(Path(sys.executable).parent / "st"),
            "run",
            f"{base}/openapi.json",
            "--header",
            f"Authorization: Bearer {API_KEY}",
            "--mode",
            mode,
            "--checks",
            checks,
            "--max-examples",
            "200",
            "--seed",
            "7",
            "--workers",
            "2",
            "--request-timeout",
            "10",
            "--suppress-health-check",
            "all",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path / mode),
        ]
        result = await asyncio.to_thread(
            subprocess.run, command, cwd=ROOT, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, f"{mode}: " + result.stdout[:8000] + result.stderr[-2000:]
        assert re.search(r"[1-9]\d* generated", result.stdout), result.stdout[-2000:]
        if mode == "positive":
            # The stateful phase followed the document's links (create → read, change, render).
            assert re.search(r"API Links: +[1-9]\d* covered", result.stdout), result.stdout[-2000:]
