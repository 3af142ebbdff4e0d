"""Create, list and revoke a project's client API keys (stored hashed; GATEWAY_API_KEYS work too).

    python -m scripts.keys create --project acme [--name "backend"]   prints the key, once
    python -m scripts.keys list [--project acme]
    python -m scripts.keys revoke <key_id>                            the id `list` shows

Reads NOTIFICATIONS_DB_URL like the services. A key works on every gateway within a couple of
seconds of its creation, and stops working as soon after its revocation.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from common.config import load_config
from common.data import api_keys, db
from common.web.auth import PROJECT_RE, key_id


async def main_async(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.keys")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create")
    create.add_argument("--project", required=True)
    create.add_argument("--name", default="")
    listing = sub.add_parser("list")
    listing.add_argument("--project")
    revoke = sub.add_parser("revoke")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)
    config = load_config()
    database = await db.connect(config.notifications_db_url, maxsize=1)
    try:
        if args.command == "create":
            if not PROJECT_RE.match(args.project):
                print("a project is 1-63 of a-z 0-9 _ - (starting with a letter or digit)", file=sys.stderr)
                return 2
            key = api_keys.new_key()
            row = await api_keys.create(database, key_id(key), args.project, args.name)
            assert row is not None
            print(f"key {row['key_id']} of project {row['project_id']} (shown once, keep it secret):")
            print(key)
        elif args.command == "list":
            for row in await api_keys.listed(database, args.project):
                state = f"revoked {row['revoked_at']:%Y-%m-%d %H:%M}" if row["revoked_at"] else "live"
                print(f"{row['key_id']}  {row['project_id']}  {row['name'] or '-'}  {state}")
        else:
            if not await api_keys.revoke(database, args.key_id):
                print(f"no live key {args.key_id!r}", file=sys.stderr)
                return 1
            print(f"key {args.key_id} revoked")
        return 0
    finally:
        await database.close()


def main() -> None:
    sys.exit(asyncio.run(main_async(sys.argv[1:])))


if __name__ == "__main__":
    main()
