"""A hostile source: raw protocol bytes, by hand, to a real daemon.

:class:`RawPeer` connects to a daemon's peer port and lets a test send
anything -- valid messages encoded by the wire package's own encoder,
or frames crafted byte by byte (:func:`frame`, :func:`raw_msg`) that the
encoder would refuse to produce -- and then read what the daemon answers
until it closes the connection (:meth:`RawPeer.finish`).

The daemon's answers are decoded with the wire package's FrameReader, so
the test sees Welcome, Accept and, when it misbehaved, the Error (with its
code) that the daemon owes it before closing.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from dataclasses import dataclass, field

import msgpack
import numpy as np

from migrated.runs import PAGE_SIZE, PageRuns
from migrated.wire import (NEED_DATA, Accept, Error, Hello, Layout, MappingInfo, Pages,
                           SourceConnection, Start, Welcome)
from migrated.wire import limits as L
from migrated.wire.frames import FrameReader

LENGTH = struct.Struct(">I")
# Where the hostile layouts put their one anonymous mapping.
BASE = 0x7F0000000000
# How long a test waits for the daemon to answer and close by default.
ANSWER_TIMEOUT_S = 15.0


def frame(body: bytes, length: int | None = None) -> bytes:
    """A frame: 4-byte big-endian length (``length`` overrides the true
    one) + body."""
    return LENGTH.pack(len(body) if length is None else length) + body


def raw_msg(fields: dict) -> bytes:
    """A msgpack body with "type" first, whatever the fields hold."""
    ordered = {"type": fields["type"], **{k: v for k, v in fields.items() if k != "type"}}
    return msgpack.packb(ordered, use_bin_type=True)


def runs_bin(pairs: list[tuple[int, int]]) -> bytes:
    return np.array(pairs, dtype="<u8").reshape(-1, 2).tobytes()


def hello(mid: str = "hostile-1") -> Hello:
    return Hello(L.SUPPORTED_VERSIONS, "mallory", ("zeros",), mid)


def start(estimated: int = 0, pid: int = 4242) -> Start:
    return Start(pid, ("/bin/evil",), "/bin/evil", PAGE_SIZE, "digest", estimated, {})


def anon_layout(round_: int = 0, npages: int = 64, base: int = BASE) -> Layout:
    return Layout(round_, (MappingInfo(base, base + npages * PAGE_SIZE, "rw-p", 0, "", "anon"),))


def pages(round_: int, base: int, n: int, fill: int = 0x42) -> Pages:
    return Pages.build(round_, PageRuns.from_pairs([(base, n)]), bytes([fill]) * (n * PAGE_SIZE))


@dataclass
class Outcome:
    """What the daemon did with us."""
    events: list = field(default_factory=list)   # decoded messages it sent
    closed: bool = False                         # it closed (EOF or reset)
    reset: bool = False
    elapsed_s: float = 0.0                       # from finish() start to close
    lifetime_s: float = 0.0                      # from connect to close
    undecodable: str | None = None               # its bytes did not decode

    @property
    def errors(self) -> list[Error]:
        return [e for e in self.events if isinstance(e, Error)]

    @property
    def error_code(self) -> str | None:
        return self.errors[0].code if self.errors else None

    def __str__(self) -> str:
        names = [type(e).__name__ + (f"({e.code}: {e.message[:80]})" if isinstance(e, Error)
                                     else "") for e in self.events]
        return (f"events={names} closed={self.closed} reset={self.reset} "
                f"after {self.elapsed_s:.2f}s (connected {self.lifetime_s:.2f}s){' undecodable: ' + self.undecodable if self.undecodable else ''}")


class RawPeer:
    def __init__(self, host: str, port: int, *, source_addr: str | None = None,
                 timeout: float = ANSWER_TIMEOUT_S):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        if source_addr:
            self.sock.bind((source_addr, 0))
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.t_connect = time.monotonic()
        self.timeout = timeout
        self.conn = SourceConnection()        # for the valid part of the talk
        self.reader = FrameReader()
        self.events: list = []
        self.closed = False
        self.reset = False
        self.undecodable: str | None = None

    # -- sending ------------------------------------------------------------------

    def send_raw(self, data: bytes) -> bool:
        """False if the daemon had already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
            return False

    def send(self, event) -> bool:
        """A valid message, in order (the first one carries the preamble)."""
        return self.send_raw(self.conn.send(event))

    def preamble(self) -> bool:
        return self.send_raw(L.PREAMBLE)

    def half_close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- receiving ---------------------------------------------------------------------

    def _pull(self, timeout: float) -> bool:
        """One recv within ``timeout``; False on timeout."""
        if self.closed:
            return True
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return False
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data, self.reset = b"", True
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return True
        if self.undecodable is None:
            try:
                self.reader.feed(data)
                while True:
                    ev = self.reader.next_frame(L.MAX_FRAME, lambda t: None)
                    if ev is None:
                        break
                    self.events.append(ev)
            except Exception as e:  # noqa: BLE001 -- reported in the outcome
                self.undecodable = f"{type(e).__name__}: {e}"
        return True

    def expect(self, kind, timeout: float | None = None):
        """Wait for the next message of class ``kind`` from the daemon."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, ev in enumerate(self.events):
                if isinstance(ev, kind):
                    del self.events[: i + 1]
                    # keep the sans-IO source in step with what it got
                    return ev
                if isinstance(ev, Error):
                    raise AssertionError(f"daemon sent Error({ev.code}): {ev.message}")
            if self.closed:
                raise AssertionError(f"daemon closed the connection while we waited "
                                     f"for {kind.__name__}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__} within {timeout or self.timeout} s")
            self._pull(left)

    def expect_welcome(self) -> Welcome:
        welcome = self.expect(Welcome)
        self.conn.receive_data(_reencode(self.conn, welcome))
        drain(self.conn)
        return welcome

    def handshake(self, estimated: int = 0, mid: str = "hostile-1") -> Accept:
        """Hello -> Welcome, Start -> Accept, keeping our state machine in step."""
        self.send(hello(mid))
        welcome = self.expect(Welcome)
        self.conn.receive_data(_reencode(self.conn, welcome))
        drain(self.conn)
        self.send(start(estimated))
        accept = self.expect(Accept)
        self.conn.receive_data(_reencode(self.conn, accept))
        drain(self.conn)
        return accept

    def finish(self, timeout: float | None = None) -> Outcome:
        """Read until the daemon closes (or ``timeout``); what it did."""
        t0 = time.monotonic()
        deadline = t0 + (timeout or self.timeout)
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._pull(left)
        now = time.monotonic()
        out = Outcome(list(self.events), self.closed, self.reset,
                      now - t0, now - self.t_connect, self.undecodable)
        self.close()
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawPeer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reencode(conn: SourceConnection, ev) -> bytes:
    """``ev`` (decoded from the daemon's bytes) as bytes again, for our own
    SourceConnection, so that its state machine follows the conversation;
    the daemon's preamble is prepended once."""
    from migrated.wire import encode
    data = encode(ev)
    if not getattr(conn, "_got_preamble", False):
        conn._got_preamble = True         # noqa: SLF001 -- test bookkeeping
        data = L.PREAMBLE + data
    return data


def drain(conn: SourceConnection) -> list:
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)


__all__ = ["RawPeer", "Outcome", "frame", "raw_msg", "runs_bin", "hello", "start",
           "anon_layout", "pages", "BASE", "drain"]
