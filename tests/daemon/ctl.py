"""Run migratectl with this directory's commands registered, whatever the
lead's COMMANDS list holds yet (tests only): python tests/daemon/ctl.py ..."""

from __future__ import annotations

import sys

import migrated.cli as cli

MINE = ["send", "status", "list", "cancel", "certs"]


def main(argv: list[str] | None = None) -> int:
    for name in MINE:
        if name not in cli.COMMANDS:
            cli.COMMANDS.append(name)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
