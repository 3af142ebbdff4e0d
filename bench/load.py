"""HTTP load generator: closed loop (C clients, as fast as answers come) or open loop (requests
sent at their planned times, whatever happened to earlier ones).

It runs as its own process (`python -m bench.load '<spec json>'`, started by `run_load`), never
in a service's event loop, and can be split over several processes when one is the bottleneck;
each reports the CPU time it used so the reader can tell.

The client is a minimal HTTP/1.1 keep-alive client on asyncio.Protocol rather than
aiohttp.ClientSession: on this machine aiohttp's client costs several times the CPU per request
of the servers it measures, so the generator, not the server, would set the figure. It speaks
just what the services answer: a status line, headers, a Content-Length or chunked body.

Open-loop latency is measured from each request's *planned* send time, so when the server
falls behind, the queueing shows in the percentiles instead of being hidden by a generator
that waits (coordinated omission). Every run is bounded by its duration and request count,
and the generator refuses any host outside the loopback range.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from bench.stats import latency_summary, planned_offsets

SEQ = "@SEQ@"  # replaced in the body by a value unique to each request (request_id)
REQUEST_TIMEOUT = 30.0
GRACE = 30.0  # how long to wait for answers after the last planned send


@dataclass
class Spec:
    host: str
    port: int
    path: str
    body: str  # JSON text containing SEQ once
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    mode: str = "closed"  # "closed" or "open"
    concurrency: int = 64  # closed: clients; open: connections opened before the start
    rate: float = 0.0  # open loop: requests/s over all generator processes
    duration: float = 10.0
    max_requests: int = 0  # 0: no limit but the duration
    seq_prefix: str = "bench"
    loop: str = "uvloop"  # "uvloop" or "asyncio"
    shard: int = 0
    shards: int = 1
    start_at: float = 0.0  # wall-clock time.time() at which every shard starts
    ports: tuple[int, ...] = ()  # several servers (gateways): shard i sends to ports[i % len]
    max_connections: int = 1024  # open loop: connections may grow to this while answers lag


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        status = parse_response(self.buffer)
        if status is None:
            return
        code, used, close = status
        del self.buffer[:used]
        if close:
            self.closed = True
            assert self.transport is not None
            self.transport.close()
        self.waiter.set_result(code)

    async def request(self, data: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


def parse_response(buffer: bytearray) -> tuple[int, int, bool] | None:
    """(status, bytes used, server closes) when `buffer` holds a whole response, else None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    start = end + 4
    close = headers.get("connection") == "close"
    if "content-length" in headers:
        stop = start + int(headers["content-length"])
        return (status, stop, close) if len(buffer) >= stop else None
    if headers.get("transfer-encoding") == "chunked":
        pos = start
        while True:
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buffer[pos:line_end]).split(b";")[0], 16)
            pos = line_end + 2 + size + 2
            if len(buffer) < pos:
                return None
            if size == 0:
                return status, pos, close
    # No length: only valid for bodiless answers here (we never read to end of stream).
    return status, start, close


def _raw_request(spec: Spec, seq: str) -> bytes:
    body = spec.body.replace(SEQ, seq).encode()
    head = [f"{spec.method} {spec.path} HTTP/1.1", f"Host: {spec.host}:{spec.port}"]
    head += [f"{k}: {v}" for k, v in spec.headers.items()]
    head += ["Content-Type: application/json", f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(head).encode() + body


def check_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"bench.load: refusing to send load to {host}: only loopback addresses")


class Recorder:
    def __init__(self) -> None:
        self.latencies_ms: list[float] = []  # of 2xx answers
        self.statuses: Counter[str] = Counter()
        self.first_send = 0.0
        self.cpu_start = 0.0  # process CPU time when the measured run began
        self.last_done = 0.0

    def done(self, status: str, began: float) -> None:
        now = time.perf_counter()
        self.statuses[status] += 1
        if status.startswith("2"):
            self.latencies_ms.append((now - began) * 1000)
        self.last_done = max(self.last_done, now)


