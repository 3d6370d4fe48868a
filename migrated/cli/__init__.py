"""migratectl: the operator's command line.

Each command lives in its own module exposing ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed args and
returning the exit status).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import signal
import sys

from migrated.errors import MigratedError

DEFAULT_CONTROL = "/run/migrated/control.sock"

# Command modules, in the order `migratectl --help` lists them.
COMMANDS = ["send", "status", "list", "cancel", "probe", "images", "certs"]


# Exit status when our stdout is closed before we finish (`... | head -1`):
# what the shell reports for a command that SIGPIPE ended, 128 + 13.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


class CtlParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors can also be reported in a
    command's own output format: a parser with ``on_usage_error`` set calls
    it with the arguments it was parsing and the message, before the usual
    usage text on stderr and exit 2 (`send --json` prints its JSON object).
    Subparsers are of this class too (argparse makes them of the parent's)."""

    on_usage_error = None
    _parsing: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        # (not list(): the submodule migrated.cli.list shadows it here)
        self._parsing = [*(sys.argv[1:] if args is None else args)]
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        if self.on_usage_error is not None:
            self.on_usage_error(self._parsing, message)
        super().error(message)


# What never reaches the operator's terminal as it is: C0 controls but tab
# and newline, DEL, C1 controls (escape sequences), and surrogates (bytes
# that were not UTF-8, kept by surrogateescape; a strict UTF-8 stdout
# cannot even encode them).
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    if 0xDC80 <= c <= 0xDCFF:               # an undecodable byte, as such
        return f"\\x{c - 0xDC00:02x}"
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


class PrintableStream(io.TextIOBase):
    """stdout/stderr as migratectl's commands write to them.  Much of what
    they show came from a peer or an image: process command lines and
    paths from the source node, error messages from the other daemon.
    Their control characters and undecodable bytes are written escaped
    (``\\x1b``, ``\\xff``): a process named with escape sequences cannot
    drive the operator's terminal, and a command line that is not UTF-8
    cannot make `images list` fail under a strict UTF-8 locale."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> int:
        self.stream.write(_UNPRINTABLE.sub(_escape, s))
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


def build_parser() -> argparse.ArgumentParser:
    p = CtlParser(
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
    out, err = sys.stdout, sys.stderr
    # None when started with the descriptor closed: print() then writes
    # nothing, as it should go on doing.
    sys.stdout = PrintableStream(out) if out is not None else None
    sys.stderr = PrintableStream(err) if err is not None else None
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = out, err


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        msg = f"unrecognized arguments: {' '.join(extra)}"
        hook = getattr(args, "on_usage_error", None)
        if hook is not None:
            hook([*(sys.argv[1:] if argv is None else argv)], msg)
        parser.error(msg)
    try:
        return int(args.func(args) or 0)
    except MigratedError as exc:
        print(f"migratectl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Nothing more can be shown; point stdout at /dev/null so that the
        # interpreter's final flush does not fail again, and leave quietly.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
