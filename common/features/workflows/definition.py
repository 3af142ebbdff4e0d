"""A workflow as the client writes it: validated once, at PUT, into an immutable definition.

Everything a run will need to decide is checked here, so a run never meets a definition it cannot
execute: known step types, unique names, conditions that compile in the sandbox and reach only for
what a run knows, delays within `MAX_DELAY`. Each step type is one parser in `STEP_TYPES`; the
digest, throttle and in-app steps plug in there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jinja2.nodes as nodes

from common.rendering.templating import expression_problem
from common.vocabulary import CHANNELS
from common.web.validation import CODE_RE, LANGUAGE_RE, normalize_language

MAX_STEPS = 20
MAX_DELAY = 30 * 24 * 3600  # seconds: a run finishes well inside the notifications' retention
MAX_EXPRESSION = 2_000  # characters of one condition or `until`
MAX_NAME = 200
MAX_KEY_TEMPLATE = 500  # characters of a digest's or a throttle's key template
MAX_DIGEST_EVENTS = 1_000  # payloads a window hands to the next steps, at most (default 100)
MAX_THROTTLE_LIMIT = 10_000
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
STEP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# What a condition may read; anything else (a global, a builtin, `self`, `cycler`, …) is refused.
NAMES = frozenset({"payload", "recipient", "steps", "digest", "true", "false", "none"})
# ISO 8601 durations without the calendar units whose length depends on the date (years, months).
_ISO_DURATION = re.compile(
    r"^P(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)


@dataclass(frozen=True)
class Step:
    name: str
    type: str
    condition: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def channel(self) -> str | None:
        """The channel a step sends on, or None for a step that only decides or waits."""
        return self.type if self.type in CHANNELS else None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, **self.options}
        if self.condition is not None:
            out["if"] = self.condition
        return out


@dataclass(frozen=True)
class Definition:
    name: str
    category: str | None
    critical: bool
    steps: tuple[Step, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "category": self.category,
            "critical": self.critical,
            "steps": [s.as_json() for s in self.steps],
        }

    @classmethod
    def from_json(cls, stored: Mapping[str, Any]) -> Definition:
        """A stored version (already validated when it was PUT)."""
        steps = []
        for raw in stored["steps"]:
            options = {k: v for k, v in raw.items() if k not in ("name", "type", "if")}
            steps.append(Step(raw["name"], raw["type"], raw.get("if"), options))
        return cls(stored["name"], stored.get("category"), bool(stored.get("critical")), tuple(steps))


class Problems:
    """Field errors named as the client wrote them (`steps[2].if`), collected so one answer
    names every one."""

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}

    def add(self, where: str, message: str) -> None:
        self.errors.setdefault(where, message)


StepParser = Callable[[Mapping[str, Any], str, Problems], dict[str, Any]]


def duration_seconds(value: Any) -> float | None:
    """Seconds from a number or an ISO 8601 duration (`PT10M`, `P1DT2H`, `P2W`); None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (m := _ISO_DURATION.match(value)) and value not in ("P", "PT"):
        if value.endswith("T"):
            return None
        weeks, days, hours, minutes = (int(m[k] or 0) for k in "wdhm")
        return (((weeks * 7 + days) * 24 + hours) * 60 + minutes) * 60 + float(m["s"] or 0)
    return None


def expression_error(source: Any) -> str | None:
    """Why a condition cannot be accepted, or None. Refused: what does not compile, names other
    than a run's own (`NAMES`), any attribute or key starting with `_` (the sandbox would hide it
    at run time; the client should hear at PUT), and what the template budgets refuse."""
    if not isinstance(source, str) or not source.strip():
        return "must be a non-empty expression"
    if len(source) > MAX_EXPRESSION:
        return f"must be at most {MAX_EXPRESSION:,} characters"
    try:
        ast = jinja2.Environment().parse("{{ " + source + " }}")
    except jinja2.TemplateSyntaxError as exc:
        return f"does not compile: {exc.message}"
    except RecursionError:
        return "does not compile: nested too deeply"
    output = ast.body[0] if len(ast.body) == 1 else None
    if not isinstance(output, nodes.Output) or len(output.nodes) != 1:
        return "must be one expression"
    if problem := _reach_problem(ast):
        return problem
    problem = expression_problem(source)
    return f"refused: {problem}" if problem else None


