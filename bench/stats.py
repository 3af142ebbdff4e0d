"""Pure helpers: percentiles, the open-loop schedule, and plain-text / Markdown tables.

Kept free of I/O so tests/test_bench_tools.py can check them quickly."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], p: float, *, presorted: bool = False) -> float:
    """Nearest-rank percentile (p in 0..100): the smallest value that at least p % of the values
    are less than or equal to. No interpolation, so p99 is a latency some request really had.
    NaN for no values."""
    if not 0 <= p <= 100:
        raise ValueError("p must be between 0 and 100")
    if not values:
        return math.nan
    ordered = values if presorted else sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[rank - 1])


def latency_summary(values_ms: Iterable[float]) -> dict[str, float]:
    """p50 / p95 / p99 / max of latencies in milliseconds (NaN when there are none)."""
    ordered = sorted(values_ms)
    return {
        "p50": percentile(ordered, 50, presorted=True),
        "p95": percentile(ordered, 95, presorted=True),
        "p99": percentile(ordered, 99, presorted=True),
        "max": ordered[-1] if ordered else math.nan,
    }


def planned_offsets(rate: float, duration: float, shard: int = 0, shards: int = 1) -> list[float]:
    """Seconds after the start at which this shard sends its requests, for an open loop at
    `rate` requests/s over `duration` seconds split across `shards` generator processes.

    The whole schedule is request i at i / rate; shard j takes i = j, j + shards, … so the shards
    interleave into one evenly spaced stream instead of bursting together."""
    if rate <= 0 or duration <= 0:
        return []
    if not 0 <= shard < shards:
        raise ValueError("shard must be in 0..shards-1")
    total = math.floor(rate * duration + 1e-9)
    return [i / rate for i in range(shard, total, shards)]


def fmt_num(value: float | int | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The same table for a terminal: columns padded, first column left, the rest right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
