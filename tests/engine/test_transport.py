"""BlockingTransport over real sockets: plain, TLS, slow readers, cancel."""

import contextlib
import os
import socket
import struct
import threading
import time

import pytest

from migrated.engine.transport import (BlockingTransport, TransportClosed,
                                       TransportError, TransportTimeout)
from tests.engine.tlspair import tcp_pair, tls_pair


@contextlib.contextmanager
def _transports(a, b, timeout: float, timeout_b: float | None = None):
    """Transports over both ends of a connected pair, closed at the end."""
    ta = BlockingTransport(a, timeout=timeout)
    tb = BlockingTransport(b, timeout=timeout if timeout_b is None else timeout_b)
    try:
        yield ta, tb
    finally:
        ta.close()
        tb.close()


def _drain(tr: BlockingTransport, n: int, out: list) -> None:
    got = bytearray()
    while len(got) < n:
        b = tr.recv(1 << 20)
        if not b:
            break
        got += b
    out.append(bytes(got))


def _parts():
    big = os.urandom(3 * 1024 * 1024 + 17)       # far above the socket buffer
    return [b"hdr", memoryview(big), b"", b"x" * 100, bytearray(b"tail")] + [b"s"] * 1500


@pytest.mark.parametrize("kind", ["tcp", "tls", "socketpair"])
def test_send_parts_arrive_in_order(kind):
    a, b = {"tcp": tcp_pair, "tls": tls_pair, "socketpair": socket.socketpair}[kind]()
    with _transports(a, b, 10) as (ta, tb):
        parts = _parts()          # > IOV_MAX parts: several sendmsg groups
        want = b"".join(bytes(p) for p in parts)
        out: list = []
        t = threading.Thread(target=_drain, args=(tb, len(want), out))
        t.start()
        ta.send(parts)
        t.join(10)
        assert out[0] == want
        assert ta.bytes_sent == len(want) and tb.bytes_received == len(want)


def test_recv_timeout_names_the_peer():
    a, b = tcp_pair()
    with _transports(a, b, 0.2) as (ta, tb):
        with pytest.raises(TransportTimeout) as ei:
            tb.recv(10)
        assert "127.0.0.1:" in str(ei.value) and ei.value.peer == tb.peer


def test_send_timeout_when_peer_stops_reading():
    a, b = socket.socketpair()
    ta = BlockingTransport(a, timeout=0.3, peer="stalled-peer")
    try:
        with pytest.raises(TransportTimeout, match="stalled-peer"):
            ta.send([b"\0" * (64 << 20)])
    finally:
        ta.close()
        b.close()


def test_shutdown_wakes_a_blocked_receiver():
    a, b = tcp_pair()
    ta, tb = BlockingTransport(a, timeout=30), BlockingTransport(b, timeout=30)
    got = []
    t = threading.Thread(target=lambda: got.append(tb.recv(10)))
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    tb.shutdown()
    t.join(5)
    assert not t.is_alive() and got == [b""]
    assert time.monotonic() - t0 < 5
    with pytest.raises(TransportClosed):
        tb.send([b"x"])
    # the peer sees EOF too
    assert ta.recv(10) == b""
    ta.close()
    tb.close()
    tb.close()     # idempotent


def test_peer_reset_is_a_transport_error():
    a, b = tcp_pair()
    ta = BlockingTransport(a, timeout=5)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    b.close()    # RST
    time.sleep(0.05)
    with pytest.raises(TransportError):
        for _ in range(100):
            ta.send([b"\0" * 65536])
    ta.close()


def _paced_send(rate: int, n: int, idle_s: float = 0.0) -> float:
    """Seconds one send of ``n`` bytes takes under a ``rate`` cap, after
    ``idle_s`` of idle link and, if given, a restart_pacing()."""
    a, b = tcp_pair()
    ta, tb = BlockingTransport(a, timeout=10, max_bandwidth=rate), BlockingTransport(b, timeout=10)
    out: list = []
    t = threading.Thread(target=_drain, args=(tb, n, out))
    t.start()
    if idle_s:
        time.sleep(idle_s)
        ta.restart_pacing()
    t0 = time.monotonic()
    ta.send([b"\1" * n])
    dt = time.monotonic() - t0
    t.join(10)
    ta.close()
    tb.close()
    assert len(out[0]) == n
    return dt


