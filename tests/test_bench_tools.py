"""The pure parts of the benchmark harness (bench/), so they cannot silently break. Nothing here
measures speed: benchmarks are run with `make bench`, not with the tests."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import report
from bench.load import parse_response
from bench.report import replace_latest, top_functions
from bench.stack import cpu_seconds
from bench.stats import latency_summary, percentile, planned_offsets


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    # Not interpolated: always a value some request really had.
    assert percentile([10.0, 20.0], 50) == 10.0
    assert percentile([10.0, 20.0], 51) == 20.0
    assert percentile([3.0, 1.0, 2.0], 99) == 3.0  # sorts when not told it is sorted
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_latency_summary() -> None:
    summary = latency_summary([5.0, 1.0, 3.0, 2.0, 4.0])
    assert summary == {"p50": 3.0, "p95": 5.0, "p99": 5.0, "max": 5.0}
    assert all(math.isnan(v) for v in latency_summary([]).values())


def test_open_loop_schedule_is_even_and_ordered() -> None:
    offsets = planned_offsets(1000, 2.0)
    assert len(offsets) == 2000
    assert offsets == sorted(offsets)
    assert offsets[0] == 0.0 and offsets[1] == pytest.approx(0.001)
    assert offsets[-1] == pytest.approx(1.999)
    assert planned_offsets(0, 10) == [] and planned_offsets(100, 0) == []


def test_open_loop_shards_interleave_into_the_one_schedule() -> None:
    whole = planned_offsets(300, 1.0)
    shards = [planned_offsets(300, 1.0, shard, 3) for shard in range(3)]
    assert sorted(o for s in shards for o in s) == whole
    assert all(s == sorted(s) for s in shards)
    # Each shard's requests alternate with the others', not one burst after another.
    assert shards[0][:2] == [whole[0], whole[3]] and shards[1][0] == whole[1]
    with pytest.raises(ValueError):
        planned_offsets(300, 1.0, 3, 3)


def test_parse_response_waits_for_the_whole_body() -> None:
    head = b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n"
    assert parse_response(bytearray(head + b'{"a":')) is None
    assert parse_response(bytearray(head + b'{"a":1}HTTP/1.1')) == (202, len(head) + 7, False)
    head = b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    chunked = head + b"3\r\nabc\r\n0\r\n\r\n"
    assert parse_response(bytearray(chunked[:-3])) is None
    assert parse_response(bytearray(chunked)) == (503, len(chunked), True)


def test_profile_top_functions_counts_own_and_inclusive_samples() -> None:
    raw = "\n".join(
        [
            "main (/app/gateway.py:10);handle (/app/gateway.py:20);"
            "execute (/x/site-packages/psycopg2/extras.py:5) 6",
            "main (/app/gateway.py:10);handle (/app/gateway.py:21) 3",
            "main (/app/gateway.py:11) 1",
        ]
    )
    total, top = top_functions(raw, limit=2)
    assert total == 10
    assert top == [("execute (psycopg2/extras.py)", 6, 6), ("handle (/app/gateway.py)", 3, 9)]


def test_the_decode_bench_compares_decoders_that_agree() -> None:
    from bench import decode

    assert decode.today(decode.VALID) and decode.with_msgspec(decode.VALID)
    assert not decode.today(decode.INVALID) and not decode.with_msgspec(decode.INVALID)


def test_a_process_cpu_counts_its_children(tmp_path: Path) -> None:
    """A worker's render processes work for it: the bench counts their CPU as the worker's."""
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\ntime.sleep(10)\n"
    script = tmp_path / "parent.py"
    script.write_text(
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {busy!r}])\ntime.sleep(10)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    try:
        deadline = time.monotonic() + 8
        while cpu_seconds(parent.pid) < 0.45 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cpu_seconds(parent.pid) >= 0.45  # the child's 0.5 s; the parent only sleeps
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def test_a_new_run_replaces_the_latest_of_its_title_and_keeps_the_others() -> None:
    text = (
        "# Benchmarks\n\nmethod\n\n## Latest figures\n\nintro\n\n"
        "### Gateway accept — 2026-01-01 10:00 UTC\n\nold accept\n\n"
        "### End to end, email — 2026-01-01 10:05 UTC\n\nemail\n\n## After\n\nkept\n"
    )
    new = replace_latest(text, "Gateway accept", "### Gateway accept — 2026-02-02 11:00 UTC\n\nnew accept\n")
    assert "old accept" not in new and "new accept" in new
    assert "email" in new and new.endswith("## After\n\nkept\n") and "intro" in new
    assert new.count("### Gateway accept") == 1
    added = replace_latest(new, "Topic fan-out", "### Topic fan-out — 2026-02-02 12:00 UTC\n\nfan\n")
    assert "fan" in added and "new accept" in added and added.index("## Latest figures") < added.index("fan")


def test_a_sample_goes_to_the_most_specific_step_on_its_stack() -> None:
    site = "/v/lib/python3.11/site-packages"
    raw = "\n".join(
        [
            # The driver under a claim is the claim's, however deep; so is a log line there.
            f"<module> (email_worker.py:1);handle (common/delivery/worker.py:9);"
            f"claim_many (common/data/store.py:280);execute ({site}/aiopg/cursor.py:1) 5",
            "<module> (email_worker.py:1);claim_many (common/data/store.py:280);"
            "info (/v/lib/python3.11/logging/__init__.py:3) 1",
            # Among specific steps the deepest wins: SMTP under the provider's send.
            f"handle (common/delivery/worker.py:9);send (providers/smtp.py:3);"
            f"sendmail ({site}/aiosmtplib/smtp.py:3) 2",
            # aiohttp's client counts for its caller: a lookup.
            f"handle (common/delivery/worker.py:9);user (common/lookups/clients.py:10);"
            f"_request ({site}/aiohttp/client.py:3) 2",
            # Only general frames: the most general step there is, the worker's handler.
            "handle (common/delivery/worker.py:9);loads (common/delivery/worker.py:20) 3",
            "_run_once (/v/lib/python3.11/asyncio/base_events.py:1) 7",
        ]
    )
    total, shares = report.step_shares(raw)
    assert total == 20
    assert shares == {
        "claim (status store)": 6 / 20,
        "send: SMTP": 2 / 20,
        "look up user and template": 2 / 20,
        "deliver, other (worker)": 3 / 20,
        report.OTHER_STEP: 7 / 20,
    }
