"""`migratectl send PID HOST[:PORT]`: live-migrate a process's memory.

The daemon does the work; we follow its events and print a row per round
(round, pages, MiB, ms, dirty rate, bandwidth, pause), then the summary.
With ``--json`` only the final summary object is printed -- also when the
arguments are wrong (exit 2), the daemon refuses or cannot be reached, or
the connection to it breaks mid-migration (the id, rounds and bytes seen so
far are kept).  Exit 0 only if the migration completed.  Ctrl-C asks the daemon to cancel (the target is
thawed) and waits for the outcome; a second Ctrl-C leaves at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass, field

from migrated.cli.client import ControlClient, ControlError
from migrated.daemon.config import (DEFAULT_PORT, OPTION_INT_MAX, ConfigError, parse_hostport,
                                    parse_size)
from migrated.errors import MigratedError

MiB = 1024 * 1024
ROW = "{:>5} {:>10} {:>9} {:>8} {:>12} {:>11} {:>8}"
HEADER = ROW.format("round", "pages", "MiB", "ms", "dirty MiB/s", "MiB/s", "pause ms")



def _rate(text: str) -> float:
    try:
        rate = parse_size(text, "rate")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    # Imported here: the engine is heavy and only this option needs it.
    from migrated.engine.transport import MIN_LINK_RATE
    if rate < MIN_LINK_RATE:
        raise argparse.ArgumentTypeError(
            f"{text!r} is below the minimum of {MIN_LINK_RATE // 1024}K "
            f"({MIN_LINK_RATE} bytes/s): the destination gives up on a slower stream")
    return float(rate)


def _option_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v <= OPTION_INT_MAX:
        raise argparse.ArgumentTypeError(f"{text} is out of range: 0 to {OPTION_INT_MAX}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v < math.inf:      # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds > 0")
    return v


def _pid(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a process id (must be > 0)")
    return v


def register(sub) -> None:
    p = sub.add_parser("send", help="live-migrate a process's memory to another node",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("pid", type=_pid, metavar="PID")
    p.add_argument("dest", metavar="HOST[:PORT]", help=f"peer daemon (default port {DEFAULT_PORT})")
    p.add_argument("--downtime-ms", type=_option_int, metavar="N",
                   help="target freeze time; pre-copy ends when the rest fits (default 300)")
    p.add_argument("--max-rounds", type=_option_int, metavar="N",
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
    p.set_defaults(func=run, on_usage_error=usage_error_json)
    p.on_usage_error = usage_error_json


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
                       ("stop_reason", "pre-copy ended")):
        if s.get(key):
            out.append(f"{label}: {s[key]}")
    # --then is applied only once the image is committed: after a failure or
    # a cancel the process was thawed (or left as it was), whatever it said.
    if s.get("then") and s.get("status") == "completed":
        note = s.get("then_note")
        out.append(f"source then: {s['then']}" + (f" ({note})" if note else ""))
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


@dataclass
class Seen:
    """What the daemon told us about the migration before its result: if
    the connection breaks (the daemon died), the failure names the
    migration and carries what was done so far."""
    migration_id: str | None = None
    peer: str | None = None
    rounds: list = field(default_factory=list)
    frozen: bool = False
    image_id: str | None = None      # from the commit event

    def on_event(self, ev: dict) -> None:
        self.migration_id = ev.get("migration_id") or self.migration_id
        kind = ev.get("event")
        if kind == "accepted":
            self.peer = ev.get("peer") or self.peer
        elif kind == "round":
            self.rounds.append({k: v for k, v in ev.items()
                                if k not in ("event", "migration_id")})
        elif kind == "freeze":
            self.frozen = True
        elif kind == "commit":
            self.image_id = ev.get("image_id")

    def bytes_sent(self) -> int:
        return int(sum(r.get("bytes") or 0 for r in self.rounds
                       if isinstance(r.get("bytes"), (int, float))))

    def lost(self, e: MigratedError, pid: int) -> str:
        """The message for a connection lost while the migration ran."""
        mid = self.migration_id
        where = ("after the destination committed image " + str(self.image_id)
                 if self.image_id else "while the process was frozen for the final copy"
                 if self.frozen else f"after {len(self.rounds)} round(s)" if self.rounds
                 else "before its first round ended")
        return (f"{e}; migration {mid} (process {pid} -> {self.peer}) was cut off {where} "
                f"and its outcome is unknown. Check process {pid}: if the daemon died it may "
                f"be left stopped until the daemon restarts (its frozen-PID journal thaws it; "
                f"`migrated --thaw-journal` does it by hand); while the daemon still runs, "
                f"`migratectl status {mid}` shows the outcome")


def _wants_json(argv: list[str]) -> bool:
    """Whether ``argv`` asks for --json (argparse also takes a prefix)."""
    for a in argv:
        if a == "--":
            break
        if a == "--json" or (len(a) >= 3 and "--json".startswith(a)):
            return True
    return False


def usage_error_json(argv: list[str], message: str) -> None:
    """A bad argument of `send --json`: the one object scripts parse, on
    stdout, before argparse's usage text and exit status 2."""
    if not _wants_json(argv):
        return
    print(json.dumps({"status": "failed",
                      "error": f"{message} (see `migratectl send --help`)",
                      "migration_id": None, "pid": None, "peer": None, **NO_RESULT}),
          flush=True)


def run(args) -> int:
    seen = Seen()
    try:
        return _run(args, seen)
    except MigratedError as e:
        if seen.migration_id is not None:
            e = MigratedError(seen.lost(e, args.pid))
        if not args.json:
            raise e from None
        print(f"migratectl: {e}", file=sys.stderr)
        print(json.dumps({"status": "failed", "error": str(e),
                          "migration_id": seen.migration_id, "pid": args.pid,
                          "peer": seen.peer or args.dest,
                          **NO_RESULT, "image_id": seen.image_id, "rounds": seen.rounds,
                          "bytes_sent": seen.bytes_sent()}, default=str), flush=True)
        return 1
    except BrokenPipeError:
        # Our stdout was closed (`| head -1`); the daemon goes on without us.
        if seen.migration_id is not None:
            with contextlib.suppress(OSError):
                print(f"migratectl: output closed; migration {seen.migration_id} goes on "
                      f"in the daemon (`migratectl status {seen.migration_id}`)",
                      file=sys.stderr, flush=True)
        raise


def _run(args, seen: Seen) -> int:
    req = build_request(args)
    client = ControlClient(args.control).connect()
    result: dict | None = None
    printed_header = False
    out = sys.stdout
    try:
        try:
            for msg in client.stream(req):
                if "event" in msg:
                    ev = msg["event"]
                    seen.on_event(ev)
                    mid = seen.migration_id
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
                        n = ev.get("pending_pages")
                        print("frozen: final delta" + (f" ({n} pages)" if n is not None else ""),
                              file=out, flush=True)
                else:
                    result = msg.get("result")
        except KeyboardInterrupt:
            mid = seen.migration_id
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
        print(json.dumps(result, indent=None, default=str), file=out, flush=True)
    else:
        for line in summary_lines(result):
            print(line, file=out)
        out.flush()
    return 0 if result.get("status") == "completed" else 1


def _rest(client: ControlClient):
    while True:
        msg = client.read(timeout=None)
        if "error" in msg:
            raise ControlError(str(msg["error"]))
        if "result" in msg:
            yield msg
            return
