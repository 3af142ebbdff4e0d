"""The soak (bench/soak.py, `make soak`), short: 90 seconds of traffic under faults through the
whole stack as processes, then the count. Its bounds are about correctness only (nothing lost,
nothing stuck, duplicates within the documented window), never speed, so it holds while the
rest of the suite loads the machine. Plus the count itself, fed a loss, a stuck one and a
duplicate, so that a soak that passes is not one that cannot fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import Options, run
from bench.soak_report import Result, Sample
from tests.conftest import PREFIX, REDIS_DB

# Seed 27's schedule opens with a PostgreSQL black hole, a SIGKILLed email worker, a purged retry
# queue, then cuts of RabbitMQ and Redis: the faults that have lost or doubled work before.
SEED = 27


@pytest.mark.stack
@pytest.mark.timeout(540)
async def test_a_short_soak_loses_nothing_and_sends_twice_only_in_the_window(tmp_path: Path) -> None:
    result = await run(
        Options(
            minutes=1.5,
            seed=SEED,
            rate=15.0,
            users=20,
            sample_every=3.0,
            prefix=f"{PREFIX}_soak",
            redis_db=REDIS_DB,
            out=tmp_path,
            db_pool_size=4,  # about 30 connections for its eight processes, not 60
        )
    )
    report = result.markdown()
    assert result.sent >= 1000 and len(result.faults) >= 4, report  # it did run, under faults
    assert result.accepted == result.sent, report
    assert result.lost == 0, report
    assert result.stuck == 0, report
    assert result.delivered == result.accepted, report
    assert result.duplicates_ok, report
    assert result.conflicts == 0 and not result.exits, report
    assert (tmp_path / "soak.png").stat().st_size > 10_000
    assert "| email_worker |" in (tmp_path / "report.md").read_text()


def _count(statuses: dict[str, str], received: dict[str, int], **extra: object) -> Result:
    accepted = extra.pop("accepted", None) or {f"r{i}": i for i in statuses}
    assert isinstance(accepted, dict)
    args: dict[str, object] = {
        "options": {"minutes": 1, "rate": 1, "seed": 1, "sample_every": 1},
        "sent": len(accepted),
        "accepted": accepted,
        "statuses": statuses,
        "received": received,
        "first_received": dict.fromkeys(received, 50.0),
        "answers": {},
        "conflicts": 0,
        "faults": [],
        "reclaimed": 0.0,
        "kills": 0,
        "prefetch": 16,
        "samples": [],
        "warmup": 0.0,
        "traffic_seconds": 60.0,
        "drained": 1.0,
        "exits": [],
        **extra,
    }
    return Result.count(**args)  # type: ignore[arg-type]


def test_the_count_sees_what_went_missing_stuck_or_twice() -> None:
    clean = _count({"a": "delivered", "b": "delivered"}, {"a": 1, "b": 1})
    assert clean.correct and clean.lost == clean.stuck == clean.duplicates == 0
    # "c" has no row (a deleted one), "d" is delivered but never reached the server, "e" failed.
    lost = _count(
        {"a": "delivered", "d": "delivered", "e": "failed"},
        {"a": 1},
        accepted={"r1": "a", "r2": "c", "r3": "d", "r4": "e"},
    )
    assert lost.lost == 3 and not lost.correct
    stuck = _count({"a": "delivered", "b": "pending"}, {"a": 1})
    assert stuck.stuck == 1 and stuck.stuck_detail == {"pending": 1} and not stuck.correct
    # A duplicate with no worker SIGKILLed and nothing reclaimed is outside the window...
    twice = _count({"a": "delivered"}, {"a": 2})
    assert twice.duplicates == 1 and not twice.duplicates_ok
    # ...and inside it when a killed worker's message was reclaimed.
    allowed = _count({"a": "delivered"}, {"a": 2}, reclaimed=1.0, kills=1)
    assert allowed.duplicates_ok and allowed.correct
    # One whose first copy arrived just before an SMTP black hole: the 250 was lost in flight.
    ambiguous = _count({"a": "delivered"}, {"a": 2}, faults=[("black hole smtp", 51.0, 65.0)])
    assert ambiguous.duplicates_smtp_ambiguous == 1 and ambiguous.duplicates_ok


def test_flat_means_the_last_third_did_not_grow() -> None:
    def samples(rss: list[int], fds: list[int]) -> list[Sample]:
        return [Sample(float(t), "w", 1, r, f, 1) for t, (r, f) in enumerate(zip(rss, fds, strict=True))]

    steady = _count({"a": "delivered"}, {"a": 1}, samples=samples([100_000] * 12, [20] * 12))
    assert steady.flat_ok
    growing = [100_000 + 5_000 * t for t in range(12)]  # +5 MiB a sample: a leak
    leaking = _count({"a": "delivered"}, {"a": 1}, samples=samples(growing, [20] * 12))
    assert not leaking.flat_ok and not leaking.ok and leaking.correct
    fds = _count(
        {"a": "delivered"}, {"a": 1}, samples=samples([100_000] * 12, [20 + 2 * t for t in range(12)])
    )
    assert not fds.flat_ok
