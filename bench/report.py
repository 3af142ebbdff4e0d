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


async def profile(pid: int, seconds: float, out: Path) -> Path | None:
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


def top_functions(raw: str, limit: int = 15) -> tuple[int, list[tuple[str, int, int]]]:
    """From py-spy's raw (collapsed) output: total samples and the `limit` functions with the
    most own samples (the frame on top of the stack), each with its inclusive samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        names = []
        for frame in stack.split(";"):
            m = FRAME.match(frame)
            names.append(f"{m['func']} ({short_file(m['file'])})" if m else frame)
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    return total, [(name, n, inclusive[name]) for name, n in own.most_common(limit)]


def profile_rows(raw: str, limit: int = 15) -> tuple[int, list[list[str]]]:
    total, top = top_functions(raw, limit)
    rows = [
        [f"`{name}`", fmt_num(100 * n / total, 1) + " %", fmt_num(100 * incl / total, 1) + " %"]
        for name, n, incl in top
    ]
    return total, rows
