"""The overview's chart, drawn on the server as SVG: no script, no library, nothing inline that a
Content-Security-Policy would have to allow (colours come from the stylesheet by class)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

WIDTH = 600
HEIGHT = 160
PAD_LEFT = 36
PAD_BOTTOM = 20
PAD_TOP = 8


@dataclass(frozen=True)
class Series:
    name: str
    css: str
    points: str  # an SVG polyline's points
    total: int


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    series: list[Series]
    peak: int
    ticks: list[tuple[float, str]]  # x, label (HH:MM)
    rows: list[dict[str, Any]]  # the same figures as a table, for screen readers
    baseline: float
    left: int


def _nice_peak(value: int) -> int:
    """The y axis' top: the peak rounded up to 1, 2 or 5 times a power of ten."""
    if value <= 1:
        return 1
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale >= value:
                return step * scale
        scale *= 10


def per_minute(minutes: list[dict[str, Any]]) -> Chart:
    peak = _nice_peak(
        max([int(m["accepted"]) for m in minutes] + [int(m["delivered"]) for m in minutes] + [0])
    )
    plot_w = WIDTH - PAD_LEFT - 4
    plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP
    step = plot_w / max(len(minutes) - 1, 1)

    def points(key: str) -> str:
        return " ".join(
            f"{PAD_LEFT + i * step:.1f},{PAD_TOP + plot_h - int(m[key]) / peak * plot_h:.1f}"
            for i, m in enumerate(minutes)
        )

    ticks = [
        (PAD_LEFT + i * step, _hhmm(m["minute"]))
        for i, m in enumerate(minutes)
        if i % 15 == 0 or i == len(minutes) - 1
    ]
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        series=[
            Series("accepted", "accepted", points("accepted"), sum(int(m["accepted"]) for m in minutes)),
            Series("delivered", "delivered", points("delivered"), sum(int(m["delivered"]) for m in minutes)),
        ],
        peak=peak,
        ticks=ticks,
        rows=[
            {"minute": _hhmm(m["minute"]), "accepted": int(m["accepted"]), "delivered": int(m["delivered"])}
            for m in minutes
            if int(m["accepted"]) or int(m["delivered"])
        ],
        baseline=PAD_TOP + plot_h,
        left=PAD_LEFT,
    )


def _hhmm(value: Any) -> str:
    return value.strftime("%H:%M") if isinstance(value, datetime) else str(value)
