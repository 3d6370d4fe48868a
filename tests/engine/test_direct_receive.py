"""The destination's direct receive: big page batches go from the socket
into the image file by splice(2), their digest taken from the file.

Sans-IO first (a DestConnection with ``direct_pages`` fed the way the
Channel feeds it: get_buffer / buffer_updated, with short reads), then the
transport's splice_into over real sockets, then whole migrations."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import threading
import time

import pytest
import xxhash

from migrated.engine.transport import (BlockingTransport, PeerClosed, TransportClosed,
                                       TransportTimeout)
from migrated.errors import ProtocolError
from migrated.runs import PAGE_SIZE, PageRuns
from migrated.wire import (NEED_DATA, Accept, DestConnection, Layout, MappingInfo, Pages,
                           RoundEnd, SourceConnection, Zeros)
from migrated.wire import events as E
from migrated.wire import limits as L
from migrated.wire.connection import LocalProtocolError
from migrated.wire.frames import FrameReader, encode
from tests.engine.tlspair import tcp_pair, tls_pair
from tests.wire.helpers import BASE, HELLO, START, WELCOME, pg

DIRECT = 256 * 1024
ACCEPT = Accept(L.MAX_BATCH_PAGES, pg(1 << 20))
LAYOUT = Layout(0, (MappingInfo(BASE, BASE + pg(4096), "rw-p", 0, "", "anon"),))


def _streaming(**kw) -> tuple[DestConnection, SourceConnection]:
    s, d = SourceConnection(), DestConnection(**kw)
    for ev, (snd, rcv) in ((HELLO, (s, d)), (WELCOME, (d, s)), (START, (s, d)),
                           (ACCEPT, (d, s)), (LAYOUT, (s, d))):
        rcv.receive_data(snd.send(ev))
        assert rcv.next_event() == ev
    return d, s


def _pages(n: int, first: int = 0, seed: int = 1) -> Pages:
    data = random.Random(seed).randbytes(pg(n))
    return Pages.build(0, PageRuns.from_pairs([(BASE + pg(first), n)]), data)


class _Stream:
    """Bytes "in a socket": read by the connection's get_buffer in short
    reads, or taken by the test the way splice_into would."""

    def __init__(self, data: bytes, rng: random.Random | None = None):
        self.data, self.pos, self.rng = data, 0, rng

    def pull(self, conn) -> bool:
        if self.pos >= len(self.data):
            return False
        buf = conn.get_buffer(8 << 20)
        n = min(len(buf), len(self.data) - self.pos)
        if self.rng is not None:
            n = self.rng.randint(1, n)
        buf[:n] = self.data[self.pos:self.pos + n]
        buf.release()
        self.pos += n
        conn.buffer_updated(n)
        return True

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        assert len(out) == n, "the stream ended inside deferred data"
        self.pos += n
        return out


def _receive_all(conn, stream: _Stream) -> list:
    """Every event, deferred data completed from the stream; Pages events
    come back with their data as bytes either way."""
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            if not stream.pull(conn):
                return out
            continue
        if isinstance(ev, Pages) and isinstance(ev.data, E.DeferredData):
            d = ev.data
            assert len(d.prefix) <= FrameReader.DIRECT_HEAD_READ
            rest = stream.take(d.nbytes - len(d.prefix))
            data = d.prefix + rest
            conn.deferred_done(xxhash.xxh3_128_digest(data))
            ev = Pages(ev.round, ev.runs, data, ev.digest)
            out.append(("deferred", ev))
            continue
        if isinstance(ev, Pages):
            ev = Pages(ev.round, ev.runs, bytes(ev.data), ev.digest)
        out.append(("whole", ev))


def _mixed_stream() -> tuple[list, bytes]:
    evs = [_pages(1024, 0, seed=1), Zeros(0, PageRuns.from_pairs([(BASE + pg(1024), 3)])),
           _pages(8, 1100, seed=2), _pages(300, 1200, seed=3), _pages(64, 1600, seed=4),
           _pages(1000, 2000, seed=5), RoundEnd(0, 1024 + 8 + 300 + 64 + 1000, 0, 0.0, 0.0, 0.0, 0.0)]
    return evs, b"".join(encode(e) for e in evs)


def test_big_batches_come_as_a_head_with_deferred_data_and_the_rest_as_usual():
    d, _ = _streaming(borrow_pages=True, direct_pages=DIRECT)
    evs, raw = _mixed_stream()
    got = _receive_all(d, _Stream(raw))
    assert [e for _, e in got] == evs
    # 4 MiB, 1.2 MiB and 3.9 MiB batches are deferred; 32 KiB and 256 KiB not.
    assert [how for how, e in got if isinstance(e, Pages)] == \
        ["deferred", "whole", "deferred", "whole", "deferred"]
    assert d.round == 1 and d.total_pages == 1024 + 8 + 300 + 64 + 1000


@pytest.mark.parametrize("seed", range(6))
def test_any_split_of_the_stream_gives_the_same_events(seed):
    evs, raw = _mixed_stream()
    d, _ = _streaming(borrow_pages=True, hand_over_pages=True, direct_pages=DIRECT)
    got = _receive_all(d, _Stream(raw, random.Random(seed)))
    assert [e for _, e in got] == evs


def test_nothing_may_be_asked_before_the_deferred_data_is_done():
    d, _ = _streaming(direct_pages=DIRECT)
    st = _Stream(encode(_pages(1024)) + encode(_pages(2, 2000)))
    st.pull(d)
    ev = d.next_event()
    assert isinstance(ev.data, E.DeferredData)
    with pytest.raises(LocalProtocolError):
        d.next_event()
    with pytest.raises(RuntimeError):
        d.get_buffer(1024)
    assert d.total_pages == 0                 # not counted before its digest
    d.deferred_done(xxhash.xxh3_128_digest(ev.data.prefix + st.take(ev.data.nbytes
                                                                     - len(ev.data.prefix))))
    assert d.total_pages == 1024
    assert [e for _, e in _receive_all(d, st)] == [_pages(2, 2000)]


def test_a_wrong_digest_of_deferred_data_is_the_peers_protocol_error():
    d, _ = _streaming(direct_pages=DIRECT)
    st = _Stream(encode(_pages(1024)))
    st.pull(d)
    ev = d.next_event()
    data = bytearray(ev.data.prefix + st.take(ev.data.nbytes - len(ev.data.prefix)))
    data[-1] ^= 1
    with pytest.raises(ProtocolError) as ei:
        d.deferred_done(xxhash.xxh3_128_digest(data))
    assert ei.value.code == "digest" and "0x" in ei.value.message
    assert d.total_pages == 0
    with pytest.raises(ProtocolError):        # the connection is in ERROR
        d.next_event()


def test_a_batch_outside_the_layout_is_refused_from_its_head_alone():
    # LAYOUT covers 4096 pages from BASE; this batch runs past its end.
    d, _ = _streaming(direct_pages=DIRECT)
    ev = _pages(1024, 4000)
    head = encode(ev)[:FrameReader.DIRECT_HEAD_READ]
    st = _Stream(head)
    st.pull(d)
    with pytest.raises(ProtocolError) as ei:
        d.next_event()
    assert ei.value.code == "bad-pages"


def _offered(conn) -> int:
    buf = conn.get_buffer(8 << 20)
    n = len(buf)
    buf.release()
    return n


def _data_first(ev: Pages) -> bytes:
    import msgpack
    w = ev.to_wire()
    body = msgpack.packb({"type": "pages", "data": bytes(ev.data), "round": 0,
                          "runs": w["runs"], "digest": w["digest"]}, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def test_reads_stay_small_between_frames_and_until_a_head_is_known():
    plain, _ = _streaming()
    assert _offered(plain) == 8 << 20
    d, _ = _streaming(direct_pages=DIRECT)
    assert _offered(d) == FrameReader.DIRECT_HEAD_READ
    # A big frame that cannot be deferred (its data comes first): once that
    # is known, the rest of the frame is read in place as usual.
    raw = _data_first(_pages(1024))
    st = _Stream(raw[:100])
    st.pull(d)
    assert d.next_event() is NEED_DATA
    assert _offered(d) == len(raw) - 100


def test_a_batch_whose_data_is_not_last_is_received_whole():
    ev = _pages(1024)
    d, _ = _streaming(borrow_pages=True, direct_pages=DIRECT)
    assert _receive_all(d, _Stream(_data_first(ev))) == [("whole", ev)]


# -- splice_into over real sockets ----------------------------------------------------

@contextlib.contextmanager
def _spliceable(tmp_path, kind: str = "tcp", timeout_a: float = 5, timeout_b: float = 5):
    """Transports over a connected pair and a file to splice into; all
    closed at the end."""
    a, b = tcp_pair() if kind == "tcp" else socket.socketpair()
    ta, tb = BlockingTransport(a, timeout=timeout_a), BlockingTransport(b, timeout=timeout_b)
    fd = os.open(tmp_path / "pages.img", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield ta, tb, fd
    finally:
        os.close(fd)
        ta.close()
        tb.close()


@pytest.mark.parametrize("kind", ["tcp", "socketpair"])
def test_splice_into_puts_the_bytes_at_their_offsets(tmp_path, kind):
    with _spliceable(tmp_path, kind, 10, 10) as (ta, tb, fd):
        assert tb.can_splice
        blob = os.urandom(5 * 1024 * 1024 + 4096)
        t = threading.Thread(target=ta.send, args=([blob],))
        t.start()
        tb.splice_into(fd, 8 << 20, 3 << 20)           # more than the pipe holds
        tb.splice_into(fd, 1 << 20, len(blob) - (3 << 20))
        t.join(10)
        assert os.pread(fd, 3 << 20, 8 << 20) == blob[:3 << 20]
        assert os.pread(fd, len(blob) - (3 << 20), 1 << 20) == blob[3 << 20:]
        assert tb.bytes_received == len(blob)


def test_tls_sockets_cannot_splice():
    a, b = tls_pair()
    ta, tb = BlockingTransport(a, timeout=5), BlockingTransport(b, timeout=5)
    try:
        assert not ta.can_splice and not tb.can_splice
    finally:
        ta.close()
        tb.close()


def test_splice_into_times_out_on_a_silent_peer_and_names_it(tmp_path):
    with _spliceable(tmp_path, timeout_b=0.3) as (ta, tb, fd):
        ta.send([b"x" * 1000])
        t0 = time.monotonic()
        with pytest.raises(TransportTimeout) as ei:
            tb.splice_into(fd, 0, 1 << 20)
        assert 0.25 < time.monotonic() - t0 < 5
        assert "127.0.0.1:" in str(ei.value)
        assert os.pread(fd, 1000, 0) == b"x" * 1000


def test_splice_into_reports_a_peer_that_closes_inside_the_data(tmp_path):
    with _spliceable(tmp_path) as (ta, tb, fd):
        ta.send([b"y" * 5000])
        socket.socket.shutdown(ta.sock, socket.SHUT_WR)
        with pytest.raises(PeerClosed, match="inside a page batch"):
            tb.splice_into(fd, 0, 1 << 20)


def test_shutdown_wakes_a_thread_blocked_in_splice_into(tmp_path):
    got: list = []
    with _spliceable(tmp_path, timeout_a=30, timeout_b=30) as (ta, tb, fd):

        def recv() -> None:
            try:
                tb.splice_into(fd, 0, 1 << 20)
            except BaseException as e:   # noqa: BLE001 -- inspected below
                got.append(e)

        t = threading.Thread(target=recv)
        t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        tb.close()                    # from another thread, as a cancel does
        t.join(5)
        assert not t.is_alive() and time.monotonic() - t0 < 2
        assert isinstance(got[0], TransportClosed)


# -- whole migrations -----------------------------------------------------------------

@pytest.mark.parametrize("link,direct", [("tcp", True), ("socketpair", True),
                                         ("tcp", False), ("tls", True)])
def test_a_steady_writer_is_copied_exactly_whichever_way_pages_are_received(
        tmp_path, link, direct):
    from migrated.engine.source import SendOptions
    from migrated.image.store import ImageStore
    from tests.engine.harness import migrate
    from tests.engine.imagecheck import compare
    from tests.engine.procs import workload
    store = ImageStore(str(tmp_path / "state"))
    pair = {"tcp": tcp_pair, "socketpair": socket.socketpair, "tls": tls_pair}[link]()
    with workload(mib=32, rate=20000, zero_mib=1) as w:
        out = migrate(w.pid, store, SendOptions(then="stop"), sockets=pair,
                      direct_receive=direct)
        s, d = out.source, out.dest
        assert s["status"] == "completed", s.get("error")
        assert d["status"] == "completed", d.get("error")
        compare(store, s["image_id"], w.pid)          # page for page, frozen source
        assert store.verify(s["image_id"]).ok
        assert len(s["rounds"]) >= 2 and s["rounds"][-1]["pages"] > 0
        commit = [e for e in out.dest_events if e["event"] == "commit"][0]
        if direct and link != "tls":
            # round 0's 4 MiB batches (at least) went socket -> file
            assert commit["direct_bytes"] >= 24 << 20
        else:
            assert commit["direct_bytes"] == 0
        os.kill(w.pid, signal.SIGCONT)
    assert not os.listdir(store.partial_dir)


def test_a_disk_that_fills_under_a_direct_batch_fails_the_migration_cleanly(tmp_path):
    """ENOSPC inside splice (the file side): disk-full at both ends, the
    target thawed, the partial image gone, the image's space given back."""
    import subprocess
    from migrated.engine.source import SendOptions
    from migrated.image.store import ImageStore
    from tests.engine.harness import migrate
    from tests.engine.procs import workload
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mnt)], check=True)
    try:
        store = ImageStore(str(mnt / "state"), min_free_bytes=0)
        filler = mnt / "filler"

        def fill_disk() -> None:
            # Once the destination accepted (its free-space check passed,
            # the partial image exists), something else takes all but 8 MiB.
            deadline = time.monotonic() + 20
            while not os.listdir(store.partial_dir) and time.monotonic() < deadline:
                time.sleep(0.002)
            chunk = b"\1" * (1 << 20)
            with open(filler, "wb", buffering=0) as f:
                while True:
                    st = os.statvfs(mnt)
                    if st.f_bavail * st.f_frsize <= (8 << 20):
                        break
                    try:
                        f.write(chunk)
                    except OSError:     # the image took the rest first
                        break

        with workload(mib=32, rate=0) as w:
            t = threading.Thread(target=fill_disk)
            t.start()
            out = migrate(w.pid, store, SendOptions(then="stop"),
                          max_bandwidth=32 * 1024 * 1024)
            t.join()
            s, d = out.source, out.dest
            assert s["status"] == "failed" and d["status"] == "failed"
            assert d["error_code"] == "disk-full", d
            assert "disk full" in d["error"] and "free space" in d["error"]
            with open(f"/proc/{w.pid}/stat") as f:
                assert f.read().rsplit(")", 1)[1].split()[0] != "T"   # not left frozen
        assert not os.listdir(store.partial_dir)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
