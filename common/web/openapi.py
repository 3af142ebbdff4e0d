"""The gateway's OpenAPI document (docs/openapi.yaml) as JSON, and a readable HTML page of it."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
METHODS = ("get", "post", "put", "patch", "delete")


def load_spec(path: Path = SPEC_PATH) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(path.read_text())
    return spec


def _schema_name(schema: dict[str, Any] | None) -> str:
    if not schema:
        return ""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if schema.get("type") == "array":
        return f"array of {_schema_name(schema.get('items'))}"
    return str(schema.get("type", "object"))


def render_html(spec: dict[str, Any]) -> str:
    """A self-contained page (no scripts, no external assets) listing every operation."""
    e = html.escape
    info = spec.get("info", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(info.get('title', 'API'))}</title>",
        "<style>body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "code,.m{font-family:ui-monospace,monospace}.op{border-top:1px solid #ddd;padding:.6rem 0}"
        ".m{display:inline-block;min-width:4.5rem;font-weight:bold}.d{color:#444;white-space:pre-wrap}"
        "td{padding:.1rem .6rem .1rem 0;vertical-align:top}</style></head><body>",
        f"<h1>{e(info.get('title', 'API'))} <small>{e(str(info.get('version', '')))}</small></h1>",
        f"<p class='d'>{e(info.get('description', ''))}</p>",
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a></p>",
    ]
    for path, item in spec.get("paths", {}).items():
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            parts.append(f"<div class='op'><span class='m'>{method.upper()}</span> <code>{e(path)}</code>")
            if op.get("summary"):
                parts.append(f" — {e(op['summary'])}")
            if op.get("description"):
                parts.append(f"<div class='d'>{e(op['description'])}</div>")
            params = [*item.get("parameters", []), *op.get("parameters", [])]
            rows = []
            for param in params:
                if "$ref" in param:
                    param = spec["components"]["parameters"][param["$ref"].rsplit("/", 1)[-1]]
                rows.append(
                    f"<tr><td><code>{e(param['name'])}</code></td><td>{e(param['in'])}</td>"
                    f"<td>{e(_schema_name(param.get('schema')))}</td></tr>"
                )
            if rows:
                parts.append("<table>" + "".join(rows) + "</table>")
            body = op.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                parts.append(
                    f"<div>Body ({e(media)}): <code>{e(_schema_name(content.get('schema')))}</code></div>"
                )
            statuses = ", ".join(str(s) for s in op.get("responses", {}))
            parts.append(f"<div>Responses: {e(statuses)}</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def add_routes(app: web.Application) -> None:
    """`/openapi.json` and `/docs`, rendered once at start."""
    spec = load_spec()
    body, page = orjson.dumps(spec), render_html(spec)

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def openapi_page(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", openapi_page)
