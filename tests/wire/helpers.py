"""Shared pieces for the wire tests: canonical events and drivers."""

from __future__ import annotations

from migrated.errors import ProtocolError
from migrated.runs import PAGE_SIZE, PageRuns
from migrated.wire import (NEED_DATA, Accept, CommitRequest, Committed,
                           ConnectionClosed, DestConnection, FinalEnd, Freeze,
                           Hello, Layout, MappingInfo, Pages, Release,
                           Released, RoundEnd, SourceConnection, Start, Welcome, encode)
from migrated.wire import limits as L

BASE = 0x7F0000000000


def pg(n: int) -> int:
    return n * PAGE_SIZE


HELLO = Hello((1,), "node-a", ("zero-pages",), "mig-1")
WELCOME = Welcome(1, "node-b", ())
START = Start(4242, ("/bin/app", "-x"), "/bin/app", PAGE_SIZE, "soft-dirty", pg(64),
              {"downtime_ms": 300})
ACCEPT = Accept(64, pg(4096))
MAPS = (MappingInfo(BASE, BASE + pg(64), "rw-p", 0, "", "anon"),
        MappingInfo(BASE + pg(64), BASE + pg(80), "r--p", 0, "/lib/x.so", "file"),
        MappingInfo(BASE + pg(100), BASE + pg(110), "rw-s", 0, "/dev/shm/r",
                    "shared-file"))
LAYOUT = Layout(0, MAPS)


def drain(conn) -> list:
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            return out


def pair():
    return SourceConnection(), DestConnection()


def deliver(sender, receiver, ev):
    receiver.receive_data(sender.send(ev))
    got = drain(receiver)
    assert got == [ev], got
    return got[0]


def streaming_pair():
    """Source and dest connections in STREAMING after Layout(0)."""
    s, d = pair()
    deliver(s, d, HELLO)
    deliver(d, s, WELCOME)
    deliver(s, d, START)
    deliver(d, s, ACCEPT)
    deliver(s, d, LAYOUT)
    return s, d


def valid_stream():
    """(peer bytes seen by a dest, dest's own sends in order) for a whole
    migration, plus the events the dest must decode."""
    s, d = pair()
    chunks, events = [], []
    script = [
        ("s", HELLO), ("d", WELCOME), ("s", START), ("d", ACCEPT), ("s", LAYOUT),
        ("s", Pages.build(0, PageRuns.from_pairs([(BASE, 3), (BASE + pg(63), 2)]),
                          bytes(range(256)) * (5 * PAGE_SIZE // 256))),
        ("s", RoundEnd(0, 5, 100, 1.0, 2.0, 3.0, 0.5)), ("s", Freeze(1)),
        ("s", Layout(1, MAPS[:2])), ("s", FinalEnd(1, 5)), ("s", CommitRequest(5)),
        ("d", Committed("img-1", "xxh3-128:ab")), ("s", Release("img-1")),
        ("d", Released("img-1"))]
    for who, ev in script:
        if who == "s":
            chunks.append(s.send(ev))
            events.append(ev)
            d.receive_data(chunks[-1])
            assert drain(d) == [ev]
        else:
            s.receive_data(d.send(ev))
            assert drain(s) == [ev]
    return script, chunks, events


__all__ = ["ProtocolError", "L", "encode"]
