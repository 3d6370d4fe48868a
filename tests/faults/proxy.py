"""A fault-injecting TCP proxy between two plaintext (--insecure) daemons.

The source daemon dials the proxy; the proxy dials the destination and
copies bytes both ways, *frame by frame*: it parses the protocol's
preamble and length-prefixed msgpack frames (protocol/SPEC.md), so a
:class:`Rule` can fire at an exact message boundary -- "before the Freeze
message reaches the destination", "before Committed reaches the source".
When a rule fires, the frame is held, the rule's action runs (kill a
daemon, fill a disk, make the target exit...), and the action's verdict
decides what the network does next:

  ``forward``  deliver the held frame and carry on (process faults)
  ``close``    FIN both ends (an orderly close by a middlebox or peer)
  ``reset``    RST both ends (SO_LINGER 0)
  ``stall``    stop reading and forwarding in both directions, sockets
               open: only timeouts can notice (a blackholed link)

A rule fires at most once.  ``Rule(on_connect=True)`` fires when the
source connects, before the proxy dials the destination.  Everything the
proxy saw is in ``proxy.trace`` as (direction, type, round) tuples.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

import msgpack

PREAMBLE_SIZE = 8
LENGTH = struct.Struct(">I")
RECV_CHUNK = 1 << 20
# Longest a stalled connection is held before the proxy resets it anyway
# (a test that forgets to release must not hang its teardown).
MAX_STALL_S = 120.0

S2D, D2S = "s2d", "d2s"
VERDICTS = ("forward", "close", "reset", "stall")


@dataclass
class Frame:
    direction: str          # S2D or D2S
    type: str
    round: int | None
    index: int              # frames seen on this connection before, both directions


@dataclass
class Rule:
    """``match(frame, history)`` picks the frame (history: earlier frames
    of the connection); ``action(frame_or_None)`` returns a verdict."""
    match: Callable[[Frame, list[Frame]], bool] | None = None
    action: Callable[[Frame | None], str] = lambda f: "close"
    on_connect: bool = False
    fired: threading.Event = field(default_factory=threading.Event)
    fired_frame: Frame | None = None
    verdict: str | None = None
    error: BaseException | None = None


def _frame_info(body: bytes) -> tuple[str, int | None]:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:   # noqa: BLE001 -- not our protocol: reported as such
        return "?", None
    if not isinstance(obj, dict):
        return "?", None
    r = obj.get("round")
    return str(obj.get("type", "?")), r if isinstance(r, int) else None


class _Conn:
    def __init__(self, proxy: "FaultProxy", client: socket.socket):
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.lock = threading.Lock()
        self.dead = False
        self.stalled = threading.Event()
        self.released = threading.Event()
        self.history: list[Frame] = []

    def abort(self, reset: bool) -> None:
        with self.lock:
            if self.dead:
                return
            self.dead = True
        for s in (self.client, self.upstream):
            if s is None:
                continue
            try:
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RD)        # wakes a reader, sends nothing
                else:
                    s.shutdown(socket.SHUT_RDWR)      # FIN
            except OSError:
                pass
        for s in (self.client, self.upstream):
            if s is not None:
                try:
                    s.close()                         # RST when lingering 0
                except OSError:
                    pass

    def stall(self) -> None:
        self.stalled.set()
        threading.Thread(target=self._stall_guard, daemon=True).start()

    def _stall_guard(self) -> None:
        self.released.wait(MAX_STALL_S)
        self.abort(reset=True)


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], listen_host: str = "127.0.0.1"):
        self.upstream = upstream
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((listen_host, 0))
        self.sock.listen(64)
        self.host, self.port = self.sock.getsockname()[:2]
        self.rule: Rule | None = None
        self.trace: list[tuple[str, str, int | None]] = []
        self.conns: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name="fault-proxy")
        self._thread.start()

    # -- control ------------------------------------------------------------------

    def arm(self, rule: Rule) -> Rule:
        with self._lock:
            self.rule = rule
            self.trace = []
        return rule

    def disarm(self) -> None:
        with self._lock:
            self.rule = None

    def release(self) -> None:
        """End every stall (the stalled connections are reset)."""
        for c in list(self.conns):
            c.released.set()
            if c.stalled.is_set():
                c.abort(reset=True)

    def reset_all(self) -> None:
        for c in list(self.conns):
            c.released.set()
            c.abort(reset=True)
        self.conns = [c for c in self.conns if not c.dead]

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.reset_all()

    # -- internals ---------------------------------------------------------------

    def _take(self, pred) -> Rule | None:
        """The armed rule if ``pred(rule)`` and it has not fired (marks it)."""
        with self._lock:
            r = self.rule
            if r is None or r.fired.is_set() or not pred(r):
                return None
            r.fired.set()
            return r

    def _run_action(self, rule: Rule, frame: Frame | None) -> str:
        rule.fired_frame = frame
        try:
            verdict = rule.action(frame)
        except BaseException as e:  # noqa: BLE001 -- reported to the test
            rule.error = e
            verdict = "reset"
        if verdict not in VERDICTS:
            rule.error = ValueError(f"bad verdict {verdict!r}")
            verdict = "reset"
        rule.verdict = verdict
        return verdict

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            conn = _Conn(self, client)
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: _Conn) -> None:
        rule = self._take(lambda r: r.on_connect)
        if rule is not None:
            verdict = self._run_action(rule, None)
            if verdict in ("close", "reset"):
                conn.abort(reset=verdict == "reset")
                return
            if verdict == "stall":
                conn.stall()
                return      # accepted, never dialled, never answered
        try:
            up = socket.create_connection(self.upstream, timeout=10)
            up.settimeout(None)
        except OSError:
            conn.abort(reset=True)
            return
        conn.upstream = up
        try:
            for s in (conn.client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            conn.abort(reset=True)      # closed meanwhile (reset_all, a dead peer)
            return
        threading.Thread(target=self._pump, args=(conn, conn.client, up, S2D), daemon=True).start()
        threading.Thread(target=self._pump, args=(conn, up, conn.client, D2S), daemon=True).start()

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket, direction: str) -> None:
        buf = bytearray()
        preamble_left = PREAMBLE_SIZE
        raw = False                       # not our protocol: copy blindly
        while True:
            if conn.stalled.is_set():
                conn.released.wait()
                return
            try:
                data = src.recv(RECV_CHUNK)
            except OSError:
                if not conn.dead:
                    conn.abort(reset=True)            # pass a reset on
                return
            if conn.dead:
                return
            if conn.stalled.is_set():
                conn.released.wait()
                return
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)      # pass the FIN on
                except OSError:
                    pass
                return
            buf += data
            out = bytearray()
            if preamble_left:
                k = min(preamble_left, len(buf))
                out += buf[:k]
                del buf[:k]
                preamble_left -= k
            while buf and not raw and not preamble_left:
                if len(buf) < LENGTH.size:
                    break
                (n,) = LENGTH.unpack_from(buf)
                if n == 0 or n > (64 << 20):
                    raw = True
                    break
                if len(buf) < LENGTH.size + n:
                    break
                typ, rnd = _frame_info(bytes(buf[LENGTH.size:LENGTH.size + n]))
                frame = Frame(direction, typ, rnd, len(conn.history))
                self.trace.append((direction, typ, rnd))
                history = list(conn.history)
                conn.history.append(frame)
                rule = self._take(lambda r: r.match is not None and r.match(frame, history))
                if rule is not None:
                    if out:
                        if not self._send(conn, dst, out):
                            return
                        out = bytearray()
                    verdict = self._run_action(rule, frame)
                    if verdict in ("close", "reset"):
                        conn.abort(reset=verdict == "reset")
                        return
                    if verdict == "stall":
                        conn.stall()
                        conn.released.wait()
                        return
                out += buf[:LENGTH.size + n]
                del buf[:LENGTH.size + n]
            if raw:
                out += buf
                buf = bytearray()
            if out and not self._send(conn, dst, out):
                return

    @staticmethod
    def _send(conn: _Conn, dst: socket.socket, data) -> bool:
        try:
            dst.sendall(data)
            return True
        except OSError:
            if not conn.dead:
                conn.abort(reset=True)
            return False
