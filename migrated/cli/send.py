"""`migratectl send PID HOST[:PORT]`: live-migrate a process's memory.

The daemon does the work; we follow its events and print a row per round
(round, pages, MiB, ms, dirty rate, bandwidth, pause), then the summary.
With ``--json`` only the final summary object is printed.  Exit 0 only if
the migration completed.  Ctrl-C asks the daemon to cancel (the target is
thawed) and waits for the outcome; a second Ctrl-C leaves at once.
"""

from __future__ import annotations

import argparse
import json
import sys

from migrated.cli.client import ControlClient, ControlError
from migrated.daemon.config import DEFAULT_PORT, ConfigError, parse_hostport, parse_size
from migrated.errors import MigratedError

MiB = 1024 * 1024
ROW = "{:>5} {:>10} {:>9} {:>8} {:>12} {:>11} {:>8}"
HEADER = ROW.format("round", "pages", "MiB", "ms", "dirty MiB/s", "MiB/s", "pause ms")


def _rate(text: str) -> float:
    try:
        return float(parse_size(text, "rate"))
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _nonneg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def register(sub) -> None:
    p = sub.add_parser("send", help="live-migrate a process's memory to another node",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("pid", type=int, metavar="PID")
    p.add_argument("dest", metavar="HOST[:PORT]", help=f"peer daemon (default port {DEFAULT_PORT})")
    p.add_argument("--downtime-ms", type=_nonneg, metavar="N",
                   help="target freeze time; pre-copy ends when the rest fits (default 300)")
    p.add_argument("--max-rounds", type=_nonneg, metavar="N",
                   help="cap on pre-copy rounds; 0 = plain stop-and-copy (default 30)")
    p.add_argument("--max-bandwidth", type=_rate, metavar="RATE",
                   help="cap the stream: bytes/s, or with K, M, G (powers of 1024), e.g. 100M")
    p.add_argument("--tracker", metavar="NAME",
                   help="dirty-page tracker: auto, soft-dirty, digest, uffd-wp (default auto)")
    p.add_argument("--then", choices=("stop", "resume", "kill"),
                   help="what the source process does after the image is committed "
                        "(default stop: left frozen, like QEMU)")
    p.add_argument("--timeout", type=_positive_float, metavar="S",
                   help="give up (and thaw) after S seconds (default 600)")
    p.add_argument("--json", action="store_true", help="print only the JSON summary at the end")
    p.set_defaults(func=run)


def build_request(args) -> dict:
    try:
        host, port = parse_hostport(args.dest, DEFAULT_PORT)
    except ConfigError as e:
        raise MigratedError(f"bad destination {args.dest!r}: {e}") from None
    opts = {"downtime_ms": args.downtime_ms, "max_rounds": args.max_rounds,
            "max_bandwidth": args.max_bandwidth, "tracker": args.tracker,
            "then": args.then, "timeout_s": args.timeout}
    return {"op": "send", "pid": args.pid, "host": host, "port": port,
            "options": {k: v for k, v in opts.items() if v is not None}, "follow": True}


def _num(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def round_row(r: dict) -> str:
    nbytes = r.get("bytes")
    bw = r.get("bandwidth")
    return ROW.format(
        _num(r.get("round"), "{}"), _num(r.get("pages"), "{}"),
        _num(nbytes / MiB if isinstance(nbytes, (int, float)) else None, "{:.2f}"),
        _num(r.get("duration_ms")), fmt_dirty_rate(r.get("dirty_rate")),
        _num(bw / MiB if isinstance(bw, (int, float)) else None),
        _num(r.get("pause_ms"), "{:.2f}"))


def fmt_dirty_rate(v) -> str:
    """Dirty rate (bytes/s from the engine) in MiB/s."""
    return _num(v / MiB if isinstance(v, (int, float)) else None)


def summary_lines(s: dict) -> list[str]:
    out = [f"status: {s.get('status')}"
           + (f" -- {s['error']}" if s.get("error") and s.get("status") != "completed" else "")]
    for key, label in (("migration_id", "migration"), ("image_id", "image"),
                       ("digest", "digest"), ("tracker", "tracker"),
                       ("stop_reason", "pre-copy ended"), ("then", "source then")):
        if s.get(key):
            out.append(f"{label}: {s[key]}")
    figs = []
    if s.get("freeze_ms") is not None:
        figs.append(f"freeze {s['freeze_ms']:.1f} ms")
    if s.get("total_ms") is not None:
        figs.append(f"total {s['total_ms']:.0f} ms")
    if s.get("bytes_sent") is not None:
        figs.append(f"{s['bytes_sent'] / MiB:.1f} MiB sent")
    if s.get("rounds") is not None:
        figs.append(f"{len(s['rounds'])} rounds")
    if s.get("dest_wait_ms"):
        figs.append(f"waited {s['dest_wait_ms']:.0f} ms for the destination's disk")
    if figs:
        out.append(", ".join(figs))
    return out


# What `send --json` prints when there is no migration to report on (the
# daemon refused the request, or could not be reached): the documented keys,
# empty, beside status "failed" and the error -- scripts parse one shape.
NO_RESULT = {"image_id": None, "digest": None, "tracker": None, "rounds": [],
             "freeze_ms": None, "total_ms": None, "bytes_sent": 0}


def run(args) -> int:
    try:
        return _run(args)
    except MigratedError as e:
        if not args.json:
            raise
        print(f"migratectl: {e}", file=sys.stderr)
        print(json.dumps({"status": "failed", "error": str(e), "migration_id": None,
                          "pid": args.pid, "peer": args.dest, **NO_RESULT}), flush=True)
        return 1


def _run(args) -> int:
    req = build_request(args)
    client = ControlClient(args.control).connect()
    result: dict | None = None
    mid = None
    printed_header = False
    out = sys.stdout
    try:
        try:
            for msg in client.stream(req):
                if "event" in msg:
                    ev = msg["event"]
                    mid = ev.get("migration_id") or mid
                    if args.json:
                        continue
                    kind = ev.get("event")
                    if kind == "accepted":
                        print(f"migration {mid}: process {ev.get('pid')} -> {ev.get('peer')}",
                              file=out, flush=True)
                    elif kind == "round":
                        if not printed_header:
                            print(HEADER, file=out)
                            printed_header = True
                        print(round_row(ev), file=out, flush=True)
                    elif kind == "freeze":
                        print("frozen: final delta"
                              + (f" ({ev['pages']} pages)" if ev.get("pages") is not None else ""),
                              file=out, flush=True)
                else:
                    result = msg.get("result")
        except KeyboardInterrupt:
            if mid is None:
                raise
            print(f"\ncancelling migration {mid} (Ctrl-C again to leave it running)...",
                  file=sys.stderr, flush=True)
            try:
                with ControlClient(args.control) as c:
                    c.request({"op": "cancel", "id": mid})
            except ControlError as e:
                print(f"migratectl: {e}", file=sys.stderr)
            for msg in _rest(client):
                result = msg.get("result", result)
    finally:
        client.close()
    if not isinstance(result, dict):
        raise ControlError("the daemon ended the migration without a result")
    if args.json:
        print(json.dumps(result, indent=None, default=str), file=out)
    else:
        for line in summary_lines(result):
            print(line, file=out)
    return 0 if result.get("status") == "completed" else 1


def _rest(client: ControlClient):
    while True:
        msg = client.read(timeout=None)
        if "error" in msg:
            raise ControlError(str(msg["error"]))
        if "result" in msg:
            yield msg
            return
