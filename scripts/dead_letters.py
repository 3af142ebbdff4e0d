"""Inspect or drain failed.queue.

    python -m scripts.dead_letters show [--limit N]   print messages, leave them in the queue
    python -m scripts.dead_letters drain              print and remove every message

The status store records every failure with its reason, so failed.queue is a copy for operators;
to send a failure again use POST /api/v1/notifications/{id}/retry.
"""

from __future__ import annotations

import argparse
import asyncio

from common.broker.amqp import FAILED_QUEUE, connect
from common.config import load_config


async def run(url: str, drain: bool, limit: int) -> int:
    connection = await connect(url)
    count = 0
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(FAILED_QUEUE, passive=True)
        while drain or count < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            count += 1
            headers = {k: str(v) for k, v in (message.headers or {}).items()}
            print(
                f"{count}: notification={headers.get('x-notification-id', '?')} "
                f"channel={headers.get('x-channel', '?')} attempts={headers.get('x-attempts', '?')} "
                f"reason={headers.get('x-failure-reason', '?')}"
            )
            if drain:
                await message.ack()
        # In "show" mode nothing was acknowledged: closing the channel returns every message.
    finally:
        await connection.close()
    print(f"{'removed' if drain else 'shown'}: {count}")
    return count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=("show", "drain"))
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    config = load_config()
    asyncio.run(run(config.rabbitmq_url, args.action == "drain", args.limit))


if __name__ == "__main__":
    main()
