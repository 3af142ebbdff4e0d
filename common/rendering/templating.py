"""Template rendering rules, shared by the template service (preview, /render) and the workers.

Jinja2 runs in an immutable sandbox with StrictUndefined: a missing variable is an error naming
it, never an empty string. HTML email bodies and in-app titles and bodies are autoescaped;
subjects, text parts and push fields are not.

Budgets. A template is client text, so its cost is bounded three ways:
- at creation, what can be known from the source is refused (`budget_errors`): a literal width,
  count or repetition beyond the output budget, an exponent above 100;
- at render, inside the sandbox, every operator, filter, global and string method that can
  allocate more than its input (`*`, `**`, `+`, `%`, `format`, `center`, `ljust`, `indent`,
  `wordwrap`, `join`, `replace`, `lipsum`, `range`, …) checks the size it would produce first,
  and each part's output is counted as it is generated (`OUTPUT_BUDGET`);
- the render itself runs in a child process (`common/rendering/renderer.py`) with an address-space limit
  and a deadline after which it is killed, which bounds whatever the checks above do not foresee.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from functools import wraps
from html.parser import HTMLParser
from typing import Any, TypeVar

import jinja2
import jinja2.meta
import jinja2.nodes as nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import generate_lorem_ipsum

from common.lru import LRU

PARTS = {
    "email": ("subject", "body", "text_body"),
    "push": ("title", "body", "image_url", "link"),
    "in_app": ("title", "body", "image_url", "link"),
}
REQUIRED_PARTS = {"email": ("subject", "body"), "push": ("title", "body"), "in_app": ("title", "body")}
# Autoescaped: variables cannot add markup. An in-app message is shown in a web page, so its
# title and body are HTML fragments (the template's own markup kept, its variables escaped).
HTML_PARTS = {("email", "body"), ("in_app", "title"), ("in_app", "body")}
SINGLE_LINE_PARTS = ("subject", "title", "image_url", "link")

OUTPUT_BUDGET = 1_000_000  # characters per rendered part, and per value a template may build
TIME_BUDGET = 2.0  # seconds per render, all parts
MEMORY_BUDGET = 256 * 1024**2  # bytes of address space of a render process
MAX_RANGE = 10_000  # items of one range()
MAX_EXPONENT = 100
MAX_INT_BITS = 100_000  # an integer a template builds (a 30,000-digit number)
MAX_LIPSUM_WORDS = 5_000
CACHE_BYTES = 64 * 1024**2  # compiled templates kept, by estimated size

_FORMAT_NUMBER = re.compile(r"\d+")
# Filters and string methods whose number arguments are sizes of what they make.
_WIDTH_TAKERS = frozenset(
    {"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap", "batch", "slice"}
)
_NESTED_SPEC = re.compile(r"\{[^{}]*:[^{}]*\{")
_PRINTF_STAR = re.compile(r"%(?:\([^)]*\))?[-#0 +]*\*|%(?:\([^)]*\))?[-#0 +]*\d*\.\*")


class RenderError(Exception):
    def __init__(self, code: str, message: str, fields: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = dict(fields or {})


def _over_budget(what: str, size: int) -> SecurityError:
    return SecurityError(
        f"{what} would make {size:,} characters, beyond the output budget of {OUTPUT_BUDGET:,}"
    )


def _check_size(what: str, size: int) -> None:
    if size > OUTPUT_BUDGET:
        raise _over_budget(what, size)


def _check_width(what: str, width: Any) -> None:
    if isinstance(width, int) and not isinstance(width, bool) and abs(width) > OUTPUT_BUDGET:
        raise _over_budget(what, abs(width))


def _check_format_string(what: str, fmt: Any) -> None:
    """Widths and precisions in a format string (`%200000000s`, `{:>200000000}`) allocate."""
    if not isinstance(fmt, str):
        return
    for number in _FORMAT_NUMBER.findall(fmt):
        if len(number) > 7 or int(number) > OUTPUT_BUDGET:
            raise _over_budget(f"the format {what}", int(number[:18]))
    if "%" in fmt and _PRINTF_STAR.search(fmt):
        raise SecurityError("'*' widths are not allowed in template formats; write the width")


def _len(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict) else 0


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    length, old_len, new_len = _len(s), _len(old), _len(new)
    occurrences = length + 1 if old_len == 0 else length // old_len
    if isinstance(count, int) and count >= 0:
        occurrences = min(occurrences, count)
    return length + occurrences * new_len


def _join_size(sep: Any, items: Any) -> int:
    if not isinstance(items, list | tuple):
        return 0
    return _len(sep) * max(len(items) - 1, 0) + sum(_len(item) for item in items)


def _check_str_method(name: str, owner: str | bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """String methods reachable from a template that can grow their input."""
    if name in ("center", "ljust", "rjust", "zfill"):
        _check_width(f"{name}()", args[0] if args else kwargs.get("width"))
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        if isinstance(size, int):
            _check_size("expandtabs()", len(owner) + tabs * size)
    elif name == "replace" and len(args) >= 2:
        _check_size("replace()", _replace_size(owner, args[0], args[1], args[2] if len(args) > 2 else -1))
    elif name == "join" and args:
        _check_size("join()", _join_size(owner, args[0]))


def _capped_range(*args: int) -> range:
    result = range(*args)
    if len(result) > MAX_RANGE:
        raise SecurityError(f"range() is limited to {MAX_RANGE:,} items in templates")
    return result


def _capped_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if n * max > MAX_LIPSUM_WORDS:
        raise SecurityError(f"lipsum() is limited to {MAX_LIPSUM_WORDS:,} words in templates")
    return generate_lorem_ipsum(n, html, min, max)


F = TypeVar("F", bound=Callable[..., Any])


def _guarded(original: F, check: Callable[..., None], skip: int = 0) -> F:
    """A filter that checks its arguments first; `skip` leaves out a context Jinja passes."""

    @wraps(original)  # keeps jinja_pass_arg, so Jinja still passes the context
    def filter_(*args: Any, **kwargs: Any) -> Any:
        check(*args[skip:], **kwargs)
        return original(*args, **kwargs)

    return filter_  # type: ignore[return-value]


def _indent_check(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> None:
    lines = str(s).count("\n") + 1
    per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    _check_size("indent", _len(s) + lines * per_line)


def _wordwrap_check(s: Any, width: Any = 79, *args: Any, **kwargs: Any) -> None:
    wrapstring = kwargs.get("wrapstring", args[1] if len(args) > 1 else None)
    if isinstance(width, int) and isinstance(wrapstring, str):
        _check_size("wordwrap", _len(s) + (_len(s) // max(width, 1) + 1) * len(wrapstring))


def _join_check(value: Any, d: Any = "", attribute: Any = None) -> None:
    _check_size("join", _join_size(d, value))


def _replace_check(s: Any, old: Any, new: Any, count: Any = None) -> None:
    _check_size("replace", _replace_size(s, old, new, -1 if count is None else count))


def _format_check(value: Any, *args: Any, **kwargs: Any) -> None:
    _check_format_string("filter", value)


def _center_check(value: Any, width: Any = 80) -> None:
    _check_width("center", width)


def _count_check(value: Any, count: Any = None, *args: Any) -> None:
    _check_width("that count", count)


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox with every allocating operation checked before it allocates."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, **kwargs)
        self.globals["range"] = _capped_range
        self.globals["lipsum"] = _capped_lipsum
        f = self.filters
        f["center"] = _guarded(f["center"], _center_check)
        f["format"] = _guarded(f["format"], _format_check)
        f["indent"] = _guarded(f["indent"], _indent_check)
        f["wordwrap"] = _guarded(f["wordwrap"], _wordwrap_check, skip=1)
        f["join"] = _guarded(f["join"], _join_check, skip=1)
        f["replace"] = _guarded(f["replace"], _replace_check, skip=1)
        f["batch"] = _guarded(f["batch"], _count_check)
        f["slice"] = _guarded(f["slice"], _count_check)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int):
            if abs(right) > MAX_EXPONENT:
                raise SecurityError(f"exponents above {MAX_EXPONENT} are not allowed in templates")
            if isinstance(left, int) and left.bit_length() * right > MAX_INT_BITS:
                raise SecurityError("that power would be a number too large for a template")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | bytes | list | tuple) and isinstance(n, int):
                    _check_size("that repetition", len(seq) * n)
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() + right.bit_length() > MAX_INT_BITS
            ):
                raise SecurityError("that product would be a number too large for a template")
        elif operator == "+":
            if isinstance(left, str | bytes | list | tuple) and isinstance(right, str | bytes | list | tuple):
                _check_size("that concatenation", len(left) + len(right))
        elif operator == "%" and isinstance(left, str):
            _check_format_string("string", left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str | bytes):
            _check_str_method(getattr(__obj, "__name__", ""), owner, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt: str = value.__self__
        _check_format_string("string", fmt)
        if not _NESTED_SPEC.search(fmt):
            return wrapped

        def checked(*args: Any, **kwargs: Any) -> str:
            # `{:{w}}` takes its width from an argument.
            for arg in (*args, *kwargs.values()):
                _check_width("that width", arg)
            return wrapped(*args, **kwargs)

        return checked


_ENVS = {True: _Environment(autoescape=True), False: _Environment(autoescape=False)}

# Estimated from measurements: a compiled template holds about 20 bytes per source character
# (AST-generated code object, constants), a parsed one about 12.
_COMPILED: LRU[tuple[str, bool], jinja2.Template] = LRU(CACHE_BYTES)
_PARSED: LRU[str, tuple[nodes.Template, frozenset[str]]] = LRU(CACHE_BYTES // 2)


def parse_source(source: str) -> tuple[nodes.Template, frozenset[str]]:
    """The syntax tree and the variables the template needs; raises TemplateSyntaxError."""
    cached = _PARSED.get(source)
    if cached is None:
        try:
            ast = _ENVS[False].parse(source)
        except RecursionError:
            raise jinja2.TemplateSyntaxError("the template is nested too deeply", 1) from None
        cached = ast, frozenset(jinja2.meta.find_undeclared_variables(ast))
        _PARSED.put(source, cached, 12 * len(source) + 1024)
    return cached


def compile_source(source: str, html: bool) -> jinja2.Template:
    template = _COMPILED.get((source, html))
    if template is None:
        try:
            template = _ENVS[html].from_string(parse_source(source)[0])
        except RecursionError:
            raise jinja2.TemplateSyntaxError("the template is nested too deeply", 1) from None
        _COMPILED.put((source, html), template, 20 * len(source) + 4096)
    return template


def syntax_errors(channel: str, parts: Mapping[str, str | None]) -> dict[str, str]:
    errors = {}
    for part, source in parts.items():
        if source is None:
            continue
        try:
            parse_source(source)
        except jinja2.TemplateSyntaxError as exc:
            errors[part] = f"template syntax error on line {exc.lineno}: {exc.message}"
    return errors


# --- what can be refused at creation ------------------------------------------------------------


def _const(node: nodes.Node | None) -> Any:
    return node.value if isinstance(node, nodes.Const) else None


def _int_const(node: nodes.Node | None) -> int | None:
    value = _const(node)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _static_problem(node: nodes.Node) -> str | None:
    """What a literal in the template says it would do beyond a budget, if anything."""
    if isinstance(node, nodes.Call | nodes.Filter):
        arguments = [*node.args, *(k.value for k in node.kwargs)]
        name = node.name if isinstance(node, nodes.Filter) else getattr(node.node, "name", None)
        if isinstance(node, nodes.Call) and name == "range":
            ints = [v for v in map(_int_const, arguments) if v is not None]
            if len(ints) == len(arguments) and ints and len(range(*ints[:3])) > MAX_RANGE:
                return f"range() is limited to {MAX_RANGE:,} items (the output budget)"
        elif isinstance(node, nodes.Call) and name == "lipsum":
            values = [_int_const(a) for a in node.args]
            n = values[0] if values and values[0] is not None else 5
            most = values[3] if len(values) > 3 and values[3] is not None else 100
            if n * most > MAX_LIPSUM_WORDS:
                return f"lipsum() is limited to {MAX_LIPSUM_WORDS:,} words (the output budget)"
        elif name in _WIDTH_TAKERS or (
            isinstance(node, nodes.Call)
            and isinstance(node.node, nodes.Getattr)
            and node.node.attr in _WIDTH_TAKERS
        ):
            for value in map(_int_const, arguments):
                if value is not None and abs(value) > OUTPUT_BUDGET:
                    return f"{value:,} exceeds the output budget of {OUTPUT_BUDGET:,} characters"
        formats = []
        if isinstance(node, nodes.Filter) and node.name == "format":
            formats.append(_const(node.node))
        if (
            isinstance(node, nodes.Call)
            and isinstance(node.node, nodes.Getattr)
            and node.node.attr in ("format", "format_map")
        ):
            formats.append(_const(node.node.node))
        for fmt in formats:
            try:
                _check_format_string("string", fmt)
            except SecurityError as exc:
                return str(exc)
    elif isinstance(node, nodes.Mod):
        try:
            _check_format_string("string", _const(node.left))
        except SecurityError as exc:
            return str(exc)
    elif isinstance(node, nodes.Pow):
        exponent = _int_const(node.right)
        if exponent is not None and abs(exponent) > MAX_EXPONENT:
            return f"exponents above {MAX_EXPONENT} are not allowed"
    elif isinstance(node, nodes.Mul):
        for seq_node, n_node in ((node.left, node.right), (node.right, node.left)):
            count = _int_const(n_node)
            seq = _const(seq_node)
            if isinstance(seq_node, nodes.List | nodes.Tuple):
                length = len(seq_node.items)
            elif isinstance(seq, str | list | tuple):
                length = len(seq)
            else:
                continue  # a number times a number, or a variable: judged at render
            if count is not None and length * abs(count) > OUTPUT_BUDGET:
                return f"that repetition exceeds the output budget of {OUTPUT_BUDGET:,} characters"
    return None


def budget_errors(channel: str, parts: Mapping[str, str | None]) -> dict[str, str]:
    """Parts whose source alone shows they would go beyond a render budget."""
    errors: dict[str, str] = {}
    for part, source in parts.items():
        if source is None:
            continue
        try:
            ast, _ = parse_source(source)
        except jinja2.TemplateSyntaxError:
            continue  # reported by syntax_errors
        for node in ast.find_all((nodes.Call, nodes.Filter, nodes.Mod, nodes.Pow, nodes.Mul)):
            problem = _static_problem(node)
            if problem is not None:
                errors[part] = f"refused: {problem}"
                break
    return errors


# --- variables --------------------------------------------------------------------------------


# Names every render provides itself, never taken from a request's variables: `recipient`, who
# the notification is for (id, name, email, phone, language, timezone, data).
PROVIDED = frozenset({"recipient"})
RECIPIENT_FIELDS = ("id", "name", "email", "phone", "language", "timezone", "data")


class _Lenient(dict[str, Any]):
    """A recipient's attributes: one that is not there renders empty, as an optional value
    would (a template may say `{{ recipient.data.plan }}` for users that have no plan)."""

    def __missing__(self, key: str) -> str:
        return ""


def recipient_context(recipient: Mapping[str, Any] | None) -> _Lenient:
    """`recipient` as templates see it: the fields it has; one it lacks (or that is null)
    renders empty, and `data` is always a mapping."""
    given = dict(recipient or {})
    data = given.get("data")
    out = _Lenient({k: v for k in RECIPIENT_FIELDS if (v := given.get(k)) is not None})
    out["data"] = _Lenient(data if isinstance(data, dict) else {})
    return out


def required_variables(channel: str, version: Mapping[str, Any]) -> frozenset[str]:
    """The variables a request must give: what the template reads, but what renders provide."""
    needed: set[str] = set()
    for part in PARTS[channel]:
        source = version.get(part)
        if source is not None:
            needed |= parse_source(source)[1]
    return frozenset(needed - PROVIDED)


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


def time_budget_error() -> RenderError:
    return RenderError("render_timeout", f"Rendering took longer than the time budget of {TIME_BUDGET:g} s.")


def memory_budget_error() -> RenderError:
    return RenderError(
        "render_too_large",
        f"Rendering needed more than the memory budget of {MEMORY_BUDGET // 1024**2} MB.",
    )


def render_sync(
    channel: str,
    version: Mapping[str, Any],
    variables: Mapping[str, Any],
    deadline: float,
    recipient: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Every part of a template version, within the output budget; the caller bounds time and
    memory (see common/rendering/renderer.py), this stops early when it sees the deadline pass.
    `recipient` is who it is for; a variable of the same name never replaces it."""
    problem = missing_variables(channel, version, variables)
    if problem is not None:
        raise problem
    context = {**variables, "recipient": recipient_context(recipient)}
    rendered: dict[str, str] = {}
    for part in PARTS[channel]:
        source = version.get(part)
        if source is None:
            continue
        size = 0
        chunks = []
        try:
            template = compile_source(source, (channel, part) in HTML_PARTS)
            for chunk in template.generate(context):
                size += len(chunk)
                if size > OUTPUT_BUDGET:
                    raise RenderError(
                        "render_too_large",
                        f"The rendered {part} exceeds the output budget of {OUTPUT_BUDGET:,} characters.",
                    )
                if time.monotonic() > deadline:
                    raise time_budget_error()
                chunks.append(chunk)
        except jinja2.UndefinedError as exc:
            raise RenderError(
                "missing_variable", f"Template variable error in {part}: {exc.message}."
            ) from None
        except SecurityError as exc:
            code = "render_too_large" if "budget" in str(exc) else "template_refused"
            raise RenderError(code, f"The {part} was refused: {str(exc).rstrip('.')}.") from None
        except MemoryError:
            raise memory_budget_error() from None
        except RecursionError:
            raise RenderError("render_error", f"The {part} recursed too deeply.") from None
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


# --- expressions (workflow conditions) --------------------------------------------------------

# Conditions see what a run knows and nothing else; a missing attribute is undefined (false in a
# test, unequal to anything) rather than an error, so `payload.order.express` needs no guard.
_EXPRESSIONS = _Environment(autoescape=False)
_EXPRESSIONS.undefined = jinja2.ChainableUndefined


def compile_expression(source: str) -> Callable[..., Any]:
    """A sandboxed expression (the same checked sandbox as templates); raises
    TemplateSyntaxError. Evaluating it may raise SecurityError (a budget) or TypeError."""
    try:
        return _EXPRESSIONS.compile_expression(source, undefined_to_none=False)
    except RecursionError:
        raise jinja2.TemplateSyntaxError("the expression is nested too deeply", 1) from None


def expression_problem(source: str) -> str | None:
    """What a budget check can tell of an expression from its source alone (see budget_errors)."""
    try:
        ast = _EXPRESSIONS.parse("{{ " + source + " }}")
    except (jinja2.TemplateSyntaxError, RecursionError):
        return None
    for node in ast.find_all((nodes.Call, nodes.Filter, nodes.Mod, nodes.Pow, nodes.Mul)):
        problem = _static_problem(node)
        if problem is not None:
            return problem
    return None
