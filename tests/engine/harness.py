"""Run a SourceMigration and a DestMigration against each other in threads."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from typing import Callable

from migrated.engine.dest import DestLimits, DestMigration
from migrated.engine.source import SendOptions, SourceMigration
from migrated.engine.transport import BlockingTransport
from tests.engine.tlspair import tcp_pair

# Upper bound for one migration in a test (they take seconds; a hang fails).
JOIN_TIMEOUT_S = 120.0


@dataclass
class Outcome:
    source: dict
    dest: dict
    events: list = field(default_factory=list)
    dest_events: list = field(default_factory=list)

    def rounds(self) -> list[dict]:
        return [e for e in self.events if e["event"] == "round"]


def migrate(pid: int, store, options: SendOptions | None = None, *,
            max_bandwidth: float | None = None, timeout: float = 30.0,
            limits: DestLimits | None = None, tcp: bool = True,
            on_source: Callable[[SourceMigration], None] | None = None,
            on_event: Callable[[SourceMigration, dict], None] | None = None,
            sockets: tuple[socket.socket, socket.socket] | None = None,
            direct_receive: bool = True, write_inline: bool | None = None,
            dest_class: type[DestMigration] = DestMigration) -> Outcome:
    """One migration of ``pid`` into ``store``; both sides in threads."""
    a, b = sockets or (tcp_pair() if tcp else socket.socketpair())
    events: list = []
    dest_events: list = []
    dres: dict = {}
    dm = dest_class(BlockingTransport(b, timeout=timeout), store, node="test-dest",
                       on_event=dest_events.append, limits=limits,
                       direct_receive=direct_receive, write_inline=write_inline)
    dt = threading.Thread(target=lambda: dres.update(dm.run()), name="test-dest")
    dt.start()
    sm: SourceMigration | None = None

    def observe(e: dict) -> None:
        events.append(e)
        if on_event is not None and sm is not None:
            on_event(sm, e)

    try:
        sm = SourceMigration(pid, options or SendOptions(),
                             BlockingTransport(a, timeout=timeout, max_bandwidth=max_bandwidth),
                             on_event=observe)
        sres: dict = {}
        st = threading.Thread(target=lambda: sres.update(sm.run()), name="test-source")
        st.start()
        if on_source is not None:
            on_source(sm)
        st.join(JOIN_TIMEOUT_S)
        assert not st.is_alive(), "source migration hung"
    finally:
        dt.join(JOIN_TIMEOUT_S)
    assert not dt.is_alive(), "destination migration hung"
    return Outcome(sres, dres, events, dest_events)


class CuttingProxy:
    """Forwards source -> dest until ``cut_after`` bytes went through, then
    closes both sides abruptly (a destination that dies mid-round).  The
    other direction is forwarded untouched.  Returns the source-side socket
    and the dest-side socket to hand to the two engines."""

    def __init__(self, cut_after: int):
        self.cut_after = cut_after
        self.src_a, self.src_b = socket.socketpair()   # source <-> proxy
        self.dst_a, self.dst_b = socket.socketpair()   # proxy <-> dest
        self.forwarded = 0
        self._threads = [threading.Thread(target=self._down, daemon=True),
                         threading.Thread(target=self._up, daemon=True)]
        for t in self._threads:
            t.start()

    def sockets(self) -> tuple[socket.socket, socket.socket]:
        return self.src_a, self.dst_b

    def _cut(self) -> None:
        for s in (self.src_b, self.dst_a):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _down(self) -> None:
        try:
            while True:
                data = self.src_b.recv(65536)
                if not data:
                    break
                left = self.cut_after - self.forwarded
                if len(data) >= left:
                    self.dst_a.sendall(data[:max(left, 0)])
                    self.forwarded += max(left, 0)
                    break
                self.dst_a.sendall(data)
                self.forwarded += len(data)
        except OSError:
            pass
        self._cut()

    def _up(self) -> None:
        try:
            while True:
                data = self.dst_a.recv(65536)
                if not data:
                    break
                self.src_b.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._cut()
        for t in self._threads:
            t.join(5)
        for s in (self.src_b, self.dst_a):
            s.close()
