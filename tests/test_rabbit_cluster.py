"""Scale out, shown: a three-node RabbitMQ cluster (the installed rabbitmq-server, started by
scripts/rabbit_cluster.py with names, ports and a directory of the suite's own), QUEUE_TYPE=quorum
and the three URLs; the node the gateway and the worker are connected to is stopped while
notifications flow, and every one of them is delivered, none lost, duplicates bounded."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.delivery.worker import BROKER_KEY as WORKER_BROKER
from common.keys import BROKER_KEY as GATEWAY_BROKER
from common.keys import METRICS_KEY
from common.metrics import Metrics
from scripts.rabbit_cluster import Cluster, installed
from tests.conftest import PREFIX
from tests.test_faults import received_at_least, send_many, wait_delivered

PREFETCH = 16
AFTER_BATCHES = 8  # batches of 20 sent once the node is gone
MAX_COUNT = 1200  # a bound, should stopping the node never return


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports() -> int:
    """A first AMQP port whose three AMQP and three distribution ports (+20000) are all free."""
    for first in range(5711, 5900, 3):
        if all(_free(p) and _free(p + 20000) for p in range(first, first + 3)):
            return first
    raise RuntimeError("no free block of ports for the test cluster")


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[Cluster]:
    if not installed():
        pytest.skip("rabbitmq-server is not installed: the three-node cluster test needs it")
    base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-rabbit-cluster-"))
    cluster = Cluster(base, _free_ports(), prefix=f"{PREFIX}_node")
    try:
        cluster.up()
        yield cluster
    finally:
        # Stopped and removed whatever happened, a failed start included.
        cluster.down(remove=True)


def _metric(metrics: Metrics, name: str) -> float:
    return sum(
        sample.value
        for sample in getattr(metrics, name).collect()[0].samples
        if sample.name.endswith("_total")
    )


async def test_a_node_lost_mid_flow_loses_nothing(stack_factory: Any, rabbit_cluster: Cluster) -> None:
    cluster = rabbit_cluster
    stack = await stack_factory(
        rabbitmq_url=",".join(cluster.urls()), queue_type="quorum", worker_prefetch=PREFETCH
    )
    gateway_broker = stack.apps["gateway"][GATEWAY_BROKER]
    worker_broker = stack.apps["email_worker"][WORKER_BROKER]
    first = cluster.nodes[0]
    # Both on the first node of the list: the one this test takes away.
    assert gateway_broker.connection.url.port == worker_broker.connection.url.port == first.amqp_port

    stack.smtp.delay = 0.03  # keeps messages in the worker's hands when the node goes
    user = await stack.create_user()
    code = (await stack.create_template())["code"]

    gone = asyncio.Event()
    ids: list[str] = []

    async def paced() -> None:
        # Requests keep arriving until well after the node is gone, however long stopping it takes
        # on a loaded machine: a fixed number of batches could all be sent before it went.
        after = 0
        while after < AFTER_BATCHES and len(ids) < MAX_COUNT:
            ids.extend(await send_many(stack, user["id"], code, 20, concurrency=4))
            after += gone.is_set()
            await asyncio.sleep(0.4)

    sending = asyncio.create_task(paced())
    try:
        await received_at_least(stack, 30)
        started = time.monotonic()
        await asyncio.to_thread(cluster.stop_node, first)
        gone.set()
        # Gone mid-flow: requests were still coming in and messages still waiting.
        sent_then, delivered_then = len(ids), len(stack.smtp.notification_ids())
        assert not sending.done(), "the flow ended before the node was gone"
        print(
            f"stopped {first.name} after {sent_then} accepted and {delivered_then} delivered, "
            f"in {time.monotonic() - started:.1f} s"
        )
        await sending
        count = len(ids)
        await wait_delivered(stack, user["id"], count, timeout=120)
        print(f"all {count} delivered {time.monotonic() - started:.1f} s after the node stopped")
    finally:
        if not sending.done():
            sending.cancel()
            with contextlib.suppress(BaseException):
                await sending

    # Both moved to a surviving node.
    assert gateway_broker.ready and worker_broker.ready
    assert gateway_broker.connection.url.port != first.amqp_port
    assert worker_broker.connection.url.port != first.amqp_port
    await asyncio.sleep(1)  # time for a duplicate to show up, were there one
    received = stack.smtp.notification_ids(user["email"])
    assert len(set(ids)) == count >= AFTER_BATCHES * 20 + 30
    assert set(received) == set(ids), "a notification was lost"
    duplicates = len(received) - len(set(received))
    worker_metrics = stack.apps["email_worker"][METRICS_KEY]
    reclaimed = _metric(worker_metrics, "reclaimed")
    print(
        f"duplicates sent: {duplicates}; redelivered copies skipped: {_metric(worker_metrics, 'duplicates')}"
    )
    assert duplicates <= reclaimed <= PREFETCH

    # The cluster is restored: the node comes back and rejoins.
    await asyncio.to_thread(cluster.start_node, first)
    members = await asyncio.to_thread(cluster.members, cluster.nodes[1])
    assert sorted(members) == sorted(node.name for node in cluster.nodes)
