"""The soak's count and report (bench/soak.py): what was lost, stuck or sent twice, and whether
each process's memory and open files stayed flat, as Markdown, JSON and a PNG plot.

Flat, defined: of the samples after warm-up, split by time into thirds, the last third's median
is at most 10 % above the middle third's for RSS, and at most 20 % (or 3 descriptors, whichever
is more) above it for open file descriptors. Medians, so that a black hole's passing bulge of
pending connections does not decide it; growth of the middle against the last third, so that a
leak as slow as a few bytes a notification shows over 30 minutes. Judged for the processes that
ran the whole time (the extra gateway and worker are killed and restarted, so theirs start over).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RSS_GROWTH = 0.10
FD_GROWTH = 0.20
FD_SLACK = 3
# A duplicate whose first copy reached the SMTP server this close before an SMTP black hole or
# cut began: its "250 OK" was in flight when the link went, the worker could not know the server
# had it, and sent it again (SMTP has no idempotency key). Counted apart from the reclaims.
SMTP_WINDOW = (2.0, 0.5)  # seconds before, after the fault's start


@dataclass
class Sample:
    t: float  # seconds since the traffic began
    name: str
    incarnation: int
    rss_kib: int
    fds: int
    connections: int  # PostgreSQL connections with this process's application_name


@dataclass
class Flatness:
    name: str
    judged: bool
    rss_mid: float = 0.0
    rss_last: float = 0.0
    fds_mid: float = 0.0
    fds_last: float = 0.0

    @property
    def rss_flat(self) -> bool:
        return not self.judged or self.rss_last <= self.rss_mid * (1 + RSS_GROWTH)

    @property
    def fds_flat(self) -> bool:
        return not self.judged or self.fds_last <= self.fds_mid + max(FD_SLACK, self.fds_mid * FD_GROWTH)


def flatness(samples: list[Sample], warmup: float) -> list[Flatness]:
    found = []
    for name in sorted({s.name for s in samples}):
        mine = [s for s in samples if s.name == name]
        later = [s for s in mine if s.t >= warmup]
        restarted = max(s.incarnation for s in mine) > 1
        if restarted or len(later) < 6:
            found.append(Flatness(name, judged=False))
            continue
        start, end = later[0].t, later[-1].t
        third = (end - start) / 3
        mid = [s for s in later if start + third <= s.t < start + 2 * third]
        last = [s for s in later if s.t >= start + 2 * third]
        if not mid or not last:
            found.append(Flatness(name, judged=False))
            continue
        found.append(
            Flatness(
                name,
                True,
                statistics.median(s.rss_kib for s in mid),
                statistics.median(s.rss_kib for s in last),
                statistics.median(s.fds for s in mid),
                statistics.median(s.fds for s in last),
            )
        )
    return found


@dataclass
class Result:
    options: dict[str, Any]
    sent: int  # distinct notifications the client tried to send
    accepted: int  # answered 202 (at some attempt)
    unaccepted: int  # never answered 202 before the client gave up
    delivered: int
    lost: int
    lost_detail: dict[str, int]
    stuck: int
    stuck_detail: dict[str, int]
    duplicates: int
    duplicates_reclaimed_window: int  # those the documented window allows, bounded below
    duplicates_smtp_ambiguous: int
    reclaimed: float  # notify_reclaimed_total over every email worker's lifetimes
    duplicate_bound: float
    kills: int
    answers: dict[str, int]
    conflicts: int
    faults: list[tuple[str, float, float]]
    exits: list[str]
    restart_failures: list[str]  # a restart refused (by the machine, not the soak): noted, retried
    traffic_seconds: float
    drained: float
    warmup: float
    samples: list[Sample] = field(repr=False)
    flat: list[Flatness] = field(default_factory=list)

    @classmethod
    def count(
        cls,
        *,
        options: dict[str, Any],
        sent: int,
        accepted: dict[str, str],
        statuses: dict[str, str],
        received: dict[str, int],
        first_received: dict[str, float],
        answers: dict[str, int],
        conflicts: int,
        faults: list[tuple[str, float, float]],
        reclaimed: float,
        kills: int,
        prefetch: int,
        samples: list[Sample],
        warmup: float,
        traffic_seconds: float,
        drained: float,
        exits: list[str],
        restart_failures: list[str] | None = None,
    ) -> Result:
        ids = set(accepted.values())
        lost_detail = {
            "not in the status store": sum(i not in statuses for i in ids),
            "failed": sum(statuses.get(i) == "failed" for i in ids),
            "skipped or cancelled": sum(statuses.get(i) in ("skipped", "cancelled") for i in ids),
            "delivered, never at the SMTP server": sum(
                statuses.get(i) == "delivered" and not received.get(i) for i in ids
            ),
        }
        stuck_detail: dict[str, int] = {}
        for i in ids:
            status = statuses.get(i)
            if status is not None and status not in ("delivered", "failed", "skipped", "cancelled"):
                stuck_detail[status] = stuck_detail.get(status, 0) + 1
        smtp_faults = [start for kind, start, _ in faults if kind in ("black hole smtp", "cut smtp")]
        duplicated = {i: n - 1 for i, n in received.items() if n > 1}
        ambiguous = sum(
            n
            for i, n in duplicated.items()
            if any(
                start - SMTP_WINDOW[0] <= first_received[i] <= start + SMTP_WINDOW[1] for start in smtp_faults
            )
        )
        duplicates = sum(duplicated.values())
        strays = sum(n for i, n in received.items() if i not in ids)  # a sent id never answered 202
        # The design's promise: duplicates only from a worker that died between a send and its
        # record, counted as reclaims and bounded by the prefetch of the workers killed.
        window = duplicates - ambiguous
        bound = min(reclaimed, kills * prefetch)
        return cls(
            options={k: str(v) for k, v in options.items()},
            sent=sent,
            accepted=len(ids),
            unaccepted=sent - len(accepted),
            delivered=sum(statuses.get(i) == "delivered" for i in ids),
            lost=sum(lost_detail.values()),
            lost_detail={**lost_detail, "received but never accepted (not counted as lost)": strays},
            stuck=sum(stuck_detail.values()),
            stuck_detail=stuck_detail,
            duplicates=duplicates,
            duplicates_reclaimed_window=window,
            duplicates_smtp_ambiguous=ambiguous,
            reclaimed=reclaimed,
            duplicate_bound=bound,
            kills=kills,
            answers=answers,
            conflicts=conflicts,
            faults=faults,
            exits=exits,
            restart_failures=list(restart_failures or ()),
            traffic_seconds=traffic_seconds,
            drained=drained,
            warmup=warmup,
            samples=samples,
            flat=flatness(samples, warmup),
        )

    @property
    def duplicates_ok(self) -> bool:
        return self.duplicates_reclaimed_window <= self.duplicate_bound

    @property
    def flat_ok(self) -> bool:
        return all(f.rss_flat and f.fds_flat for f in self.flat)

    @property
    def correct(self) -> bool:
        """Nothing lost or stuck, duplicates within the bound, every request accepted in the
        end, no replay refused, every SIGTERM a clean exit."""
        return (
            self.lost == 0
            and self.stuck == 0
            and self.duplicates_ok
            and self.unaccepted == 0
            and self.conflicts == 0
            and not self.exits
        )

    @property
    def ok(self) -> bool:
        return self.correct and self.flat_ok

    def markdown(self) -> str:
        o = self.options
        kinds: dict[str, int] = {}
        for kind, _, _ in self.faults:
            kinds[kind] = kinds.get(kind, 0) + 1
        verdict_line = (
            f"Verdict: **{'pass' if self.ok else 'FAIL'}** (correctness {'pass' if self.correct else 'FAIL'},"
            f" flatness {'pass' if self.flat_ok else 'FAIL'})."
        )
        others = dict(sorted(self.answers.items())) or "none"
        lines = [
            f"Soak: {o['minutes']} min of traffic at {o['rate']}/s (seed {o['seed']}), faults for the"
            f" first 90 %, then {self.drained:.0f} s of drain. {verdict_line}",
            "",
            "| sent | accepted | never accepted | delivered | lost | stuck | duplicates"
            " | of which SMTP-ambiguous | reclaimed (counted) | bound | replays refused |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {self.sent} | {self.accepted} | {self.unaccepted} | {self.delivered} | {self.lost}"
            f" | {self.stuck} | {self.duplicates} | {self.duplicates_smtp_ambiguous} | {self.reclaimed:g}"
            f" | {self.duplicate_bound:g} ({self.kills} worker SIGKILLs x prefetch) | {self.conflicts} |",
            "",
            f"Lost, by kind: {self.lost_detail}. Stuck, by status: {self.stuck_detail or 'none'}.",
            f"Answers other than 202 (each retried with the same request_id): {others}.",
            f"Faults ({len(self.faults)}): " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) + ".",
        ]
        if self.exits:
            lines.append(f"Unclean exits: {self.exits}.")
        if self.restart_failures:
            lines.append(f"Restarts refused, then retried: {self.restart_failures}.")
        lines += [
            "",
            f"Processes (samples every {o['sample_every']} s; flatness after {self.warmup:.0f} s of warm-up:"
            " last third's median against the middle third's):",
            "",
            "| process | starts | RSS MiB first → last (max) | open fds first → last (max)"
            " | PG connections first → last (max) | RSS flat | fds flat |",
            "|---|---|---|---|---|---|---|",
        ]
        judged = {f.name: f for f in self.flat}
        for name in sorted({s.name for s in self.samples}):
            mine = [s for s in self.samples if s.name == name]
            f = judged[name]

            def span(values: list[int], scale: float = 1.0) -> str:
                return f"{values[0] / scale:.0f} → {values[-1] / scale:.0f} ({max(values) / scale:.0f})"

            def verdict(flat: bool, mid: float, last: float, scale: float = 1.0, f: Flatness = f) -> str:
                if not f.judged:
                    return "not judged (restarted)"
                return f"{'yes' if flat else '**NO**'} ({mid / scale:.0f} → {last / scale:.0f})"

            lines.append(
                f"| {name} | {max(s.incarnation for s in mine)} | {span([s.rss_kib for s in mine], 1024)}"
                f" | {span([s.fds for s in mine])} | {span([s.connections for s in mine])}"
                f" | {verdict(f.rss_flat, f.rss_mid, f.rss_last, 1024)}"
                f" | {verdict(f.fds_flat, f.fds_mid, f.fds_last)} |"
            )
        return "\n".join(lines)


def plot(result: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    names = sorted({s.name for s in result.samples})
    colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    for ax, (attr, label, scale) in zip(
        axes,
        (
            ("rss_kib", "RSS (MiB)", 1024.0),
            ("fds", "open file descriptors", 1.0),
            ("connections", "PostgreSQL connections", 1.0),
        ),
        strict=True,
    ):
        for _kind, start, end in result.faults:
            ax.axvspan(start / 60, max(end, start + 1) / 60, color="grey", alpha=0.12, lw=0)
        for name in names:
            lives = sorted({s.incarnation for s in result.samples if s.name == name})
            for n, life in enumerate(lives):
                mine = [s for s in result.samples if s.name == name and s.incarnation == life]
                ax.plot(
                    [s.t / 60 for s in mine],
                    [getattr(s, attr) / scale for s in mine],
                    color=colours[name],
                    lw=1.2,
                    label=name if n == 0 else None,
                )
        ax.axvline(result.warmup / 60, color="black", ls=":", lw=0.8)
        ax.axvline(result.traffic_seconds / 60, color="black", ls="--", lw=0.8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=7, ncol=4)
    axes[-1].set_xlabel("minutes (grey: a fault; dotted: end of warm-up; dashed: traffic stops)")
    o = result.options
    fig.suptitle(
        f"notify soak: {o['minutes']} min at {o['rate']}/s, seed {o['seed']}: {result.accepted} accepted,"
        f" {result.lost} lost, {result.stuck} stuck, {result.duplicates} duplicates"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: Result, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(result.markdown() + "\n")
    data = asdict(result)
    data["flat"] = [asdict(f) | {"rss_flat": f.rss_flat, "fds_flat": f.fds_flat} for f in result.flat]
    (out / "result.json").write_text(json.dumps(data, indent=1))
    plot(result, out / "soak.png")
    print(f"soak: report, plot and logs in {out}", flush=True)
