#!/usr/bin/env python3
"""Fuzzing campaign over the wire protocol: decoder and both state machines.

    .venv/bin/python benchmarks/fuzz_wire.py [--seconds 60] [--seed N] [--no-trace]

Four campaigns share the time budget, all seeded and reproducible:

  mutate    valid whole conversations (both directions), bytes flipped, cut,
            inserted, truncated, fed in random splits
  frames    structure-aware frames: a known "type" and random fields of
            random msgpack types and sizes, in every state of both roles
  garbage   random bytes after a valid preamble
  walk      random sequences of plausible and implausible events on a
            source/dest pair: whatever one side's send() accepts the other's
            next_event() must accept too, and both must then agree on state

Invariant everywhere: the only exception is ProtocolError.  Anything else
is a bug and is printed with its reproduction seed.  At the end it prints
examples run, error codes hit, states visited and the lines of
migrated/wire/*.py executed (sys.settrace; `coverage` is used instead if
installed and --coverage is given).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import struct
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402

from migrated.errors import ProtocolError  # noqa: E402
from migrated.runs import PAGE_SIZE, PageRuns  # noqa: E402
from migrated.wire import (NEED_DATA, Accept, Backlog, Cancel, CommitRequest,  # noqa: E402
                           Committed, ConnectionClosed, DestConnection,
                           Dropped, Error, FinalEnd, Freeze, Hello, Keepalive,
                           Layout, MappingInfo, Pages, Release, Released, Withdraw, Withdrawn,
                           Role, RoundEnd, SourceConnection, Start, State, Welcome, Zeros,
                           encode, limits)
from migrated.wire.frames import TYPE_LIMITS  # noqa: E402

WIRE_DIR = str(ROOT / "migrated" / "wire")
BASE = 0x7F0000000000


def pg(n):
    return n * PAGE_SIZE


MAPS = (MappingInfo(BASE, BASE + pg(64), "rw-p", 0, "", "anon"),
        MappingInfo(BASE + pg(64), BASE + pg(80), "r-xp", 0, "/lib/x.so", "file"),
        MappingInfo(BASE + pg(100), BASE + pg(110), "rw-s", 0, "/dev/shm/r", "shared-file"))
HELLO = Hello((1,), "node-a", ("zero-pages", "backlog"), "mig-1")
WELCOME = Welcome(1, "node-b", ("backlog",))
START = Start(4242, ("/bin/app",), "/bin/app", PAGE_SIZE, "soft-dirty", pg(64), {})
ACCEPT = Accept(32, pg(512))


class Stats:
    def __init__(self):
        self.examples = collections.Counter()
        self.codes = collections.Counter()
        self.states = collections.Counter()
        self.bugs: list[str] = []

    def protocol_error(self, e: ProtocolError):
        self.codes[e.code] += 1

    def bug(self, campaign, seed, exc):
        if len(self.bugs) < 10:
            self.bugs.append(f"[{campaign} seed={seed}] "
                             + "".join(traceback.format_exception(exc)))


def drain(conn, replies=None, got=None):
    got = [] if got is None else got
    while (ev := conn.next_event()) is not NEED_DATA:
        got.append(ev)
        if isinstance(ev, ConnectionClosed):
            break
        if replies:
            for r in replies.get(len(got) - 1, []):
                conn.send(r)
    return got


def conversation(rng: random.Random):
    """A valid script with random rounds, batches and layout changes."""
    script = [("s", HELLO), ("d", WELCOME), ("s", START), ("d", ACCEPT),
              ("s", Layout(0, MAPS))]
    rnd, total = 0, 0
    for _ in range(rng.randint(0, 3)):
        pages_in_round = 0
        for _ in range(rng.randint(0, 3)):
            start = rng.randint(0, 70)
            n = rng.randint(1, min(8, 80 - start))
            if rng.random() < 0.2:     # a batch big enough to be handed over
                start, n = 0, rng.randint(16, 32)
            runs = PageRuns.from_pairs([(BASE + pg(start), n)])
            kind = rng.random()
            if kind < 0.6:
                script.append(("s", Pages.build(rnd, runs, rng.randbytes(pg(n)))))
                pages_in_round += n
            elif kind < 0.8:
                script.append(("s", Zeros(rnd, runs)))
            else:
                script.append(("s", Dropped(rnd, runs)))
            if rng.random() < 0.2:
                script.append(("d", Keepalive(rng.getrandbits(64))))
        total += pages_in_round
        script.append(("s", RoundEnd(rnd, pages_in_round, rng.getrandbits(20),
                                     rng.random() * 100, rng.random() * 1e9,
                                     rng.random() * 1e9, rng.random())))
        if rng.random() < 0.7:      # the destination's writeback report
            script.append(("d", _backlog(rng, rnd)))
        rnd += 1
    script.append(("s", Freeze(rnd)))
    if rng.random() < 0.5:
        script.append(("s", Layout(rnd, MAPS[:2])))
    script.append(("s", FinalEnd(rnd, total)))
    if rnd and rng.random() < 0.3:  # a report crossing the end of the stream
        script.append(("d", _backlog(rng, rnd - 1)))
    script += [("s", CommitRequest(rng.getrandbits(20))),
               ("d", Committed("img-1", "xxh3-128:00")), ("s", Release("img-1")),
               ("d", Released("img-1"))]
    return script


def _backlog(rng: random.Random, rnd: int) -> Backlog:
    return Backlog(rnd, rng.getrandbits(rng.choice([0, 20, 40, 63])), rng.random() * 1e4)


def streams(script):
    """Bytes each side sends, plus the replies each side makes after the
    k-th event it receives."""
    s, d = SourceConnection(), DestConnection()
    out = {"s": [], "d": []}
    replies = {"s": {}, "d": {}}
    received = {"s": 0, "d": 0}
    for who, ev in script:
        me, other = (s, d) if who == "s" else (d, s)
        peer = "d" if who == "s" else "s"
        data = me.send(ev)
        out[who].append(data)
        other.receive_data(data)
        drain(other)
        received[peer] += 1
        replies[who].setdefault(received[who] - 1, []).append(ev)
    return b"".join(out["s"]), b"".join(out["d"]), replies


def mutate(rng: random.Random, b: bytes) -> bytes:
    b = bytearray(b)
    for _ in range(rng.randint(1, 4)):
        if not b:
            break
        pos = rng.randrange(len(b))
        op = rng.random()
        if op < 0.4:
            b[pos] ^= rng.randint(1, 255)
        elif op < 0.55:
            del b[pos:pos + rng.randint(1, 64)]
        elif op < 0.7:
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op < 0.8:
            del b[pos:]
        elif op < 0.9:  # a length prefix at a limit
            v = rng.choice([0, 1, limits.MAX_CONTROL_FRAME, limits.MAX_CONTROL_FRAME + 1,
                            limits.MAX_FRAME, limits.MAX_FRAME + 1, 2 ** 32 - 1])
            b[pos:pos + 4] = struct.pack(">I", v)
        else:
            b[pos:pos + 1] = bytes([rng.choice([0xC1, 0xC7, 0xD4, 0xDC, 0xDD, 0xDE, 0xDF,
                                                0xCF, 0xD3, 0xC0, 0xC2, 0xC3])])
    return bytes(b)


def feed(conn, data: bytes, rng: random.Random, replies, eof=True):
    got = []
    pos = 0
    for r in (replies or {}).get(-1, []):    # what this side says first (Hello)
        conn.send(r)
    # Half the time the way the engines receive: recv_into a buffer the
    # connection offers (which stops at the end of a big frame).
    in_place = rng.random() < 0.5
    while pos < len(data):
        n = rng.choice([1, 7, 100, 4096, 65536, len(data)])
        if in_place:
            buf = conn.get_buffer(n)
            n = min(len(buf), len(data) - pos)
            buf[:n] = data[pos:pos + n]
            buf.release()
            conn.buffer_updated(n)
        else:
            conn.receive_data(data[pos:pos + n])
        pos += n
        drain(conn, replies, got)
    if eof:
        conn.receive_data(b"")
        drain(conn, replies, got)
    return got


def campaign_mutate(rng, stats, seed):
    script = conversation(rng)
    src_bytes, dst_bytes, replies = streams(script)
    role = rng.choice("sd")
    conn = _dest(rng) if role == "d" else SourceConnection()
    data = src_bytes if role == "d" else dst_bytes
    if rng.random() < 0.1:
        got = feed(conn, data, rng, replies[role])  # unmutated: must all decode
        assert isinstance(got[-1], ConnectionClosed) and got[-1].clean, got[-1:]
    else:
        try:
            feed(conn, mutate(rng, data), rng, replies[role])
        except ProtocolError as e:
            stats.protocol_error(e)
    stats.states[conn.state.value] += 1


def reach(role: Role, n: int):
    """A connection of ``role`` after the first ``n`` happy-path messages."""
    path = [(Role.SOURCE, HELLO), (Role.DEST, WELCOME), (Role.SOURCE, START),
            (Role.DEST, ACCEPT), (Role.SOURCE, Layout(0, MAPS)),
            (Role.SOURCE, Freeze(0)), (Role.SOURCE, FinalEnd(0, 0)),
            (Role.SOURCE, CommitRequest(0)), (Role.DEST, Committed("img-1", "d")),
            (Role.SOURCE, Release("img-1"))]
    conn = SourceConnection() if role is Role.SOURCE else DestConnection()
    peer_started = False
    for sender, ev in path[:n]:
        if sender is role:
            conn.send(ev)
        else:
            conn.receive_data((b"" if peer_started else limits.PREAMBLE) + encode(ev))
            peer_started = True
            conn.next_event()
    return conn, peer_started


def rand_value(rng, depth=0):
    r = rng.random()
    if r < 0.25:
        return rng.choice([0, 1, -1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 52, 2 ** 56,
                           2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, -(2 ** 63), limits.PID_MAX_LIMIT,
                           limits.PID_MAX_LIMIT + 1, 1024, 1025, 4096, 65536, BASE])
    if r < 0.35:
        return rng.choice([True, False, None, 0.5, float("nan"), float("inf"), -0.0, 1e300])
    if r < 0.5:
        return rng.choice(["", "a", "x" * 64, "x" * 65, "../etc", "a b", "\x00", "é" * 40,
                           "x" * 256, "soft-dirty", "mig-1"])
    if r < 0.75:
        n = rng.choice([0, 1, 8, 15, 16, 17, 32, 4095, 4096, 4097])
        if rng.random() < 0.5 and n % 16 == 0 and n:
            return b"".join(struct.pack("<QQ", BASE + pg(rng.randint(0, 120)),
                                        rng.choice([0, 1, 2, 2 ** 44, 2 ** 64 - 1]))
                            for _ in range(n // 16))
        return rng.randbytes(n)
    if depth < 2 and r < 0.9:
        return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 2:
        return {rng.choice(["a", "b", "seq", "round"]): rand_value(rng, depth + 1)
                for _ in range(rng.randint(0, 2))}
    return rng.randint(-5, 5)


FIELDS = sorted({"versions", "node", "capabilities", "migration_id", "version", "pid",
                 "cmdline", "exe", "page_size", "tracker", "estimated_bytes", "options",
                 "max_batch_pages", "quota_bytes", "round", "starts", "ends", "offsets",
                 "perms", "kinds", "flags", "path_ends", "paths", "runs", "digest",
                 "data", "pages", "bytes", "duration_ms", "dirty_rate", "bandwidth",
                 "pause_ms", "total_pages", "image_id", "code", "message", "reason",
                 "seq", "unflushed", "flush_ms", "bogus"})


def campaign_frames(rng, stats, seed):
    role = rng.choice([Role.SOURCE, Role.DEST])
    conn, started = reach(role, rng.randint(0, 10))
    tname = rng.choice(sorted(TYPE_LIMITS) + ["nonsense"])
    d = {"type": tname}
    for f in rng.sample(FIELDS, rng.randint(0, 8)):
        d[f] = rand_value(rng)
    try:
        body = msgpack.packb(d, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    frame = struct.pack(">I", len(body)) + body
    data = (b"" if started else limits.PREAMBLE) + frame
    try:
        feed(conn, data, rng, None, eof=rng.random() < 0.3)
    except ProtocolError as e:
        stats.protocol_error(e)
    stats.states[conn.state.value] += 1


def _dest(rng):
    """A destination in one of the receive modes: copies (the default),
    borrowed page data, or big batches handed over (the engine's)."""
    mode = rng.randrange(3)
    return DestConnection(borrow_pages=mode >= 1, hand_over_pages=mode == 2)


def campaign_garbage(rng, stats, seed):
    conn = _dest(rng) if rng.random() < 0.5 else SourceConnection()
    junk = rng.randbytes(rng.randint(0, 400))
    if rng.random() < 0.5:
        junk = struct.pack(">I", len(junk)) + junk
    try:
        feed(conn, limits.PREAMBLE + junk if rng.random() < 0.9 else junk, rng, None)
    except ProtocolError as e:
        stats.protocol_error(e)
    stats.states[conn.state.value] += 1


def plausible_event(rng, conn):
    """An event that is sometimes right for ``conn``'s state, often not."""
    rnd = conn.round + (0 if rng.random() < 0.8 else rng.choice([-1, 1, 5]))
    rnd = max(rnd, 0)
    start = rng.randint(0, 115)
    n = rng.randint(1, 40)
    runs = PageRuns.from_pairs([(BASE + pg(start), n)])
    choices = [
        lambda: HELLO, lambda: WELCOME, lambda: START, lambda: ACCEPT,
        lambda: Layout(rnd, MAPS if rng.random() < 0.7 else MAPS[:1]),
        lambda: Pages.build(rnd, runs, rng.randbytes(pg(n))),
        lambda: Zeros(rnd, runs), lambda: Dropped(rnd, runs),
        lambda: RoundEnd(rnd, conn.round_pages if rng.random() < 0.8 else 3, 0, 0, 0, 0, 0),
        lambda: Freeze(rnd), lambda: FinalEnd(rnd, conn.total_pages),
        lambda: CommitRequest(conn.total_pages), lambda: Committed("img", "d"),
        lambda: Release(_prepared(conn) if rng.random() < 0.8 else "img-x"),
        lambda: Released(_prepared(conn) if rng.random() < 0.8 else "img-x"),
        lambda: Withdraw(_withdrawing(conn) if rng.random() < 0.8 else "img-x"),
        lambda: Withdrawn(_withdrawing(conn) if rng.random() < 0.8 else "img-x",
                          rng.choice(["removed", "absent"])),
        lambda: Error(rng.choice(["internal", "busy", "nope"]), "x"),
        lambda: Cancel("x"), lambda: Keepalive(rng.getrandbits(64)),
        lambda: _backlog(rng, max(conn.round - (1 if rng.random() < 0.8 else 0), 0)),
    ]
    return rng.choice(choices)()


def _prepared(conn) -> str:
    """The image id Committed named on ``conn`` (what Release must name)."""
    return conn.committed.image_id if conn.committed is not None else "img"


def _withdrawing(conn) -> str:
    """The image id a Withdraw on ``conn`` named (what Withdrawn must name)."""
    return conn.withdraw.image_id if conn.withdraw is not None else "img-w"


NEXT = {State.IDLE: ("s", lambda c, rng: HELLO), State.HELLO_SENT: ("d", lambda c, rng: WELCOME),
        # One conversation in eight resolves a migration in doubt instead.
        State.WELCOMED: ("s", lambda c, rng: START if rng.random() < 0.875 else Withdraw("img-w")),
        State.WITHDRAW_SENT: ("d", lambda c, rng: Withdrawn(_withdrawing(c), "absent")), State.START_SENT: ("d", lambda c, rng: ACCEPT),
        State.FINAL_SENT: ("s", lambda c, rng: CommitRequest(c.total_pages)),
        State.COMMIT_SENT: ("d", lambda c, rng: Committed("img-2", "d")),
        State.COMMITTED: ("s", lambda c, rng: Release(_prepared(c))),
        State.RELEASE_SENT: ("d", lambda c, rng: Released(_prepared(c)))}


def campaign_walk(rng, stats, seed):
    s, d = SourceConnection(), DestConnection()
    for _ in range(rng.randint(1, 60)):
        step = NEXT.get(s.state)
        if step is not None and rng.random() < 0.7:  # mostly move forward
            sender, receiver = (s, d) if step[0] == "s" else (d, s)
            ev = step[1](s, rng)
        else:
            sender, receiver = (s, d) if rng.random() < 0.8 else (d, s)
            ev = plausible_event(rng, sender)
        if sender.state in (State.CLOSED, State.ERROR):
            break
        try:
            data = sender.send(ev)
        except ProtocolError as e:
            stats.protocol_error(e)
            continue
        # Whatever one side sends, the other must take, and they agree.
        receiver.receive_data(data)
        got = receiver.next_event()
        assert got == ev, (got, ev)
        assert s.state is d.state, (s.state, d.state)
        stats.states[s.state.value] += 1


CAMPAIGNS = {"mutate": campaign_mutate, "frames": campaign_frames,
             "garbage": campaign_garbage, "walk": campaign_walk}


def executable_lines() -> dict[str, set[int]]:
    out = {}
    for p in Path(WIRE_DIR).glob("*.py"):
        if p.name == "jsonform.py":  # test-vector helper, not protocol code
            continue
        code = compile(p.read_text(), str(p), "exec")
        lines, stack = set(), [code]
        while stack:
            c = stack.pop()
            if c.co_flags & 0x2:  # CO_NEWLOCALS: a function body, not import-time code
                lines.update(ln for _, _, ln in c.co_lines()
                             if ln and ln != c.co_firstlineno)
            stack.extend(k for k in c.co_consts if hasattr(k, "co_lines"))
        out[str(p)] = lines
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--no-trace", action="store_true", help="skip line coverage")
    ap.add_argument("--coverage", action="store_true",
                    help="use the coverage package (if installed) instead of settrace")
    args = ap.parse_args()
    seed0 = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    stats = Stats()
    hit: dict[str, set[int]] = collections.defaultdict(set)
    cov = None
    if args.coverage:
        try:
            import coverage
            cov = coverage.Coverage(include=[WIRE_DIR + "/*"], branch=True)
            cov.start()
        except ImportError:
            print("coverage is not installed; falling back to sys.settrace")
    if cov is None and not args.no_trace:
        def tracer(frame, event, arg):
            fn = frame.f_code.co_filename
            if not fn.startswith(WIRE_DIR):
                return None

            def local(frame, event, arg):
                if event == "line":
                    hit[fn].add(frame.f_lineno)
                return local
            hit[fn].add(frame.f_lineno)
            return local
        sys.settrace(tracer)
    t0 = time.monotonic()
    i = 0
    names = list(CAMPAIGNS)
    try:
        while time.monotonic() - t0 < args.seconds:
            name = names[i % len(names)]
            seed = seed0 + i
            i += 1
            rng = random.Random(seed)
            try:
                CAMPAIGNS[name](rng, stats, seed)
            except ProtocolError as e:  # raised where the campaign did not expect
                stats.protocol_error(e)
            except Exception as e:  # noqa: BLE001 - every other exception is a bug
                stats.bug(name, seed, e)
            stats.examples[name] += 1
    finally:
        sys.settrace(None)
        if cov is not None:
            cov.stop()
    elapsed = time.monotonic() - t0
    total = sum(stats.examples.values())
    print(f"fuzz_wire: seed {seed0}, {elapsed:.0f} s, {total} examples "
          f"({total / elapsed:.0f}/s)")
    for name in names:
        print(f"  {name:8s} {stats.examples[name]:8d} examples")
    print(f"error codes hit ({len(stats.codes)}): "
          + ", ".join(f"{c}={n}" for c, n in stats.codes.most_common()))
    print(f"final states seen ({len(stats.states)}/{len(State)}): "
          + ", ".join(f"{s}={n}" for s, n in stats.states.most_common()))
    if cov is not None:
        print("line/branch coverage of migrated/wire (coverage package):")
        cov.report(show_missing=False)
    elif not args.no_trace:
        exe = executable_lines()
        tot_hit = tot = 0
        for fn in sorted(exe):
            h = len(hit.get(fn, set()) & exe[fn])
            tot_hit += h
            tot += len(exe[fn])
            print(f"  {Path(fn).name:14s} {h:4d}/{len(exe[fn]):4d} lines")
        print(f"function-body lines of migrated/wire executed: {tot_hit}/{tot} "
              f"({100 * tot_hit / tot:.0f}%)")
    if stats.bugs:
        print(f"\n{len(stats.bugs)} NON-ProtocolError FAILURES (bugs):")
        for b in stats.bugs:
            print(b)
        sys.exit(1)
    print("no exception other than ProtocolError")


if __name__ == "__main__":
    main()
