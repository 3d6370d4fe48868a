"""`migratectl cancel ID`: stop a migration; its target is thawed."""

from __future__ import annotations

import json

from migrated.cli.client import request


def register(sub) -> None:
    p = sub.add_parser("cancel", help="cancel a migration (the process keeps running)",
                       description=__doc__)
    p.add_argument("id", metavar="ID", help="a migration id (see `migratectl list`)")
    p.add_argument("--json", action="store_true", help="print the daemon's answer as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    res = request(args.control, {"op": "cancel", "id": args.id})
    if args.json:
        print(json.dumps(res, sort_keys=True))
        return 0
    print(f"cancelling migration {res.get('migration_id', args.id)} (was {res.get('state')})")
    return 0