async def _connect(spec: Spec) -> HttpConnection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(HttpConnection, spec.host, spec.port)
    return protocol


async def _send(spec: Spec, conn: HttpConnection, seq: str) -> str:
    try:
        return str(await asyncio.wait_for(conn.request(_raw_request(spec, seq)), REQUEST_TIMEOUT))
    except TimeoutError:
        conn.closed = True
        if conn.transport is not None:
            conn.transport.close()
        return "timeout"
    except OSError:
        return "connection"


async def closed_loop(spec: Spec, rec: Recorder, start: float) -> None:
    deadline = start + spec.duration
    counter = iter(range(spec.max_requests or sys.maxsize))
    conns = [await _connect(spec) for _ in range(spec.concurrency)]

    async def client(conn: HttpConnection) -> None:
        while time.perf_counter() < deadline:
            seq = next(counter, None)
            if seq is None:
                return
            if conn.closed:
                try:
                    conn = await _connect(spec)
                except OSError:
                    rec.done("connection", time.perf_counter())
                    await asyncio.sleep(0.05)
                    continue
            began = time.perf_counter()
            rec.done(await _send(spec, conn, f"{spec.seq_prefix}-{spec.shard}-{seq}"), began)

    await _sleep_until(start)
    rec.first_send = time.perf_counter()
    rec.cpu_start = time.process_time()
    await asyncio.gather(*(client(c) for c in conns))
    for c in conns:
        if c.transport is not None:
            c.transport.close()


class Pool:
    """Open-loop connections: reused when idle, new ones up to a cap, then requests wait their
    turn (woken by a released connection, not by polling, which would burn the generator's
    CPU exactly when the server is overloaded)."""

    def __init__(self, spec: Spec, idle: list[HttpConnection]) -> None:
        self.spec = spec
        self.idle = idle
        self.opened = len(idle)
        self.waiters: deque[asyncio.Future[HttpConnection]] = deque()
        self.replacing: set[asyncio.Task[None]] = set()

    async def get(self) -> HttpConnection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
            self.opened -= 1
        if self.opened < self.spec.max_connections:
            self.opened += 1
            try:
                return await _connect(self.spec)
            except OSError:
                self.opened -= 1
                raise
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return await waiter

    def put(self, conn: HttpConnection) -> None:
        if conn.closed:
            self.opened -= 1
            if self.waiters:
                task = asyncio.ensure_future(self._replace())
                self.replacing.add(task)  # a reference, so the task is not collected mid-way
                task.add_done_callback(self.replacing.discard)
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.idle.append(conn)

    async def _replace(self) -> None:
        self.opened += 1
        try:
            conn = await _connect(self.spec)
        except OSError as exc:
            self.opened -= 1
            if self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        self.put(conn)

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()


async def open_loop(spec: Spec, rec: Recorder, start: float) -> None:
    offsets = planned_offsets(spec.rate, spec.duration, spec.shard, spec.shards)
    if spec.max_requests:
        offsets = offsets[: spec.max_requests]
    pool = Pool(spec, [await _connect(spec) for _ in range(spec.concurrency)])
    tasks: set[asyncio.Task[None]] = set()

    async def one(seq: int, planned: float) -> None:
        # Waiting for a connection is part of the latency: it is queueing the server caused.
        try:
            conn = await pool.get()
        except OSError:
            rec.done("connection", planned)
            return
        rec.done(await _send(spec, conn, f"{spec.seq_prefix}-{spec.shard}-{seq}"), planned)
        pool.put(conn)

    await _sleep_until(start)
    rec.first_send = time.perf_counter()
    rec.cpu_start = time.process_time()
    for seq, offset in enumerate(offsets):
        planned = start + offset
        delay = planned - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(seq, planned))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=GRACE)
        for task in pending:
            task.cancel()
            rec.statuses["timeout"] += 1
    pool.close()


