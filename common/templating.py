"""Template rendering, shared by the template service (preview, /render) and the workers.

Jinja2 runs in a sandbox with StrictUndefined: a missing variable is an error naming it, never
an empty string. HTML email bodies are autoescaped; subjects, text parts and push fields are not.
Each render has a time and an output-size budget, so a hostile template cannot hang or bloat a
worker. Compiled templates are cached by source: versions are immutable, so never stale.
"""

from __future__ import annotations

import asyncio
import ctypes
import re
import threading
import time
from collections.abc import Mapping
from functools import lru_cache
from html.parser import HTMLParser
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import SandboxedEnvironment, SecurityError

PARTS = {
    "email": ("subject", "body", "text_body"),
    "push": ("title", "body", "image_url", "link"),
}
REQUIRED_PARTS = {"email": ("subject", "body"), "push": ("title", "body")}
HTML_PARTS = {("email", "body")}
SINGLE_LINE_PARTS = ("subject", "title", "image_url", "link")
MAX_RANGE = 10_000
MAX_OUTPUT = 1_000_000
RENDER_TIMEOUT = 2.0


class RenderError(Exception):
    def __init__(self, code: str, message: str, fields: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = dict(fields or {})


class _RenderTimeout(BaseException):
    """Raised inside a render thread that ran past its budget (BaseException: not caught by
    anything a template can reach)."""


class _Environment(SandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        # "x" * 10**9 or 10**10**10 would stop a worker inside C code, beyond any time budget.
        if operator == "**" and isinstance(right, int) and abs(right) > 100:
            raise SecurityError("exponents above 100 are not allowed in templates")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT:
                    raise SecurityError("that repetition would exceed the output budget")
        return super().call_binop(context, operator, left, right)

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        # The sandbox stops attribute escapes; this stops range() from making huge loops.
        if __obj is range and any(isinstance(a, int) and abs(a) > MAX_RANGE for a in args):
            raise SecurityError(f"range() is limited to {MAX_RANGE} items in templates")
        return super().call(__context, __obj, *args, **kwargs)


_ENVS = {
    True: _Environment(autoescape=True, undefined=jinja2.StrictUndefined),
    False: _Environment(autoescape=False, undefined=jinja2.StrictUndefined),
}


@lru_cache(maxsize=4096)
def compile_source(source: str, html: bool) -> tuple[jinja2.Template, frozenset[str]]:
    """The compiled template and the variables it needs; raises TemplateSyntaxError."""
    env = _ENVS[html]
    ast = env.parse(source)
    return env.from_string(ast), frozenset(jinja2.meta.find_undeclared_variables(ast))


@lru_cache(maxsize=4096)
def _may_run_long(source: str) -> bool:
    """Whether a template can loop (for, macros that may recurse, call blocks). Without these its
    running time is bounded by its own size, so it is rendered on the event loop, which saves a
    thread hand-off per notification."""
    ast = _ENVS[False].parse(source)
    return any(True for _ in ast.find_all((jinja2.nodes.For, jinja2.nodes.Macro, jinja2.nodes.CallBlock)))


def syntax_errors(channel: str, parts: Mapping[str, str | None]) -> dict[str, str]:
    errors = {}
    for part, source in parts.items():
        if source is None:
            continue
        try:
            compile_source(source, (channel, part) in HTML_PARTS)
        except jinja2.TemplateSyntaxError as exc:
            errors[part] = f"template syntax error on line {exc.lineno}: {exc.message}"
    return errors


def required_variables(channel: str, version: Mapping[str, Any]) -> frozenset[str]:
    needed: set[str] = set()
    for part in PARTS[channel]:
        source = version.get(part)
        if source is not None:
            needed |= compile_source(source, (channel, part) in HTML_PARTS)[1]
    return frozenset(needed)


def missing_variables(
    channel: str, version: Mapping[str, Any], variables: Mapping[str, Any]
) -> RenderError | None:
    missing = sorted(required_variables(channel, version) - variables.keys())
    if not missing:
        return None
    return RenderError(
        "missing_variable",
        f"Missing template variable(s): {', '.join(missing)}.",
        {f"variables.{name}": "is required by the template" for name in missing},
    )


class _TextExtractor(HTMLParser):
    _BREAKS = frozenset({"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"})

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self._BREAKS:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.chunks.append(data)


def html_to_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in "".join(parser.chunks).splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _render_sync(
    channel: str, version: Mapping[str, Any], variables: Mapping[str, Any], deadline: float
) -> dict[str, str]:
    rendered: dict[str, str] = {}
    for part in PARTS[channel]:
        source = version.get(part)
        if source is None:
            continue
        template, _ = compile_source(source, (channel, part) in HTML_PARTS)
        size = 0
        chunks = []
        try:
            for chunk in template.generate(dict(variables)):
                size += len(chunk)
                if size > MAX_OUTPUT:
                    raise RenderError(
                        "render_too_large", f"The rendered {part} exceeds {MAX_OUTPUT} characters."
                    )
                if time.monotonic() > deadline:
                    raise RenderError("render_timeout", f"Rendering took longer than {RENDER_TIMEOUT:g}s.")
                chunks.append(chunk)
        except jinja2.UndefinedError as exc:
            raise RenderError(
                "missing_variable", f"Template variable error in {part}: {exc.message}."
            ) from None
        except SecurityError as exc:
            raise RenderError(
                "template_refused", f"The template did something unsafe in {part}: {exc}."
            ) from None
        except (
            jinja2.TemplateError,
            TypeError,
            ValueError,
            ArithmeticError,
            LookupError,
            AttributeError,
        ) as exc:
            raise RenderError("render_error", f"The {part} could not be rendered: {exc}.") from None
        rendered[part] = "".join(chunks)
    for part in SINGLE_LINE_PARTS:
        if part in rendered:
            # A line break in a subject would start a mail header of its own: fold it away.
            rendered[part] = " ".join(rendered[part].split())
    if channel == "email" and not rendered.get("text_body"):
        rendered["text_body"] = html_to_text(rendered["body"])
    return rendered


def _interrupt(thread_id: int) -> None:
    # Raises _RenderTimeout inside the render thread at its next bytecode: the only way to stop
    # a runaway loop in pure Python without a process per render.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(_RenderTimeout))


def _resolve(
    future: asyncio.Future[dict[str, str]], result: dict[str, str] | None, error: BaseException | None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result or {})


async def render(channel: str, version: Mapping[str, Any], variables: Mapping[str, Any]) -> dict[str, str]:
    """Render every part of a template version within the time and size budget."""
    problem = missing_variables(channel, version, variables)
    if problem is not None:
        raise problem
    deadline = time.monotonic() + RENDER_TIMEOUT
    if not any(_may_run_long(version[p]) for p in PARTS[channel] if version.get(p) is not None):
        return _render_sync(channel, version, variables, deadline)

    # A template that can loop runs in a thread of its own, which can be interrupted; one per
    # render rather than a pool, so an interruption landing late can only end that thread.
    loop = asyncio.get_running_loop()
    future: asyncio.Future[dict[str, str]] = loop.create_future()
    timeout = RenderError("render_timeout", f"Rendering took longer than {RENDER_TIMEOUT:g}s.")

    def run() -> None:
        try:
            try:
                result = _render_sync(channel, version, variables, deadline)
            except RenderError as exc:
                loop.call_soon_threadsafe(_resolve, future, None, exc)
            except _RenderTimeout:
                loop.call_soon_threadsafe(_resolve, future, None, timeout)
            except Exception as exc:  # noqa: BLE001 - reported to the caller as a render error
                loop.call_soon_threadsafe(_resolve, future, None, RenderError("render_error", str(exc)))
            else:
                loop.call_soon_threadsafe(_resolve, future, result, None)
        except _RenderTimeout:
            pass  # the interruption arrived after the result: nothing left to stop

    thread = threading.Thread(target=run, name="render", daemon=True)
    thread.start()
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout=RENDER_TIMEOUT)
    except TimeoutError:
        if thread.is_alive() and thread.ident is not None:
            _interrupt(thread.ident)
        try:
            return await asyncio.wait_for(future, timeout=1.0)
        except TimeoutError:
            raise timeout from None
