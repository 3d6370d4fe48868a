"""`migratectl certs`: a cluster CA and node certificates (no PKI needed).

  migratectl certs init-ca --dir DIR [--name NAME]
  migratectl certs issue   --dir DIR --name NODE [--san NAME_OR_IP ...]
  migratectl certs make    --dir DIR --nodes NODE[=ADDR[+ADDR...]],... [--san ...]   (both)
  migratectl certs show    FILE

Each node then runs: migrated --tls-ca DIR/ca.pem --tls-cert DIR/NODE.pem
--tls-key DIR/NODE.key.  Keep ca.key off the nodes.
"""

from __future__ import annotations

import argparse
import json
import sys

from migrated.errors import MigratedError


def _days(text: str) -> int:
    """--days, checked while parsing: a whole number from 1 to the
    library's MAX_DAYS (imported here: cryptography loads slowly)."""
    from migrated.daemon.certs import MAX_DAYS
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if not 1 <= v <= MAX_DAYS:
        raise argparse.ArgumentTypeError(f"{text} is out of range: 1 to {MAX_DAYS} days")
    return v


def register(sub) -> None:
    p = sub.add_parser("certs", help="make a cluster CA and node certificates",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = p.add_subparsers(dest="certs_command", metavar="ACTION")
    csub.required = True

    a = csub.add_parser("init-ca", help="create DIR/ca.pem and DIR/ca.key")
    a.add_argument("--dir", required=True, metavar="DIR")
    a.add_argument("--name", default="migrated cluster CA", help="the CA's common name")
    a.add_argument("--days", type=_days, default=None, help="validity (default 3650)")
    a.add_argument("--force", action="store_true", help="overwrite existing files")
    a.set_defaults(func=run_init_ca)

    i = csub.add_parser("issue", help="create DIR/NODE.pem and DIR/NODE.key signed by the CA")
    i.add_argument("--dir", required=True, metavar="DIR")
    i.add_argument("--name", required=True, metavar="NODE",
                   help="node name: the certificate CN and first DNS name (--allow-peer matches it)")
    i.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                   help="extra DNS name or IP address peers dial this node by (repeatable, "
                        "or comma-separated), e.g. --san 10.0.0.5,node1.example")
    i.add_argument("--days", type=_days, default=None, help="validity (default 825)")
    i.add_argument("--force", action="store_true", help="overwrite existing files")
    i.set_defaults(func=run_issue)

    m = csub.add_parser("make", help="a CA (if DIR has none) plus one certificate per node")
    m.add_argument("--dir", required=True, metavar="DIR")
    m.add_argument("--nodes", required=True, metavar="NODE[=ADDR[+ADDR...]],...",
                   help="node names; NODE=ADDR puts ADDR (an IP or DNS name, several "
                        "joined by '+') into that node's certificate only")
    m.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                   help="added to EVERY node's certificate: only for names all nodes "
                        "share (e.g. 127.0.0.1,localhost on one test machine)")
    m.add_argument("--force", action="store_true", help="overwrite existing files")
    m.set_defaults(func=run_make)

    s = csub.add_parser("show", help="print a certificate's names and validity")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--json", action="store_true", help="accepted: the output is JSON already")
    s.set_defaults(func=run_show)


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _file_error(e: OSError, action: str) -> MigratedError:
    """An OSError of `certs ACTION` as a message (no traceback)."""
    where = f"{e.filename}: " if e.filename else ""
    return MigratedError(f"certs {action}: {where}{e.strerror or e}")


def run_init_ca(args) -> int:
    from migrated.daemon import certs
    kw = {"days": args.days} if args.days else {}
    try:
        cert, key = certs.init_ca(args.dir, args.name, force=args.force, **kw)
    except OSError as e:
        raise _file_error(e, "init-ca") from None
    print(f"wrote {cert} and {key} (keep the key private)")
    return 0


def run_issue(args) -> int:
    from migrated.daemon import certs
    kw = {"days": args.days} if args.days else {}
    try:
        cert, key = certs.issue(args.dir, args.name, _split(args.san), force=args.force, **kw)
    except OSError as e:
        raise _file_error(e, "issue") from None
    print(f"wrote {cert} and {key}")
    return 0


def run_make(args) -> int:
    from migrated.daemon import certs
    try:
        nodes, sans = _split([args.nodes]), _split(args.san)
        for addr in certs.shared_addresses(nodes, sans):
            print(f"warning: {addr} goes into more than one node's certificate, so a sender "
                  "dialling it cannot tell those nodes apart; give each node its own "
                  "addresses: --nodes node1=ADDR1,node2=ADDR2", file=sys.stderr)
        out = certs.make(args.dir, nodes, sans, force=args.force)
    except OSError as e:
        raise _file_error(e, "make") from None
    for name, (cert, key) in out.items():
        print(f"{name}: {cert} {key}")
    return 0


def run_show(args) -> int:
    from migrated.daemon import certs
    try:
        info = certs.describe(args.file)
    except OSError as e:
        raise _file_error(e, "show") from None
    except ValueError as e:
        raise MigratedError(f"{args.file} is not a PEM certificate ({e}); "
                            "give a PEM certificate such as DIR/NODE.pem") from None
    print(json.dumps(info, indent=2))
    return 0