async def _sleep_until(when: float) -> None:
    delay = when - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def generate(spec: Spec) -> dict[str, Any]:
    check_loopback(spec.host)
    if spec.ports:
        spec = replace(spec, port=spec.ports[spec.shard % len(spec.ports)])
    rec = Recorder()
    # Every shard starts at the same wall-clock instant; measure on perf_counter from there.
    start = time.perf_counter() + max(0.0, spec.start_at - time.time())
    if spec.mode == "closed":
        await closed_loop(spec, rec, start)
    else:
        await open_loop(spec, rec, start)
    cpu = time.process_time() - rec.cpu_start
    return {
        "statuses": dict(rec.statuses),
        "latencies_ms": rec.latencies_ms,
        "window_s": max(rec.last_done - start, 1e-9),
        "cpu_s": cpu,
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    """`python -m bench.load SPEC_JSON OUT_FILE`. The result goes to a file, not stdout: a large
    write to a pipe whose descriptor the event loop left non-blocking can be cut short."""
    spec = Spec(**json.loads(sys.argv[1]))
    if spec.loop == "uvloop":
        import uvloop

        result = uvloop.run(generate(spec))
    else:
        result = asyncio.run(generate(spec))
    result["latencies_ms"] = [round(x, 3) for x in result["latencies_ms"]]
    Path(sys.argv[2]).write_text(json.dumps(result))


# --- the orchestrator's side --------------------------------------------------------------


@dataclass
class LoadResult:
    mode: str
    offered: float  # open loop: requests/s planned; closed loop: 0
    concurrency: int
    duration: float
    generators: int
    statuses: dict[str, int]
    ok: int
    rate: float  # 2xx answers per second over the measured window
    latency_ms: dict[str, float]
    generator_cpu: float  # CPU seconds / wall seconds, summed over generator processes (1.0 = a core)
    window_s: float

    @property
    def errors(self) -> dict[str, int]:
        return {k: v for k, v in self.statuses.items() if not k.startswith("2")}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "errors": self.errors}


async def run_load(spec: Spec, generators: int = 1, cwd: Path | None = None) -> LoadResult:
    """Run `spec` in `generators` processes starting together; merge their results."""
    check_loopback(spec.host)
    start_at = time.time() + 1.0 + 0.2 * generators  # time to import and open connections
    procs = []
    outdir = Path(tempfile.mkdtemp(prefix="bench-load-"))
    for shard in range(generators):
        shard_spec = asdict(spec) | {"shard": shard, "shards": generators, "start_at": start_at}
        if spec.mode == "closed":
            shard_spec["concurrency"] = max(1, spec.concurrency // generators)
            if spec.max_requests:
                share = spec.max_requests // generators + (shard < spec.max_requests % generators)
                shard_spec["max_requests"] = share
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.load",
                json.dumps(shard_spec),
                str(outdir / f"{shard}.json"),
                cwd=cwd,
                env={**os.environ, "PYTHONHASHSEED": "0"},
            )
        )
    timeout = spec.duration + GRACE + REQUEST_TIMEOUT + 30
    outputs = []
    try:
        for shard, proc in enumerate(procs):
            await asyncio.wait_for(proc.wait(), timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"load generator exited with {proc.returncode}")
            outputs.append(json.loads(await asyncio.to_thread((outdir / f"{shard}.json").read_text)))
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        shutil.rmtree(outdir, ignore_errors=True)
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    for o in outputs:
        statuses.update(o["statuses"])
        latencies.extend(o["latencies_ms"])
    window = max(o["window_s"] for o in outputs)
    ok = sum(v for k, v in statuses.items() if k.startswith("2"))
    return LoadResult(
        mode=spec.mode,
        offered=spec.rate if spec.mode == "open" else 0.0,
        concurrency=spec.concurrency,
        duration=spec.duration,
        generators=generators,
        statuses=dict(statuses),
        ok=ok,
        rate=ok / window,
        latency_ms=latency_summary(latencies),
        generator_cpu=sum(o["cpu_s"] / o["wall_s"] for o in outputs if o["wall_s"] > 0),
        window_s=window,
    )


if __name__ == "__main__":
    main()
