"""What goes with every figure: the machine, the commit, the command; appending a dated section
to BENCHMARKS.md; and py-spy profiles reduced to the functions that used the CPU."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from bench.stats import fmt_num, markdown_table, text_table

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    return f"{os.cpu_count()} cores, {mem_gib:.1f} GiB RAM, {model}, Python {platform.python_version()}"


def commit() -> str:
    """The commit measured; `+dirty` when tracked files differ from it (work in progress)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        # BENCHMARKS.md itself changes as sections are appended: that is not a code change.
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!BENCHMARKS.md",
                ":!bench/history",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def command() -> str:
    # `python -m bench` runs bench/__main__.py; `python -m bench.inbox` runs bench/inbox.py.
    stem = Path(sys.argv[0]).stem
    module = "bench" if stem in ("__main__", "bench") else f"bench.{stem}"
    run = " ".join(["python -m", module, shlex.join(sys.argv[1:])]).rstrip()
    # `make bench` sets BENCH_VIA_MAKE, so the record names what was typed and what it ran.
    return f"make bench` → `{run}" if os.environ.get("BENCH_VIA_MAKE") else run


Table = tuple[str, list[str], list[list[str]]]  # caption, headers, rows


class Section:
    """One benchmark's output: printed as text tables, appended to BENCHMARKS.md as Markdown."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.started = datetime.datetime.now(datetime.UTC)
        self.parts: list[str | Table] = []
        # The machine is shared: a high load average before the run means noisy figures.
        self.load_before = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        self.commit = commit()  # at the start: the code the services were started from

    def table(self, headers: list[str], rows: list[list[str]], caption: str = "") -> None:
        self.parts.append((caption, headers, rows))
        print(f"\n{caption}:" if caption else "")
        print(text_table(headers, rows), flush=True)

    def note(self, text: str) -> None:
        self.parts.append(text)
        print(text, flush=True)

    def markdown(self) -> str:
        out = [
            f"### {self.title} — {self.started:%Y-%m-%d %H:%M} UTC",
            "",
            f"- machine: {machine()}; load average before the run {self.load_before}",
            f"- commit: `{self.commit}`",
            f"- command: `{command()}`",
            "",
        ]
        for part in self.parts:
            if isinstance(part, str):
                out += [part, ""]
                continue
            caption, headers, rows = part
            if caption:
                out += [f"{caption}:", ""]
            out += [markdown_table(headers, rows), ""]
        return "\n".join(out)


HISTORY = ROOT / "bench" / "history"
LATEST_HEADING = "## Latest figures"


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:60]


def replace_latest(text: str, title: str, markdown: str) -> str:
    """BENCHMARKS.md with `markdown` as the latest section of that title: the section of the same
    title it held before is dropped (its run is already in bench/history/), any other kept."""
    if LATEST_HEADING not in text:
        text = text.rstrip() + f"\n\n{LATEST_HEADING}\n"
    before, _, rest = text.partition(LATEST_HEADING + "\n")
    # The latest block runs to the next second-level heading (or the end).
    match = re.search(r"(?m)^## ", rest)
    block, after = (rest[: match.start()], rest[match.start() :]) if match else (rest, "")
    parts = re.split(r"(?m)^(?=### )", block)
    intro, sections = parts[0], parts[1:]
    kept = [part for part in sections if part.splitlines()[0].split(" — ")[0] != f"### {title}"]
    kept.append(markdown.rstrip() + "\n\n")
    kept.sort(key=lambda part: part.splitlines()[0])
    return before + LATEST_HEADING + "\n" + intro + "".join(kept) + after


def history_index() -> str:
    """bench/history/README.md: every run recorded, newest first."""
    lines = [
        "# Benchmark history",
        "",
        "One file per benchmark run, newest first; the latest of each kind is",
        "also in [BENCHMARKS.md](../../BENCHMARKS.md).",
        "",
    ]
    for file in sorted(HISTORY.glob("2*.md"), reverse=True):
        first = file.read_text().splitlines()[0].lstrip("# ").strip()
        lines.append(f"- [{first}]({file.name})")
    return "\n".join(lines) + "\n"


def append(section: Section) -> None:
    """Record one run: its own file in bench/history/ (kept for good), and in BENCHMARKS.md as
    the latest section of its title, replacing the one before, so the current figures stay on
    the first screen rather than below two thousand lines of history."""
    markdown = section.markdown()
    HISTORY.mkdir(parents=True, exist_ok=True)
    path = HISTORY / f"{section.started:%Y-%m-%d-%H%M}-{slug(section.title)}.md"
    path.write_text("#" + markdown.rstrip().removeprefix("###") + "\n")
    (HISTORY / "README.md").write_text(history_index())
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    BENCHMARKS.write_text(replace_latest(text, section.title, markdown))
    where = path.relative_to(ROOT)
    print(f"\nbench: recorded “{section.title}” in {BENCHMARKS.name} and {where}", flush=True)


# --- profiles ------------------------------------------------------------------------------

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


async def profile(pid: int, seconds: float, out: Path, subprocesses: bool = False) -> Path | None:
    """`py-spy record --format raw` on a running process; None when py-spy is missing or fails.

    --nonblocking: py-spy reads the process's memory without pausing it, so the figure measured
    meanwhile is not slowed by the profiler (a sample may rarely be torn; harmless here)."""
    exe = py_spy()
    if exe is None:
        return None
    proc = await asyncio.create_subprocess_exec(
        exe,
        "record",
        "--format",
        "raw",
        "--nonblocking",
        # A worker's render processes are its children: counted with it, as its CPU is.
        *(["--subprocesses"] if subprocesses else []),
        "-d",
        str(max(1, int(seconds))),
        "-p",
        str(pid),
        "-o",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), seconds + 30)
    except TimeoutError:
        proc.kill()
        return None
    if proc.returncode != 0 or not await asyncio.to_thread(out.exists):
        print(f"bench: py-spy failed: {err.decode(errors='replace')[-300:]}", flush=True)
        return None
    return out


def short_file(path: str) -> str:
    """Paths shortened to what a reader recognises: project files relative, libraries from
    site-packages, the standard library from its lib/pythonX.Y."""
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            rest = path.split(marker, 1)[1]
            return rest if marker == "site-packages/" else "stdlib/" + rest.split("/", 1)[-1]
    with contextlib.suppress(ValueError):
        return str(Path(path).relative_to(ROOT))
    return path


def stacks(raw: str) -> Iterator[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output: each stack's frames, outermost first, and its samples."""
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield stack.split(";"), int(count_text)


