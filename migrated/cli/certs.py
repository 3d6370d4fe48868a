"""`migratectl certs`: a cluster CA and node certificates (no PKI needed).

  migratectl certs init-ca --dir DIR [--name NAME]
  migratectl certs issue   --dir DIR --name NODE [--san NAME_OR_IP ...]
  migratectl certs make    --dir DIR --nodes a,b[,...] [--san ...]   (both)
  migratectl certs show    FILE

Each node then runs: migrated --tls-ca DIR/ca.pem --tls-cert DIR/NODE.pem
--tls-key DIR/NODE.key.  Keep ca.key off the nodes.
"""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("certs", help="make a cluster CA and node certificates",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    csub = p.add_subparsers(dest="certs_command", metavar="ACTION")
    csub.required = True

    a = csub.add_parser("init-ca", help="create DIR/ca.pem and DIR/ca.key")
    a.add_argument("--dir", required=True, metavar="DIR")
    a.add_argument("--name", default="migrated cluster CA", help="the CA's common name")
    a.add_argument("--days", type=int, default=None, help="validity (default 3650)")
    a.add_argument("--force", action="store_true", help="overwrite existing files")
    a.set_defaults(func=run_init_ca)

    i = csub.add_parser("issue", help="create DIR/NODE.pem and DIR/NODE.key signed by the CA")
    i.add_argument("--dir", required=True, metavar="DIR")
    i.add_argument("--name", required=True, metavar="NODE",
                   help="node name: the certificate CN and first DNS name (--allow-peer matches it)")
    i.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                   help="extra DNS name or IP address peers dial this node by (repeatable, "
                        "or comma-separated), e.g. --san 10.0.0.5,node1.example")
    i.add_argument("--days", type=int, default=None, help="validity (default 825)")
    i.add_argument("--force", action="store_true", help="overwrite existing files")
    i.set_defaults(func=run_issue)

    m = csub.add_parser("make", help="a CA (if DIR has none) plus one certificate per node")
    m.add_argument("--dir", required=True, metavar="DIR")
    m.add_argument("--nodes", required=True, metavar="A,B,...")
    m.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                   help="extra names/addresses added to every node certificate "
                        "(e.g. 127.0.0.1,localhost for a loopback test)")
    m.add_argument("--force", action="store_true", help="overwrite existing files")
    m.set_defaults(func=run_make)

    s = csub.add_parser("show", help="print a certificate's names and validity")
    s.add_argument("file", metavar="FILE")
    s.set_defaults(func=run_show)


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def run_init_ca(args) -> int:
    from migrated.daemon import certs
    kw = {"days": args.days} if args.days else {}
    cert, key = certs.init_ca(args.dir, args.name, force=args.force, **kw)
    print(f"wrote {cert} and {key} (keep the key private)")
    return 0


def run_issue(args) -> int:
    from migrated.daemon import certs
    kw = {"days": args.days} if args.days else {}
    cert, key = certs.issue(args.dir, args.name, _split(args.san), force=args.force, **kw)
    print(f"wrote {cert} and {key}")
    return 0


def run_make(args) -> int:
    from migrated.daemon import certs
    out = certs.make(args.dir, _split([args.nodes]), _split(args.san), force=args.force)
    for name, (cert, key) in out.items():
        print(f"{name}: {cert} {key}")
    return 0


def run_show(args) -> int:
    from migrated.daemon import certs
    print(json.dumps(certs.describe(args.file), indent=2))
    return 0
