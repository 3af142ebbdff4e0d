"""`python -m common.data.migrate`: create the three databases when missing and apply migrations."""

from __future__ import annotations

import asyncio

from common.config import Config, load_config
from common.data import db


def databases(config: Config) -> dict[str, str]:
    """Migration folder → the URL of the database it applies to."""
    return {
        "users_db": config.users_db_url,
        "templates_db": config.templates_db_url,
        "notifications_db": config.notifications_db_url,
    }


async def migrate_all(config: Config) -> dict[str, list[str]]:
    return {schema: await db.migrate(url, schema) for schema, url in databases(config).items()}


def main() -> None:
    config = load_config()
    for schema, applied in asyncio.run(migrate_all(config)).items():
        print(f"migrate: {schema}: {len(applied)} applied" + (f" ({', '.join(applied)})" if applied else ""))


if __name__ == "__main__":
    main()
