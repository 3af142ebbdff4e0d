"""`python -m topology`: declare the RabbitMQ topology; exit 1 naming any conflicting queue."""

from __future__ import annotations

import asyncio
import sys

from common.broker import amqp
from common.config import Config, load_config
from topology import TopologyConflict, declare


async def _main(config: Config) -> int:
    connection = await amqp.connect(config.rabbitmq_url)
    try:
        channel = await connection.channel()
        try:
            names = await declare(channel, config)
        except TopologyConflict as exc:
            print(f"topology: {exc}", file=sys.stderr)
            return 1
    finally:
        await connection.close()
    print(f"topology: declared exchange notifications.direct and {len(names)} queues: " + ", ".join(names))
    return 0


def main() -> None:
    raise SystemExit(asyncio.run(_main(load_config())))


if __name__ == "__main__":
    main()