def test_max_bandwidth_paces_sends():
    # Expected ~0.5 s (minus the small initial burst); a lower bound only.
    assert _paced_send(4 * 1024 * 1024, 2 * 1024 * 1024) >= 0.4


def test_restart_pacing_drops_the_credit_saved_while_idle():
    # The source restarts pacing as each round starts: after a pause, 256 KiB
    # at 1 MiB/s then takes a quarter of a second -- the bucket, full after
    # the pause, sent its first 50 ms worth at once, and a short round read
    # above the cap.
    rate, n = 1024 * 1024, 256 * 1024
    dt = _paced_send(rate, n, idle_s=0.3)
    assert dt >= n / rate, dt


def test_shutdown_interrupts_a_paced_sender():
    a, b = tcp_pair()
    ta = BlockingTransport(a, timeout=10, max_bandwidth=64 * 1024)
    tb = BlockingTransport(b, timeout=10)
    errs = []

    def sender():
        try:
            ta.send([b"\1" * (8 << 20)])     # would take two minutes
        except TransportError as e:
            errs.append(e)

    drain = threading.Thread(target=_drain, args=(tb, 8 << 20, []), daemon=True)
    drain.start()
    t = threading.Thread(target=sender)
    t.start()
    time.sleep(0.2)
    ta.shutdown()
    t.join(5)
    assert not t.is_alive() and isinstance(errs[0], TransportClosed)
    ta.close()
    tb.close()


@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_recv_into_fills_across_records(kind):
    a, b = {"tcp": tcp_pair, "tls": tls_pair}[kind]()
    with _transports(a, b, 10) as (ta, tb):
        data = os.urandom(2 * 1024 * 1024)
        t = threading.Thread(target=ta.send, args=([data],))
        t.start()
        buf = bytearray(len(data))
        time.sleep(0.3)       # let the sender fill the socket buffers
        first = tb.recv_into(buf)
        got = first
        while got < len(data):
            n = tb.recv_into(memoryview(buf)[got:])
            assert n > 0
            got += n
        t.join(10)
        assert bytes(buf) == data and tb.bytes_received == len(data)
        # Many 16 KiB TLS records were waiting: one call takes them all.
        assert first > 64 * 1024
        ta.shutdown()
        assert tb.recv_into(bytearray(10)) == 0


@pytest.mark.parametrize("size", [1, 16 * 1024, 33 * 1024 + 5, 300 * 1024])
def test_tls_recv_into_returns_what_arrived_without_waiting_for_more(size):
    # The peer sends `size` bytes and then nothing: one read must hand back
    # all of them at once, never wait (for up to the 30 s timeout) for a
    # record that is not coming -- whatever the queued-bytes arithmetic.
    a, b = tls_pair()
    with _transports(a, b, 10, 30) as (ta, tb):
        data = os.urandom(size)
        ta.send([data])
        time.sleep(0.2)                       # everything is queued at b
        buf = bytearray(1 << 20)
        t0 = time.monotonic()
        got = tb.recv_into(buf)
        assert time.monotonic() - t0 < 2.0
        assert bytes(buf[:got]) == data       # all of it, in one call
        # ...and the stream goes on normally afterwards.
        ta.send([b"more"])
        assert tb.recv_into(buf) == 4 and bytes(buf[:4]) == b"more"


def test_tls_drain_reads_what_arrived_without_waiting(monkeypatch):
    # With 2 MiB queued, one recv_into reads record after record until a
    # read would wait: the socket is never polled on the way (a wait means
    # the data was not there, and the drain stops instead).
    waits = []
    real = BlockingTransport._wait_for
    monkeypatch.setattr(BlockingTransport, "_wait_for",
                        lambda self, ev, t: waits.append(t) or real(self, ev, t))
    a, b = tls_pair()
    with _transports(a, b, 10) as (ta, tb):
        data = os.urandom(2 * 1024 * 1024)
        t = threading.Thread(target=ta.send, args=([data],))
        t.start()
        time.sleep(0.3)
        waits.clear()
        buf = bytearray(len(data))
        got = tb.recv_into(buf)
        assert got // (16 * 1024) > 8          # many records in one call...
        assert waits == []                     # ...and no wait for any of them
        while got < len(data):
            got += tb.recv_into(memoryview(buf)[got:])
        t.join(10)
        assert bytes(buf) == data


