"""Template service (:8002): templates with immutable versions, languages, sandboxed rendering.

A template is keyed by `code`; each language of it has its own version history and an active
version. Rendering falls back pt-BR → pt → the template's default language and says which
language and version it used.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from common import resources
from common.config import Config, load_config
from common.data import db
from common.keys import CONFIG_KEY, DB_KEY, REDIS_KEY, RENDER_KEY
from common.logs import project_var, setup_logging
from common.lookups.cache import bump_template_generation
from common.rendering import templating
from common.rendering.templating import PARTS, REQUIRED_PARTS, SINGLE_LINE_PARTS
from common.runner import run
from common.vocabulary import CHANNELS
from common.web import auth
from common.web.http import (
    PG_INT_MAX,
    ApiError,
    base_app,
    json_response,
    not_found,
    page_meta,
    paging,
    read_json,
    strict_int,
)
from common.web.validation import CODE_RE, LANGUAGE_RE, Fields, normalize_language

log = logging.getLogger("template_service")


MAX_SOURCE = 100_000
_VERSION_COLUMNS = (
    "code, language, version, subject, body, text_body, title, image_url, link, created_by, created_at"
)


# --- auth: only the internal token (clients come through the gateway) --------------------------


def _resolve(request: web.Request, presented: str) -> auth.Principal:
    if not auth.matches(request.app[CONFIG_KEY].internal_api_token, presented):
        raise auth.unauthorized()
    return auth.Principal("internal", "internal", auth.project_header(request))


# --- data access -----------------------------------------------------------------------------


def _parts_from(fields: Fields, channel: str, *, required: bool) -> dict[str, str | None]:
    parts: dict[str, str | None] = {}
    for part in PARTS[channel]:
        needed = required and part in REQUIRED_PARTS[channel]
        parts[part] = fields.string(part, required=needed, max_len=MAX_SOURCE)
    for part in SINGLE_LINE_PARTS:
        source = parts.get(part)
        if source and ("\r" in source or "\n" in source):
            fields.error(part, "must be a single line")
    for other in {p for ps in PARTS.values() for p in ps} - set(PARTS[channel]):
        if fields.body.get(other) is not None:
            fields.error(other, f"is not a part of {channel} templates")
    return parts


async def _template(database: db.Executor, code: str) -> dict[str, Any]:
    if not CODE_RE.match(code):
        raise not_found(f"Template {code[:100]!r}")  # no such code can exist; spares the query
    row = await database.fetchrow(
        "SELECT code, notification_type, default_language, created_at FROM templates"
        " WHERE project_id = %s AND code = %s",
        project_var.get(),
        code,
    )
    if row is None:
        raise not_found(f"Template {code!r}")
    return row


def _language_chain(requested: str | None, default: str) -> list[str]:
    chain: list[str] = []
    if requested:
        requested = normalize_language(requested)
        chain.append(requested)
        base = requested.split("-")[0]
        if base != requested:
            chain.append(base)
    if default not in chain:
        chain.append(default)
    return chain


async def resolve(
    database: db.Database, code: str, language: str | None, version: int | None
) -> dict[str, Any]:
    """The version to use: for the first language in the fallback chain that exists."""
    template = await _template(database, code)
    chain = _language_chain(language, template["default_language"])
    rows = await database.fetch(
        "SELECT language, active_version FROM template_languages"
        " WHERE project_id = %s AND code = %s AND language = ANY(%s)",
        project_var.get(),
        code,
        chain,
    )
    active = {r["language"]: r["active_version"] for r in rows}
    chosen = next((lang for lang in chain if lang in active), None)
    if chosen is None:
        raise not_found(f"Template {code!r} in language {language!r}")
    row = await database.fetchrow(
        f"SELECT {_VERSION_COLUMNS} FROM template_versions"
        " WHERE project_id = %s AND code = %s AND language = %s AND version = %s",
        project_var.get(),
        code,
        chosen,
        version or active[chosen],
    )
    if row is None:
        raise not_found(f"Version {version} of template {code!r} ({chosen})")
    row.update(
        notification_type=template["notification_type"],
        default_language=template["default_language"],
        active_version=active[chosen],
        requested_language=language,
        fallback_chain=chain,
    )
    return row


# --- handlers --------------------------------------------------------------------------------


def _principal_name(request: web.Request) -> str:
    return request.headers.get("X-Actor", "api")[:100]


async def create_template(request: web.Request) -> web.Response:
    body = await read_json(request)
    fields = Fields(body)
    fields.unknown({"code", "notification_type", "language", *{p for ps in PARTS.values() for p in ps}})
    code = fields.string("code", max_len=100, pattern=CODE_RE, hint="letters, digits, _ . - only")
    channel = fields.string("notification_type", max_len=10)
    if channel is not None and channel not in CHANNELS:
        fields.error("notification_type", "must be one of " + ", ".join(CHANNELS))
        channel = None
    language = fields.language() or "en"
    fields.check()
    assert code and channel
    parts = _parts_from(fields, channel, required=True)
    for part, problem in templating.syntax_errors(channel, parts).items():
        fields.error(part, problem)
    for part, problem in templating.budget_errors(channel, parts).items():
        fields.error(part, problem)
    fields.check()
    database = request.app[DB_KEY]
    project = project_var.get()
    async with database.transaction() as tx:
        # Insert-or-nothing first: two creates of one new code at once then queue on the row
        # instead of both inserting (the second would be a unique violation).
        await tx.execute(
            "INSERT INTO templates (project_id, code, notification_type, default_language)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT (project_id, code) DO NOTHING",
            project,
            code,
            channel,
            language,
        )
        existing = await tx.fetchrow(
            "SELECT notification_type FROM templates WHERE project_id = %s AND code = %s FOR UPDATE",
            project,
            code,
        )
        assert existing is not None
        if existing["notification_type"] != channel:
            raise ApiError(
                409, "conflict", f"Template {code!r} exists as a {existing['notification_type']} template."
            )
        inserted = await tx.execute(
            "INSERT INTO template_languages (project_id, code, language, active_version)"
            " VALUES (%s, %s, %s, 1) ON CONFLICT DO NOTHING",
            project,
            code,
            language,
        )
        if not inserted:
            raise ApiError(
                409,
                "conflict",
                f"Template {code!r} already exists in {language!r}; "
                f"PUT /api/v1/templates/{code} adds a version.",
            )
        row = await tx.fetchrow(
            f"INSERT INTO template_versions (project_id, code, language, version, subject, body,"
            f" text_body, title, image_url, link, created_by)"
            f" VALUES (%s, %s, %s, 1, %s, %s, %s, %s, %s, %s, %s) RETURNING {_VERSION_COLUMNS}",
            project,
            code,
            language,
            parts.get("subject"),
            parts.get("body"),
            parts.get("text_body"),
            parts.get("title"),
            parts.get("image_url"),
            parts.get("link"),
            _principal_name(request),
        )
    assert row is not None
    row.update(notification_type=channel, active_version=1)
    await bump_template_generation(request.app[REDIS_KEY])
    return json_response(row, "template created", status=201)


async def update_template(request: web.Request) -> web.Response:
    code = request.match_info["code"]
    body = await read_json(request)
    database = request.app[DB_KEY]
    template = await _template(database, code)
    channel = template["notification_type"]
    fields = Fields(body)
    fields.unknown({"language", "notification_type", *PARTS[channel]})
    language = fields.language() or template["default_language"]
    parts = _parts_from(fields, channel, required=False)
    if not any(v is not None for v in parts.values()):
        fields.error("body", "send at least one part to change")
    for part, problem in templating.syntax_errors(channel, parts).items():
        fields.error(part, problem)
    for part, problem in templating.budget_errors(channel, parts).items():
        fields.error(part, problem)
    fields.check()
    project = project_var.get()
    async with database.transaction() as tx:
        current = await tx.fetchrow(
            "SELECT active_version FROM template_languages"
            " WHERE project_id = %s AND code = %s AND language = %s FOR UPDATE",
            project,
            code,
            language,
        )
        if current is None:
            # A new language of an existing template starts its own history at version 1.
            await tx.execute(
                "INSERT INTO template_languages (project_id, code, language, active_version)"
                " VALUES (%s, %s, %s, 0)",
                project,
                code,
                language,
            )
            base: dict[str, Any] = {}
        else:
            base = (
                await tx.fetchrow(
                    f"SELECT {_VERSION_COLUMNS} FROM template_versions"
                    " WHERE project_id = %s AND code = %s AND language = %s AND version = %s",
                    project,
                    code,
                    language,
                    current["active_version"],
                )
                or {}
            )
        merged = {p: parts[p] if parts.get(p) is not None else base.get(p) for p in PARTS[channel]}
        missing = [p for p in REQUIRED_PARTS[channel] if not merged.get(p)]
        if missing:
            raise ApiError(
                400,
                "validation_error",
                f"Missing parts: {', '.join(missing)}.",
                data={"fields": dict.fromkeys(missing, "is required")},
            )
        row = await tx.fetchrow(
            f"""
            INSERT INTO template_versions (project_id, code, language, version, subject, body,
                text_body, title, image_url, link, created_by)
            SELECT %s, %s, %s, coalesce(max(version), 0) + 1, %s, %s, %s, %s, %s, %s, %s
            FROM template_versions WHERE project_id = %s AND code = %s AND language = %s
            RETURNING {_VERSION_COLUMNS}
            """,
            project,
            code,
            language,
            merged.get("subject"),
            merged.get("body"),
            merged.get("text_body"),
            merged.get("title"),
            merged.get("image_url"),
            merged.get("link"),
            _principal_name(request),
            project,
            code,
            language,
        )
        assert row is not None
        await tx.execute(
            "UPDATE template_languages SET active_version = %s, updated_at = now()"
            " WHERE project_id = %s AND code = %s AND language = %s",
            row["version"],
            project,
            code,
            language,
        )
    row.update(notification_type=channel, active_version=row["version"])
    await bump_template_generation(request.app[REDIS_KEY])
    return json_response(row, "template updated")


def _version_param(request: web.Request, raw: str | None) -> int | None:
    if raw is None:
        return None
    version = strict_int(raw)
    if version is None:
        raise ApiError(
            400,
            "validation_error",
            f"version must be a whole number from 1 to {PG_INT_MAX}.",
            data={"fields": {"version": f"must be a whole number from 1 to {PG_INT_MAX}"}},
        )
    return version


def _language_param(request: web.Request) -> str | None:
    raw = request.query.get("language")
    if raw is None:
        return None
    if not LANGUAGE_RE.match(raw):
        raise ApiError(
            400,
            "validation_error",
            "language must be a language tag like en or pt-BR.",
            data={"fields": {"language": "must be a language tag like en or pt-BR"}},
        )
    return normalize_language(raw)


async def get_template(request: web.Request) -> web.Response:
    row = await resolve(
        request.app[DB_KEY],
        request.match_info["code"],
        _language_param(request),
        _version_param(request, request.query.get("version")),
    )
    return json_response(row, "template")


async def list_templates(request: web.Request) -> web.Response:
    page, limit = paging(request)
    database = request.app[DB_KEY]
    project = project_var.get()
    total = await database.fetchval("SELECT count(*) FROM templates WHERE project_id = %s", project)
    rows = await database.fetch(
        """
        SELECT t.code, t.notification_type, t.default_language, t.created_at,
               coalesce(jsonb_object_agg(l.language, l.active_version)
                        FILTER (WHERE l.language IS NOT NULL), '{}') AS active_versions
        FROM templates t LEFT JOIN template_languages l USING (project_id, code)
        WHERE t.project_id = %s
        GROUP BY t.project_id, t.code ORDER BY t.code LIMIT %s OFFSET %s
        """,
        project,
        limit,
        (page - 1) * limit,
    )
    return json_response(rows, "templates", meta=page_meta(int(total), limit, page))


async def list_versions(request: web.Request) -> web.Response:
    """Paginated: a template may have many versions of up to ~600 KB each."""
    code = request.match_info["code"]
    page, limit = paging(request)
    database = request.app[DB_KEY]
    await _template(database, code)
    language = _language_param(request)
    total = await database.fetchval(
        "SELECT count(*) FROM template_versions"
        " WHERE project_id = %s AND code = %s AND (%s::text IS NULL OR language = %s)",
        project_var.get(),
        code,
        language,
        language,
    )
    rows = await database.fetch(
        f"SELECT {_VERSION_COLUMNS}, (v.version = l.active_version) AS active"
        " FROM template_versions v JOIN template_languages l USING (project_id, code, language)"
        " WHERE project_id = %s AND code = %s AND (%s::text IS NULL OR language = %s)"
        " ORDER BY language, version LIMIT %s OFFSET %s",
        project_var.get(),
        code,
        language,
        language,
        limit,
        (page - 1) * limit,
    )
    return json_response(rows, "versions", meta=page_meta(int(total), limit, page))


async def activate_version(request: web.Request) -> web.Response:
    code = request.match_info["code"]
    version = strict_int(request.match_info["version"])
    if version is None:
        raise not_found(f"Version {request.match_info['version'][:20]!r} of template {code!r}")
    body = await read_json(request) if request.can_read_body else {}
    database = request.app[DB_KEY]
    template = await _template(database, code)
    fields = Fields(body)
    language = fields.language() or template["default_language"]
    fields.check()
    updated = await database.execute(
        "UPDATE template_languages SET active_version = %s, updated_at = now()"
        " WHERE project_id = %s AND code = %s AND language = %s AND EXISTS (SELECT 1 FROM"
        " template_versions WHERE project_id = %s AND code = %s AND language = %s AND version = %s)",
        version,
        project_var.get(),
        code,
        language,
        project_var.get(),
        code,
        language,
        version,
    )
    if not updated:
        raise not_found(f"Version {version} of template {code!r} ({language})")
    await bump_template_generation(request.app[REDIS_KEY])
    return json_response(await resolve(database, code, language, None), "version activated")


async def render(request: web.Request) -> web.Response:
    code = request.match_info["code"]
    body = await read_json(request)
    fields = Fields(body)
    language = fields.language()
    version = body.get("version")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= PG_INT_MAX
    ):
        fields.error("version", f"must be a whole number from 1 to {PG_INT_MAX}")
    variables = fields.object("variables")
    # Who to preview it for (`recipient` in the template): id, name, email, phone, language,
    # timezone, data; absent fields render empty.
    recipient = fields.object("recipient")
    fields.check()
    row = await resolve(request.app[DB_KEY], code, language, version)
    channel = row["notification_type"]
    try:
        rendered: dict[str, Any] = await request.app[RENDER_KEY].render(channel, row, variables, recipient)
    except templating.RenderError as exc:
        raise ApiError(
            422, exc.code, exc.message, data={"fields": exc.fields} if exc.fields else None
        ) from None
    rendered.update(
        code=code,
        notification_type=channel,
        language=row["language"],
        version=row["version"],
        requested_language=language,
    )
    return json_response(rendered, "rendered")


def create_app(config: Config) -> web.Application:
    app = base_app("template_service", config)
    app.middlewares.append(auth.middleware(_resolve))
    app.cleanup_ctx.append(resources.database(lambda c: c.templates_db_url, "postgres"))
    app.cleanup_ctx.append(resources.redis_client())
    app.cleanup_ctx.append(resources.render_pool())
    r = app.router
    for path in ("/api/v1/templates", "/api/v1/templates/"):
        r.add_post(path, create_template)
        r.add_get(path, list_templates)
    r.add_get("/api/v1/templates/{code}", get_template)
    r.add_put("/api/v1/templates/{code}", update_template)
    r.add_get("/api/v1/templates/{code}/versions", list_versions)
    r.add_post("/api/v1/templates/{code}/versions/{version}/activate", activate_version)
    r.add_post("/api/v1/templates/{code}/render", render)
    return app


def main() -> None:
    config = load_config("internal_api_token")
    setup_logging("template_service", config.log_level, config.log_format)
    run(create_app(config), config, default_port=8002)


if __name__ == "__main__":
    main()
