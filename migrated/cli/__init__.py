"""migratectl: the operator's command line.

Each command lives in its own module exposing ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed args and
returning the exit status).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from migrated.errors import MigratedError

DEFAULT_CONTROL = "/run/migrated/control.sock"

# Command modules, in the order `migratectl --help` lists them.
COMMANDS = ["send", "status", "list", "cancel", "probe", "images", "certs"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="migratectl",
        description="Control the migrated live-migration daemon.")
    p.add_argument("--control", default=DEFAULT_CONTROL, metavar="PATH",
                   help=f"control socket of the daemon (default {DEFAULT_CONTROL})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"migrated.cli.{name}").register(sub)
    # `migratectl send PID HOST --control PATH` works too: each command also
    # takes --control; SUPPRESS keeps its absence from undoing the outer one.
    for cmd in sub.choices.values():
        cmd.add_argument("--control", default=argparse.SUPPRESS, metavar="PATH",
                         help="control socket of the daemon (also accepted "
                              "before the command)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MigratedError as exc:
        print(f"migratectl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
