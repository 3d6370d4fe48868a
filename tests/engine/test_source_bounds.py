"""The source against a destination that floods keepalives (legal in every
state, and needing no answer): no wait of the source may last longer than
its bound while they keep coming -- not the commit wait with the target
frozen, not the checks between read buffers, not a withdrawal."""

from __future__ import annotations

import socket
import threading
import time

from migrated.engine import source as S
from migrated.engine.source import SendOptions, SourceMigration
from migrated.engine.transport import BlockingTransport, TransportTimeout
from migrated.engine.withdraw import request_withdraw
from migrated.wire import events as E
from migrated.wire import limits as L
from migrated.wire.connection import NEED_DATA, DestConnection
from migrated.wire.frames import encode
from tests.engine.procs import workload

FLOOD_S = 20.0          # how long the destination floods (far past every bound)


def _pair():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    a = socket.create_connection(ls.getsockname())
    b, _ = ls.accept()
    ls.close()
    return a, b


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


class FloodingDest:
    """Handshakes, reads and discards what the source sends, and floods
    keepalives from the moment ``flood_on`` names (Start or CommitRequest)
    for FLOOD_S -- never a Committed."""

    def __init__(self, sock: socket.socket, flood_on: type):
        self.sock, self.flood_on = sock, flood_on
        self.stop = threading.Event()
        self.flooding = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _flood(self) -> None:
        c = DestConnection()
        c.send(E.Keepalive(0))       # past the preamble
        blob = b"".join(c.send(E.Keepalive(i)) for i in range(1, 20000))
        self.flooding.set()
        end = time.monotonic() + FLOOD_S
        try:
            while time.monotonic() < end and not self.stop.is_set():
                self.sock.sendall(blob)
        except OSError:
            pass

    def _run(self) -> None:
        conn = DestConnection()
        self.sock.settimeout(30)
        try:
            while not self.stop.is_set():
                data = self.sock.recv(1 << 20)
                conn.receive_data(data)
                if not data:
                    return
                while (ev := conn.next_event()) is not NEED_DATA:
                    if isinstance(ev, E.Hello):
                        self.sock.sendall(conn.send(E.Welcome(1, "flood", ("zeros",))))
                    elif isinstance(ev, E.Start):
                        self.sock.sendall(conn.send(E.Accept(1024, 1 << 40)))
                    if isinstance(ev, self.flood_on) and not self.flooding.is_set():
                        threading.Thread(target=self._flood, daemon=True).start()
        except Exception:  # noqa: BLE001 -- the test looks at the source
            return


def _run_source(pid: int, sock, opts: SendOptions, limit_s: float):
    sm = SourceMigration(pid, opts, BlockingTransport(sock, timeout=2.0), on_event=lambda e: None)
    res: dict = {}
    t0 = time.monotonic()
    t = threading.Thread(target=lambda: res.update(sm.run()), daemon=True)
    t.start()
    t.join(limit_s)
    return res, time.monotonic() - t0, t.is_alive()


def test_a_flood_instead_of_committed_cannot_keep_the_target_frozen(monkeypatch):
    monkeypatch.setattr(L, "COMMIT_TIMEOUT_S", 1.5)
    a, b = _pair()
    with workload(mib=16) as w:
        dest = FloodingDest(b, E.CommitRequest)
        try:
            res, took, alive = _run_source(w.pid, a, SendOptions(max_rounds=0, then="stop"), 15)
            assert dest.flooding.is_set()
            assert not alive, "the source was still waiting, the target frozen, under the flood"
            assert took < 1.5 + 2.0 + S.PAST_DEADLINE_DRAIN_S + 5
            assert res["status"] == "failed" and "commit acknowledgement" in res["error"]
            assert _state(w.pid) != "T"
        finally:
            dest.stop.set()
            b.close()


def test_a_flood_while_pages_stream_cannot_hold_the_source_past_its_timeout(monkeypatch):
    """Between read buffers the source reads what the destination sent: a
    flood of keepalives held it there, sending nothing, past its timeout.
    (The commit wait is bounded by COMMIT_TIMEOUT_S, keepalives or not.)"""
    monkeypatch.setattr(L, "COMMIT_TIMEOUT_S", 1.5)
    a, b = _pair()
    with workload(mib=128, rate=0) as w:
        dest = FloodingDest(b, E.Start)
        try:
            res, took, alive = _run_source(
                w.pid, a, SendOptions(downtime_ms=300, timeout_s=3), 15)
            assert dest.flooding.is_set()
            assert not alive, "the source was stuck reading keepalives past its timeout"
            assert took < 3 + 1.5 + 2.0 + S.PAST_DEADLINE_DRAIN_S + 5
            assert res["status"] == "failed"
            assert _state(w.pid) != "T"
        finally:
            dest.stop.set()
            b.close()


def test_keepalives_do_not_restart_the_withdrawal_wait():
    """A destination that answers Welcome and then only ever sends a
    keepalive now and then: the withdrawal gives up within its timeout (and
    the in-doubt resolver can retry) instead of waiting for ever."""
    a, b = _pair()
    stop = threading.Event()

    def dest():
        conn = DestConnection()
        b.settimeout(10)
        welcomed = False
        while not welcomed:
            conn.receive_data(b.recv(65536))
            while (ev := conn.next_event()) is not NEED_DATA:
                if isinstance(ev, E.Hello):
                    b.sendall(conn.send(E.Welcome(1, "slow", ())))
                    welcomed = True
        i = 0
        while not stop.is_set():
            time.sleep(0.3)
            try:
                b.sendall(conn.send(E.Keepalive(i)))
            except OSError:
                return
            i += 1

    threading.Thread(target=dest, daemon=True).start()
    out: dict = {}

    def withdraw():
        try:
            out["result"] = request_withdraw(BlockingTransport(a, timeout=2.0), node="src",
                                             migration_id="m1", image_id="img1", timeout=2.0)
        except Exception as e:  # noqa: BLE001 -- looked at below
            out["error"] = e

    t0 = time.monotonic()
    try:
        t = threading.Thread(target=withdraw, daemon=True)
        t.start()
        t.join(2.0 + 5)
        assert not t.is_alive(), "the withdrawal was still waiting, kept alive by keepalives"
        assert isinstance(out.get("error"), TransportTimeout), out
        assert "withdrawal" in str(out["error"])
        assert time.monotonic() - t0 < 2.0 + 3
    finally:
        stop.set()
        b.close()
        a.close()


def test_an_error_code_the_source_does_not_know_counts_as_internal():
    # SPEC.md 13: a receiver treats an unknown code as "internal" and keeps
    # the peer's own code in what it tells a human.
    a, b = _pair()

    def dest() -> None:
        conn = DestConnection()
        b.settimeout(30)
        try:
            while data := b.recv(1 << 20):
                conn.receive_data(data)
                while (ev := conn.next_event()) is not NEED_DATA:
                    if isinstance(ev, E.Hello):
                        b.sendall(conn.send(E.Welcome(1, "odd", ())))
                    elif isinstance(ev, E.Start):
                        # (our own state machine would not send an unknown code)
                        b.sendall(encode(E.Error("made-up-code", "no such thing")))
                        return
        except Exception:  # noqa: BLE001 -- the test looks at the source
            return

    threading.Thread(target=dest, daemon=True).start()
    with workload(mib=4) as w:
        res, _, alive = _run_source(w.pid, a, SendOptions(then="resume"), 20)
        assert not alive
        assert res["status"] == "failed" and res["error_code"] == "internal", res
        assert "made-up-code" in res["error"]
        assert _state(w.pid) != "T"
    b.close()