def top_functions(raw: str, limit: int = 15) -> tuple[int, list[tuple[str, int, int]]]:
    """From py-spy's raw (collapsed) output: total samples and the `limit` functions with the
    most own samples (the frame on top of the stack), each with its inclusive samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for frames, count in stacks(raw):
        total += count
        names = []
        for frame in frames:
            m = FRAME.match(frame)
            names.append(f"{m['func']} ({short_file(m['file'])})" if m else frame)
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    return total, [(name, n, inclusive[name]) for name, n in own.most_common(limit)]


# The steps of a notification's path, for the per-step CPU table. A sample belongs to the step
# the frames on its stack name: a specific step (the store's claim, rendering, SMTP …) wins over
# a general one (the HTTP server, the worker's handler, the driver, logging), and among equals the
# deepest frame wins; so the driver's and the logger's frames under a claim count as the claim's.
# Within one frame the first rule that matches is taken: specific paths before general ones.
SPECIFIC, GENERAL, TRANSPARENT = 2, 1, 0
STEPS: tuple[tuple[str, int, tuple[str, ...], frozenset[str] | None], ...] = (
    (
        "claim (status store)",
        SPECIFIC,
        ("common/data/store.py",),
        frozenset({"claim", "claim_many", "extend"}),
    ),
    (
        "record (status store)",
        SPECIFIC,
        ("common/data/store.py",),
        frozenset({"record", "record_many", "events"}),
    ),
    (
        "insert (status store)",
        SPECIFIC,
        ("common/data/store.py",),
        frozenset({"create", "create_many", "_insert"}),
    ),
    ("status store, other", GENERAL, ("common/data/", "aiopg/", "psycopg2/"), None),
    ("rate limit, Redis", SPECIFIC, ("common/web/ratelimit.py", "redis/"), None),
    ("HTTP: auth, middlewares, envelope", GENERAL, ("common/web/",), None),
    (
        "accept: validate, decide",
        SPECIFIC,
        ("common/features/accept/", "common/sending/", "gateway.py"),
        None,
    ),
    ("look up user and template", SPECIFIC, ("common/lookups/",), None),
    ("render", SPECIFIC, ("common/rendering/", "jinja2/", "markupsafe/"), None),
    ("build the MIME message", SPECIFIC, ("stdlib/email/",), None),
    ("send: SMTP", SPECIFIC, ("aiosmtplib/",), None),
    ("publish, consume, settle (AMQP)", SPECIFIC, ("common/broker/", "aio_pika/", "aiormq/", "pamqp/"), None),
    # aiohttp's client is a means, not a step: its frames count for the caller's (a lookup, a
    # provider's send).
    ("", TRANSPARENT, ("aiohttp/client", "aiohttp/connector", "aiohttp/tracing"), None),
    ("HTTP server (aiohttp)", GENERAL, ("aiohttp/", "multidict/", "yarl/"), None),
    (
        "send: provider (HTTP, Web Push)",
        SPECIFIC,
        ("providers/", "pywebpush/", "http_ece/", "py_vapid/"),
        None,
    ),
    ("deliver, other (worker)", GENERAL, ("common/delivery/", "email_worker.py", "push_worker.py"), None),
    ("group commit", GENERAL, ("common/group_commit.py",), None),
    ("logging", GENERAL, ("stdlib/logging/", "common/logs.py"), None),
    ("metrics", GENERAL, ("prometheus_client/", "common/metrics.py"), None),
)
OTHER_STEP = "event loop, other"


def _step_of(func: str, file: str) -> tuple[str, int]:
    for label, weight, prefixes, funcs in STEPS:
        if file.startswith(prefixes) and (funcs is None or func in funcs):
            return label, weight
    return OTHER_STEP, TRANSPARENT


def step_shares(raw: str) -> tuple[int, dict[str, float]]:
    """From py-spy's raw output: total samples and each step's share of them (`STEPS`)."""
    counts: Counter[str] = Counter()
    total = 0
    for frames, count in stacks(raw):
        total += count
        step, best = OTHER_STEP, TRANSPARENT
        for frame in reversed(frames):  # the deepest first: it wins among equals
            m = FRAME.match(frame)
            if m is None:
                continue
            label, weight = _step_of(m["func"], short_file(m["file"]))
            if weight > best:
                step, best = label, weight
        counts[step] += count
    return total, {step: n / total for step, n in counts.items()} if total else {}


def profile_rows(raw: str, limit: int = 15) -> tuple[int, list[list[str]]]:
    total, top = top_functions(raw, limit)
    rows = [
        [f"`{name}`", fmt_num(100 * n / total, 1) + " %", fmt_num(100 * incl / total, 1) + " %"]
        for name, n, incl in top
    ]
    return total, rows