def _reach_problem(ast: nodes.Template) -> str | None:
    """Names other than a run's own (and a loop's), or a reach for what starts with `_`."""
    allowed = NAMES | {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    for node in ast.find_all((nodes.Name, nodes.Getattr, nodes.Getitem, nodes.Call)):
        if isinstance(node, nodes.Name) and node.name not in allowed:
            return f"may read only {', '.join(sorted(NAMES - {'true', 'false', 'none'}))}; not {node.name!r}"
        if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            return f"may not reach for {node.attr!r}"
        if isinstance(node, nodes.Getitem):
            key = node.arg.value if isinstance(node.arg, nodes.Const) else None
            if isinstance(key, str) and key.startswith("_"):
                return f"may not reach for {key!r}"
    return None


def key_template_error(source: Any) -> str | None:
    """Why a digest's or a throttle's `key` (a template over the payload and the recipient, e.g.
    `{{ payload.post_id }}`) cannot be accepted, or None."""
    if not isinstance(source, str) or not source.strip():
        return "must be a non-empty template such as {{ payload.post_id }}"
    if len(source) > MAX_KEY_TEMPLATE:
        return f"must be at most {MAX_KEY_TEMPLATE} characters"
    try:
        ast = jinja2.Environment().parse(source)
    except jinja2.TemplateSyntaxError as exc:
        return f"does not compile: {exc.message}"
    except RecursionError:
        return "does not compile: nested too deeply"
    if problem := _reach_problem(ast):
        return problem
    problem = expression_problem(source)
    return f"refused: {problem}" if problem else None


def _channel_step(raw: Mapping[str, Any], where: str, problems: Problems) -> dict[str, Any]:
    options: dict[str, Any] = {}
    code = raw.get("template_code")
    if not isinstance(code, str) or not CODE_RE.match(code):
        problems.add(f"{where}.template_code", "is required: a template code")
    else:
        options["template_code"] = code
    language = raw.get("language")
    if language is not None:
        if not isinstance(language, str) or not LANGUAGE_RE.match(language):
            problems.add(f"{where}.language", "must be a language tag like en or pt-BR")
        else:
            options["language"] = normalize_language(language)
    return options


def _seconds(raw: Mapping[str, Any], name: str, where: str, problems: Problems) -> float | None:
    """A positive duration of at most MAX_DELAY, or None (with the problem said)."""
    seconds = duration_seconds(raw.get(name))
    if seconds is None or seconds <= 0:
        problems.add(f"{where}.{name}", "must be a number of seconds or an ISO 8601 duration like PT10M")
        return None
    if seconds > MAX_DELAY:
        problems.add(f"{where}.{name}", f"must be at most {MAX_DELAY:,} seconds (30 days)")
        return None
    return seconds


def _delay_step(raw: Mapping[str, Any], where: str, problems: Problems) -> dict[str, Any]:
    if ("duration" in raw) == ("until" in raw):
        problems.add(where, "a delay takes either duration or until")
        return {}
    if "until" in raw:
        error = expression_error(raw["until"])
        if error:
            problems.add(f"{where}.until", error)
        return {"until": raw["until"]}
    seconds = _seconds(raw, "duration", where, problems)
    return {} if seconds is None else {"duration": seconds}


def _key_option(raw: Mapping[str, Any], where: str, problems: Problems, options: dict[str, Any]) -> None:
    if "key" in raw:
        if error := key_template_error(raw["key"]):
            problems.add(f"{where}.key", error)
        else:
            options["key"] = raw["key"]


def _digest_step(raw: Mapping[str, Any], where: str, problems: Problems) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if ("window" in raw) == ("at" in raw):
        problems.add(where, 'a digest takes either window (a duration) or at ("HH:MM" in the user\'s zone)')
        return {}
    if "window" in raw:
        seconds = _seconds(raw, "window", where, problems)
        if seconds is not None:
            options["window"] = seconds
        if "days" in raw:
            problems.add(f"{where}.days", "goes with at, not with window")
    else:
        at = raw["at"]
        if not isinstance(at, str) or not HHMM.match(at):
            problems.add(f"{where}.at", "must be a local time HH:MM, e.g. 09:00")
        else:
            options["at"] = at
        if "days" in raw:
            days = raw["days"]
            if not isinstance(days, list) or not days or any(d not in DAYS for d in days):
                problems.add(f"{where}.days", f"must be a list of days among {', '.join(DAYS)}")
            else:
                options["days"] = [d for d in DAYS if d in days]
    mode = raw.get("mode", "fixed")
    if mode not in ("fixed", "lookback"):
        problems.add(f"{where}.mode", "must be fixed or lookback")
    elif mode == "lookback" and "window" not in raw:
        problems.add(f"{where}.mode", "lookback needs a window (a duration)")
    else:
        options["mode"] = mode
    max_events = raw.get("max_events", 100)
    if (
        isinstance(max_events, bool)
        or not isinstance(max_events, int)
        or not 1 <= max_events <= MAX_DIGEST_EVENTS
    ):
        problems.add(f"{where}.max_events", f"must be a whole number from 1 to {MAX_DIGEST_EVENTS:,}")
    else:
        options["max_events"] = max_events
    _key_option(raw, where, problems, options)
    return options


def _throttle_step(raw: Mapping[str, Any], where: str, problems: Problems) -> dict[str, Any]:
    options: dict[str, Any] = {}
    limit = raw.get("limit")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_THROTTLE_LIMIT:
        problems.add(f"{where}.limit", f"is required: a whole number from 1 to {MAX_THROTTLE_LIMIT:,}")
    else:
        options["limit"] = limit
    seconds = _seconds(raw, "window", where, problems)
    if seconds is not None:
        options["window"] = seconds
    _key_option(raw, where, problems, options)
    return options


STEP_TYPES: dict[str, tuple[frozenset[str], StepParser]] = {
    **{c: (frozenset({"template_code", "language"}), _channel_step) for c in CHANNELS},
    "delay": (frozenset({"duration", "until"}), _delay_step),
    "digest": (frozenset({"window", "at", "days", "key", "mode", "max_events"}), _digest_step),
    "throttle": (frozenset({"limit", "window", "key"}), _throttle_step),
}


def parse(body: Any) -> tuple[Definition | None, dict[str, str]]:
    """The definition in a PUT body, or the problems with it (every one, each named)."""
    problems = Problems()
    if not isinstance(body, dict):
        return None, {"body": "must be a JSON object"}
    for name in body:
        if name not in ("name", "category", "critical", "steps"):
            problems.add(name, "is not a known field")
    name = body.get("name")
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= MAX_NAME:
        problems.add("name", f"is required: 1 to {MAX_NAME} characters")
    category = body.get("category")
    if category is not None and (not isinstance(category, str) or not CODE_RE.match(category)):
        problems.add("category", "must be a code of letters, digits, '.', '_' or '-'")
    critical = body.get("critical", False)
    if not isinstance(critical, bool):
        problems.add("critical", "must be true or false")
    raw_steps = body.get("steps")
    steps: list[Step] = []
    if not isinstance(raw_steps, list) or not raw_steps:
        problems.add("steps", "is required: a list of at least one step")
        raw_steps = []
    elif len(raw_steps) > MAX_STEPS:
        problems.add("steps", f"at most {MAX_STEPS} steps")
        raw_steps = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_steps):
        where = f"steps[{index}]"
        if not isinstance(raw, dict):
            problems.add(where, "must be a JSON object")
            continue
        kind = raw.get("type")
        if kind not in STEP_TYPES:
            problems.add(f"{where}.type", f"must be one of {', '.join(sorted(STEP_TYPES))}")
            continue
        allowed, parser = STEP_TYPES[kind]
        for key in raw:
            if key not in allowed | {"name", "type", "if"}:
                problems.add(f"{where}.{key}", f"is not a field of a {kind} step")
        step_name = raw.get("name", f"{kind}-{index}")
        if not isinstance(step_name, str) or not STEP_NAME_RE.match(step_name):
            problems.add(f"{where}.name", "must be 1 to 64 letters, digits, '_' or '-'")
        elif step_name in seen:
            problems.add(f"{where}.name", f"{step_name!r} is the name of an earlier step")
        seen.add(str(step_name))
        condition = raw.get("if")
        if condition is not None and (error := expression_error(condition)):
            problems.add(f"{where}.if", error)
        options = parser(raw, where, problems)
        steps.append(Step(str(step_name), kind, condition, options))
    if problems.errors:
        return None, problems.errors
    assert isinstance(name, str)
    return Definition(name.strip(), category, bool(critical), tuple(steps)), {}
