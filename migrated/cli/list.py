"""`migratectl list`: migrations in flight and recently finished."""

from __future__ import annotations

import json

from migrated.cli.client import request


def register(sub) -> None:
    p = sub.add_parser("list", help="migrations running and recently finished",
                       description=__doc__)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=run)


def run(args) -> int:
    res = request(args.control, {"op": "list"}) or []
    if args.json:
        print(json.dumps(res, default=str))
        return 0
    if not res:
        print("no migrations")
        return 0
    # Ids and peers are shown whole, however long: they are what `status`,
    # `cancel` and `send` take back (a receive's own id is "recv-" + 12 hex).
    ids = [str(m.get("migration_id", "?")) for m in res]
    peers = [str(m.get("peer") or "-") for m in res]
    fmt = (f"{{:<{max(14, *map(len, ids))}}} {{:<8}} {{:<11}} {{:>8}} "
           f"{{:<{max(22, *map(len, peers))}}} {{:>6}} {{:>9}}  {{}}")
    print(fmt.format("ID", "ROLE", "STATE", "PID", "PEER", "ROUNDS", "ELAPSED", "IMAGE/ERROR"))
    for m, ident, peer in zip(res, ids, peers):
        print(fmt.format(ident, m.get("role", "?"), m.get("state", "?"),
                         str(m.get("pid") or "-"), peer, m.get("rounds", 0),
                         f"{m.get('elapsed_s', 0):.1f}s",
                         m.get("image_id") or m.get("error") or ""))
    return 0
