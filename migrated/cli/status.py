"""`migratectl status [ID]`: the daemon, or one migration in detail."""

from __future__ import annotations

import json
import time

from migrated.cli.client import request
from migrated.cli.send import HEADER, round_row, summary_lines


def register(sub) -> None:
    p = sub.add_parser("status", help="daemon status, or one migration's progress",
                       description=__doc__)
    p.add_argument("id", nargs="?", metavar="ID", help="a migration id (see `migratectl list`)")
    p.add_argument("--json", action="store_true", help="print the raw JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    req = {"op": "status"}
    if args.id:
        req["id"] = args.id
    res = request(args.control, req)
    if args.json:
        print(json.dumps(res, default=str))
        return 0
    if args.id:
        print_migration(res)
    else:
        print_daemon(res)
    return 0


def print_daemon(d: dict) -> None:
    print(f"node {d.get('node')} (migrated {d.get('version')}, pid {d.get('pid')}), "
          f"listening on {d.get('listen')}, "
          f"{'mutual TLS' if d.get('tls') else 'INSECURE plaintext'}"
          + (f", allowed peers: {', '.join(d['allow_peer'])}" if d.get("allow_peer") else ""))
    print(f"migrations: {d.get('sending')} sending, {d.get('receiving')} receiving "
          f"(limit {d.get('max_migrations')} each); {d.get('completed')} completed, "
          f"{d.get('failed')} failed/cancelled; up {d.get('uptime_s')} s")
    if d.get("withdrawing"):
        print(f"withdrawing images of failed migrations (Release was sent): "
              f"{', '.join(d['withdrawing'])}")
    t = d.get("timeouts") or {}
    if t:
        print(f"timeouts: peer {t.get('peer_timeout_s'):g} s, handshake "
              f"{t.get('handshake_timeout_s'):g} s, commit {t.get('commit_timeout_s'):g} s "
              f"(keepalive every {t.get('keepalive_s'):g} s)")
    for m in d.get("migrations", []):
        print(f"  {m['migration_id']}  {m['role']:<7} {m['state']:<10} pid {m.get('pid')} "
              f"peer {m.get('peer')}  round {m.get('rounds')}  {m.get('elapsed_s')} s")


def print_migration(m: dict) -> None:
    print(f"migration {m.get('migration_id')} ({m.get('role')}): {m.get('state')}")
    print(f"  pid {m.get('pid')}, peer {m.get('peer')}"
          + (f" ({m['peer_name']})" if m.get("peer_name") else "")
          + f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(m.get('created', 0)))}"
          + f", {m.get('elapsed_s')} s")
    if m.get("options"):
        print("  options: " + ", ".join(f"{k}={v}" for k, v in m["options"].items()))
    rounds = m.get("round_list") or []
    if rounds:
        print(HEADER)
        for r in rounds:
            print(round_row(r))
    if m.get("summary"):
        for line in summary_lines(m["summary"]):
            print("  " + line)