def test_tls_reads_and_sends_from_two_threads_keep_the_stream_intact():
    # The destination's receiving thread reads pages while its backlog
    # reports and keepalives go out from other threads; the source's
    # thread sends while it also reads.  OpenSSL allows one thread at a
    # time in an SSL object: unserialised, a write racing a read corrupts
    # the read side, which then reports a spurious end of stream
    # (CPython's SSLSocket does not lock).  Here both ends read and send
    # at once, hard, for a few seconds: every byte arrives, in order.
    a, b = tls_pair()
    pattern = bytes(range(256)) * 4096                 # 1 MiB
    small = b"backlog-report-" * 3
    errors: list = []
    stop = time.monotonic() + 3.0

    def guarded(f):
        def run():
            try:
                f()
            except BaseException as e:  # noqa: BLE001 -- reported below
                errors.append(f"{f.__name__}: {e!r}")
        return run

    with _transports(a, b, 20) as (ta, tb):
        def bulk():                                    # a -> b, pages
            while time.monotonic() < stop:
                ta.send([pattern])
            ta.send([b"END."])

        def reports():                                 # b -> a, small and often
            while time.monotonic() < stop:
                tb.send([small])
                time.sleep(0.0002)
            tb.send([b"DONE"])

        def read_bulk():
            buf = bytearray(1 << 20)
            seen = 0
            while True:
                n = tb.recv_into(buf)
                assert n, f"end of stream after {seen} bytes"
                chunk = bytes(buf[:n])
                off = seen % len(pattern)
                want = (pattern[off:] + pattern * 2)[:n]
                if chunk.endswith(b"END.") and chunk[:-4] == want[:n - 4]:
                    return
                assert chunk == want, f"bytes differ after {seen}"
                seen += n

        def read_reports():
            got = b""
            while not got.endswith(b"DONE"):
                data = ta.recv(1 << 16)
                assert data, f"end of stream after {len(got)} bytes"
                got += data
            assert got[:-4] == small * ((len(got) - 4) // len(small))

        threads = [threading.Thread(target=guarded(f))
                   for f in (bulk, reports, read_bulk, read_reports)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        assert not any(t.is_alive() for t in threads)
        assert errors == []


def test_tls_sender_waiting_for_room_does_not_hold_up_the_reader():
    # The SSL object is used by one thread at a time, but a sender that
    # waits for the peer to read must not keep the reader out: two peers
    # that both write a lot and read only in another thread would
    # deadlock.  Here a sends far more than the socket holds while b reads
    # nothing; meanwhile b's message must still reach a's reader.
    a, b = tls_pair()
    with _transports(a, b, 10) as (ta, tb):
        big = os.urandom(32 * 1024 * 1024)
        sent = threading.Thread(target=lambda: ta.send([big]), daemon=True)
        sent.start()
        time.sleep(0.5)                        # a's socket is full; a waits
        assert sent.is_alive()
        tb.send([b"hello"])
        t0 = time.monotonic()
        assert ta.recv(100) == b"hello"
        assert time.monotonic() - t0 < 2.0
        got = 0                                # and the big send completes
        buf = bytearray(1 << 20)
        while got < len(big):
            n = tb.recv_into(buf)
            assert n
            got += n
        sent.join(10)
        assert not sent.is_alive()


def test_tls_drain_reads_up_to_a_ragged_eof_then_reports_the_end():
    # The peer sends some records and then closes its TCP side without a
    # TLS close_notify.  The drain (which calls the SSL object directly)
    # must hand back every byte that arrived and then report end of
    # stream, as SSLSocket does -- not a transport failure.
    a, b = tls_pair()
    with _transports(a, b, 10) as (ta, tb):
        data = os.urandom(300 * 1024)
        ta.send([data])
        socket.socket.shutdown(a, socket.SHUT_WR)   # FIN, no close_notify
        time.sleep(0.2)
        buf = bytearray(1 << 20)
        got = 0
        while True:
            n = tb.recv_into(memoryview(buf)[got:])
            if not n:
                break
            got += n
        assert bytes(buf[:got]) == data


@pytest.mark.parametrize("kind", ["tcp", "tls", "socketpair"])
def test_tcp_transports_turn_nagle_off(kind):
    # With Nagle on, a small message sent right after a page batch (FinalEnd,
    # CommitRequest) waits for the ACK of the batch's last segment, which the
    # receiver delays: bench_precopy saw the freeze take ~40 ms more in about
    # one run of three.  Any caller's socket, not only the daemon's tuned ones.
    a, b = {"tcp": tcp_pair, "tls": tls_pair, "socketpair": socket.socketpair}[kind]()
    if kind != "socketpair":
        a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    with _transports(a, b, 5) as (ta, tb):
        if kind == "socketpair":
            assert ta.sock.family == socket.AF_UNIX     # nothing to set, nothing fails
            return
        for tr in (ta, tb):
            assert tr.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# struct tcp_info (linux/tcp.h): byte offset of a u32 field.
_TCPI_DATA_SEGS_OUT = 156    # segments that carried data (not pure ACKs)


def _tcp_info(sock, offset: int) -> int:
    return struct.unpack_from("<I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256),
                              offset)[0]


def test_tls_bulk_send_is_corked_while_it_runs_and_uncorked_after():
    # A page batch over TLS is 256 records, each its own write(2); with
    # Nagle off they must not leave as 256 small segments: the transport
    # corks the socket for the batch and uncorks it at the end so the tail
    # (and the small message after it) goes out at once.
    a, b = tls_pair()
    with _transports(a, b, 10) as (ta, tb):
        data = os.urandom(8 * 1024 * 1024)     # far above both socket buffers
        sender = threading.Thread(target=ta.send, args=([b"head", data],))
        sender.start()
        deadline = time.monotonic() + 5
        while a.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0:
            assert time.monotonic() < deadline, "the socket was never corked during a bulk send"
            time.sleep(0.001)
        assert sender.is_alive()        # blocked: nobody reads yet
        out: list = []
        _drain(tb, 4 + len(data), out)
        sender.join(10)
        assert out[0] == b"head" + data
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

        # The records of a send leave together, not a segment each.  Three
        # records (48 KiB, less than one segment here) while the peer's
        # window is wide open: uncorked, with Nagle off, each record's
        # write(2) leaves at once (3 segments); corked they leave at the
        # uncork as one, or two when the kernel forces a push at half the
        # peer's largest window.  (A 4 MiB count could not tell: a reader
        # slower than the sender lets records pile up into full segments
        # either way -- 72-105 corked against 77-92 uncorked, measured.)
        data = os.urandom(3 * 2 ** 14)
        before = _tcp_info(a, _TCPI_DATA_SEGS_OUT)
        ta.send([data])
        sent = _tcp_info(a, _TCPI_DATA_SEGS_OUT) - before
        _drain(tb, len(data), out)
        assert out[1] == data
        assert sent <= 2, f"{sent} data segments for 3 TLS records"
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0


@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_last_words_stay_readable_after_a_send_failed(kind):
    # A destination that cancels says Cancel (send_now) and closes the
    # link while the source is inside a large send.  The source's send
    # fails; at once its keepalive thread, which waited for the channel
    # during that send, sends too.  Over TLS that second write used to
    # reach OpenSSL, which still held the rest of the failed record: "bad
    # length", the SSL object failed for good, and the read that looks
    # for the destination's reason got nothing although the Cancel was in
    # the socket.  The second send must fail without spoiling the read.
    a, b = {"tcp": tcp_pair, "tls": tls_pair}[kind]()
    with _transports(a, b, 10) as (ta, tb):
        failed: list = []

        def flood() -> None:
            try:
                while True:
                    ta.send([b"\0" * (1 << 20)])
            except TransportError as e:
                failed.append(e)

        sender = threading.Thread(target=flood)
        sender.start()
        assert tb.recv_into(bytearray(1 << 16))
        time.sleep(0.3)                     # b reads no more: a's send waits
        assert tb.send_now([b"last words"], 1.0)
        tb.close()                          # unread data: the peer gets a reset
        sender.join(10)
        assert not sender.is_alive() and failed
        with pytest.raises(TransportError):
            ta.send([b"keepalive"])
        assert ta.recv(100) == b"last words"
        assert ta.recv(100) == b""
