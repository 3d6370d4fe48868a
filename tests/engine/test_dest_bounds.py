"""Bounds of the destination engine against a hostile source (review 1):
a DestMigration over a real 127.0.0.1 TCP connection into a real image
store, the source played by hand (tests.hostile.peer.RawPeer).

- round-end messages: the rounds kept in the summary and the "round"
  events are bounded, whatever the count; MAX_ROUND ends it clearly;
- spliced page data has a deadline: trickling inside a big batch is cut;
  so does a frame read whole (TLS), with the same allowance for a slow
  link (review 16: --max-bandwidth below ~137 KiB/s failed over TLS);
- an error of the writer's thread is reported (with its own code) even
  while the source sends only keepalives, or goes quiet;
- any Start the protocol accepts fits the image metadata (the command
  line is cut, and marked), or is refused as too-large, never "internal".
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from migrated.engine import dest as D
from migrated.engine.dest import DestLimits, DestMigration
from migrated.engine import transport as T
from migrated.engine.transport import BlockingTransport
from migrated.image import manifest as mf
from migrated.image.store import ImageStore
from migrated.runs import PAGE_SIZE, PageRuns
from migrated.wire import (Accept, CommitRequest, Committed, Error, FinalEnd, Freeze, Keepalive,
                           Layout, MappingInfo, Pages, Release, Released, RoundEnd, Start,
                           Welcome)
from migrated.wire import limits as L
from migrated.wire.frames import encode
from tests.hostile.peer import BASE, RawPeer, anon_layout, hello, pages

IDLE_S = 2.0          # the destination's idle timeout in these tests
IO_S = 1.5            # its socket's timeout (one silent stretch)


class DestRun:
    """A DestMigration in a thread, accepting one connection on 127.0.0.1;
    its events and summary kept for the test."""

    def __init__(self, store: ImageStore, *, limits: DestLimits | None = None,
                 io_timeout: float = IO_S, direct_receive: bool = True):
        self.store = store
        self.direct_receive = direct_receive
        self.limits = limits or DestLimits(idle_timeout_s=IDLE_S, handshake_timeout_s=5.0)
        self.io_timeout = io_timeout
        self.events: list[dict] = []
        self.result: dict | None = None
        self.dm: DestMigration | None = None
        self._ready = threading.Event()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True, name="dest-under-test")
        self.thread.start()

    def _run(self) -> None:
        self._srv.settimeout(10)
        try:
            conn, _ = self._srv.accept()
        finally:
            self._srv.close()
        self.dm = DestMigration(BlockingTransport(conn, timeout=self.io_timeout), self.store,
                                node="dst", on_event=self.events.append, limits=self.limits,
                                direct_receive=self.direct_receive)
        self._ready.set()
        self.result = self.dm.run()

    def peer(self) -> RawPeer:
        p = RawPeer("127.0.0.1", self.port)
        assert self._ready.wait(10)
        return p

    def wait(self, timeout: float = 20.0) -> dict:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the destination engine did not end"
        assert self.result is not None
        return self.result


@pytest.fixture
def store(tmp_path):
    return ImageStore(str(tmp_path / "state"), min_free_bytes=0)


def _wait_error(p: RawPeer, timeout: float, keepalives: bool = False,
                every: float = 0.25) -> tuple[Error | None, float]:
    """The daemon's Error (or None when it did not come within ``timeout``),
    and how long it took; with ``keepalives`` we send one every ``every`` s."""
    t0 = time.monotonic()
    seq = 0
    while time.monotonic() - t0 < timeout:
        if keepalives and not p.closed:
            p.send_raw(encode(Keepalive(seq)))
            seq += 1
        p._pull(every)
        errs = [e for e in p.events if isinstance(e, Error)]
        if errs:
            return errs[0], time.monotonic() - t0
        if p.closed:
            break
    return None, time.monotonic() - t0


# -- 2. rounds ------------------------------------------------------------------------

def test_round_figures_and_round_events_stay_bounded_whatever_the_round_count(store):
    n = 400
    run = DestRun(store)
    p = run.peer()
    p.handshake(mid="bounds-rounds")
    p.send(anon_layout(0, 64))
    t0 = time.monotonic()
    blob = b"".join(p.conn.send(RoundEnd(r, 0, 0, 0.0, 0.0, 0.0, 0.0)) for r in range(n))
    assert p.send_raw(blob)
    # every one consumed (the destination's round counter), then cancel
    deadline = time.monotonic() + 30
    while run.dm.channel.conn.round < n and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    assert run.dm.channel.conn.round == n
    p.send_raw(p.conn.send(Error("internal", "test over")))
    s = run.wait()
    kept = s["rounds"]
    rounds_ev = [e for e in run.events if e["event"] == "round"]
    assert len(kept) < n // 2 and len(rounds_ev) < n // 2, (len(kept), len(rounds_ev))
    assert len(kept) == D.ROUNDS_KEPT_FIRST + D.ROUNDS_KEPT_LAST
    assert s["rounds_dropped"] == n - len(kept)
    # the first and the last rounds, in order
    assert [r["round"] for r in kept] == (list(range(D.ROUNDS_KEPT_FIRST))
                                          + list(range(n - D.ROUNDS_KEPT_LAST, n)))
    # one log line each for the first rounds, then at most one a second,
    # each saying how many rounds it stands for
    assert len(rounds_ev) <= D.ROUND_EVENTS_ALWAYS + elapsed / D.ROUND_EVENT_INTERVAL_S + 2
    assert len(rounds_ev) + sum(e.get("rounds_unreported", 0) for e in rounds_ev) <= n
    end = [e for e in run.events if e["event"] == "end"][0]
    assert "rounds" not in end and end["rounds_dropped"] == s["rounds_dropped"]


def test_a_round_end_of_the_last_nameable_round_is_a_clear_protocol_error(store):
    # As if 2^32 - 1 rounds had gone by (the counters of both ends wound
    # forward): after this round-end nothing could name the next round.
    run = DestRun(store)
    p = run.peer()
    p.handshake(mid="bounds-maxround")
    p.send(anon_layout(0, 64))
    deadline = time.monotonic() + 10
    while run.dm.channel.conn.layout is None:       # the layout is in
        assert time.monotonic() < deadline
        time.sleep(0.01)
    run.dm.channel.conn.round = L.MAX_ROUND
    p.conn.round = L.MAX_ROUND
    p.send(RoundEnd(L.MAX_ROUND, 0, 0, 0.0, 0.0, 0.0, 0.0))
    err, _ = _wait_error(p, 5.0)
    assert err is not None, "no Error for a round-end of round MAX_ROUND"
    assert err.code == "out-of-state" and "MAX_ROUND" in err.message
    s = run.wait()
    assert s["status"] == "failed" and s["error_code"] == "out-of-state"
    assert not os.listdir(store.partial_dir)


# -- 3. spliced page data has a deadline ---------------------------------------------

@pytest.mark.parametrize("direct", [True, False], ids=["spliced", "read-whole"])
def test_a_source_trickling_inside_a_batch_is_cut_after_the_idle_timeout(
        store, monkeypatch, direct):
    # No allowance for a slow link here (test_a_batch_on_a_slow_link_is_not_cut):
    # the deadline is the idle timeout alone.
    monkeypatch.setattr(T, "MIN_LINK_RATE", 1 << 40)
    run = DestRun(store, direct_receive=direct)
    p = run.peer()
    p.handshake(mid="bounds-trickle")
    p.send(anon_layout(0, 1024))
    frame = p.conn.send(pages(0, BASE, 1024))        # 4 MiB: spliced from the socket
    p.send_raw(frame[:200])                          # the head and a few data bytes
    t0 = time.monotonic()
    i = 200
    err = None
    # a byte every 0.5 s: never IO_S of silence, so only a deadline can end it
    while time.monotonic() - t0 < IDLE_S + IO_S + 6:
        if not p.send_raw(frame[i:i + 1]):
            break
        i += 1
        p._pull(0.5)
        errs = [e for e in p.events if isinstance(e, Error)]
        if errs or p.closed:
            err = errs[0] if errs else None
            break
    took = time.monotonic() - t0
    assert err is not None, f"still receiving after {took:.1f} s of trickling ({i - 200} bytes)"
    assert took < IDLE_S + IO_S + 2
    assert err.code == "timeout"
    assert f"127.0.0.1:{p.sock.getsockname()[1]}" in err.message
    assert ("page data" if direct else "frame") in err.message and "trickling" in err.message
    s = run.wait()
    assert s["status"] == "failed" and s["error_code"] == "timeout"


def _one_batch_in_pieces(store, mid: str, pieces: int, gap_s: float,
                         direct: bool = True) -> float:
    """Send one 4 MiB batch (spliced from the socket, or read whole as over
    TLS) in ``pieces`` with ``gap_s`` between them, then its round's end;
    check the destination took all of it.  Returns how long the batch took
    to send."""
    run = DestRun(store, direct_receive=direct)
    p = run.peer()
    p.handshake(mid=mid)
    p.send(anon_layout(0, 1024))
    frame = p.conn.send(pages(0, BASE, 1024))
    step = len(frame) // pieces + 1
    t0 = time.monotonic()
    for k in range(0, len(frame), step):
        p.send_raw(frame[k:k + step])
        time.sleep(gap_s)
    took = time.monotonic() - t0
    p.send(RoundEnd(0, 1024, len(frame), 0.0, 0.0, 0.0, 0.0))
    deadline = time.monotonic() + 10
    while run.dm.channel.conn.round < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run.dm.channel.conn.round == 1, run.result
    assert run.dm.channel.direct_bytes == (1024 * PAGE_SIZE if direct else 0)
    p.send_raw(p.conn.send(Error("internal", "test over")))
    run.wait()
    return took


@pytest.mark.parametrize("direct", [True, False], ids=["spliced", "read-whole"])
def test_a_batch_on_a_slow_link_is_not_cut(store, monkeypatch, direct):
    """Slower than the idle timeout allows for the whole batch, but faster
    than MIN_LINK_RATE: a slow link, not a trickling peer -- whether its
    data is spliced or the frame is read whole (TLS)."""
    monkeypatch.setattr(T, "MIN_LINK_RATE", 1 << 20)     # 4 MiB: +4 s
    assert _one_batch_in_pieces(store, "bounds-slow-link", 16, 0.2, direct) > IDLE_S


def test_a_big_batch_that_arrives_in_time_is_still_spliced(store):
    # slowly, but within the idle timeout: 8 pieces over ~1 s
    _one_batch_in_pieces(store, "bounds-splice-ok", 8, 0.12)


# -- 4. writer errors are noticed on every message ----------------------------------------

def _fill_past_quota(p: RawPeer, store_quota: int) -> None:
    """Batches of 63 pages (252 KiB: written by the writer's thread, not
    spliced) until the store's quota is crossed, by the last one: no
    writer call follows that would raise the error on its own.  (The
    Accept promised more.)"""
    p.send(anon_layout(0, 1024))
    n = store_quota // (63 * PAGE_SIZE) + 1
    for i in range(n):
        p.send(pages(0, BASE + i * 63 * PAGE_SIZE, 63))


@pytest.mark.parametrize("keepalives", [True, False], ids=["keepalives", "quiet"])
def test_a_writer_error_is_reported_with_its_own_code(tmp_path, keepalives):
    quota = 1 << 20
    store = ImageStore(str(tmp_path / "state"), quota_bytes=quota, min_free_bytes=0)
    run = DestRun(store, limits=DestLimits(quota_bytes=64 << 20, idle_timeout_s=IDLE_S,
                                           handshake_timeout_s=5.0))
    p = run.peer()
    p.handshake(mid="bounds-wrerr")
    assert not run.dm.write_inline           # the pipelined writer's thread writes
    _fill_past_quota(p, quota)
    err, took = _wait_error(p, IDLE_S + IO_S + 6, keepalives=keepalives)
    assert err is not None, "no Error while the source sent keepalives"
    assert err.code == "quota", err.message
    assert "quota" in err.message
    if keepalives:
        assert took < 2.0        # on the next keepalive, not at a timeout
    s = run.wait()
    assert s["status"] == "failed" and s["error_code"] == "quota"
    assert not os.listdir(store.partial_dir)


# -- 5. any Start the protocol accepts fits the image metadata ----------------------------------

def _start_with(p: RawPeer, st: Start):
    """Hello, Start; the first answer after Welcome (Accept or Error)."""
    p.send(hello("bounds-meta"))
    p.expect(Welcome)
    p.send_raw(encode(st))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10 and not p.closed:
        p._pull(0.5)
        if p.events:
            return p.events[0]
    return p.events[0] if p.events else None


WORST_EXE = "\x01" * L.MAX_PATH_BYTES
WORST_OPTIONS = {f"opt{k:02d}-" + "x" * (L.MAX_TOKEN_BYTES - 6): "\x01" * L.MAX_OPTION_STR_BYTES
                 for k in range(L.MAX_OPTIONS)}


@pytest.mark.parametrize("label,args,exe,options", [
    ("100 KiB of ASCII arguments", tuple("a" * 1023 for _ in range(100)), "/bin/x", {}),
    ("non-UTF-8 bytes", (bytes(range(0x80, 0x100)).decode("utf-8", "surrogateescape") * 500,),
     "/bin/x", {}),
    ("one-byte arguments", tuple("\x02" for _ in range(L.MAX_CMDLINE_BYTES // 2)), "/bin/x", {}),
    ("everything at its worst", (("\x01" * 4000),) * 32, WORST_EXE, WORST_OPTIONS),
])
def test_any_start_the_protocol_accepts_is_accepted_with_its_cmdline_cut_to_fit(
        store, label, args, exe, options):
    st = Start(4242, args, exe, PAGE_SIZE, "digest", 0, options)
    assert len(st.to_wire()["cmdline"]) <= L.MAX_CMDLINE_BYTES
    run = DestRun(store)
    p = run.peer()
    got = _start_with(p, st)
    assert isinstance(got, Accept), f"{label}: {got}"
    p.send_raw(encode(Error("internal", "test over")))
    run.wait()
    # the metadata it would have kept: cut where it had to be, and marked
    clipped, cut = mf.clip_cmdline(args)
    assert len(json.dumps(clipped)) <= mf.MAX_META_CMDLINE_CHARS
    assert clipped == list(args[:len(clipped)]) or (len(clipped) == 1 and args[0].startswith(clipped[0]))
    meta = mf.check_meta({"pid": 4242, "cmdline": clipped, "exe": exe, "options": options,
                          "source_node": "mallory", "migration_id": "bounds-meta",
                          "tracker": "digest", "source_peer": "x" * 255,
                          **({"cmdline_truncated": True} if cut else {})})
    assert meta["cmdline"] == clipped


def test_the_image_metadata_says_the_command_line_was_cut(store):
    args = tuple("b" * 1023 for _ in range(128))     # 128 KiB on the wire, more in JSON
    clipped, cut = mf.clip_cmdline(args)
    assert cut and 0 < len(clipped) < len(args) and clipped == list(args[:len(clipped)])
    assert mf.clip_cmdline(args[:3]) == (list(args[:3]), False)
    long_one, cut = mf.clip_cmdline(("\udcff" * 100_000,))
    assert cut and len(json.dumps(long_one)) <= mf.MAX_META_CMDLINE_CHARS
    assert len(long_one[0]) == (mf.MAX_META_CMDLINE_CHARS - 4) // 6
    # through a whole start: the writer's metadata keeps the mark
    run = DestRun(store)
    p = run.peer()
    got = _start_with(p, Start(4242, args, "/bin/x", PAGE_SIZE, "digest", 0, {}))
    assert isinstance(got, Accept), got
    meta = run.dm.writer.meta
    assert meta["cmdline_truncated"] is True and meta["cmdline"] == clipped
    p.send_raw(encode(Error("internal", "test over")))
    run.wait()


def test_metadata_that_still_does_not_fit_is_too_large_not_internal(store, monkeypatch):
    # (Only a smaller bound can make a valid Start too big now.)
    monkeypatch.setattr(mf, "MAX_META_BYTES", 16 * 1024)
    run = DestRun(store)
    p = run.peer()
    got = _start_with(p, Start(4242, ("/bin/x",), WORST_EXE, PAGE_SIZE, "digest", 0, {}))
    assert isinstance(got, Error), got
    assert got.code == "too-large" and "metadata" in got.message and "4242" in got.message
    s = run.wait()
    assert s["error_code"] == "too-large"
    assert not os.listdir(store.partial_dir)


def _queued_checkpoint_bytes(run: DestRun) -> int:
    """Bytes of chunk snapshots waiting in the writer's checkpoint queue."""
    w = run.dm.writer
    ck = getattr(getattr(w, "_w", w), "_ckpt", None)
    if ck is None:
        return 0
    with ck._cond:
        return sum(x.nbytes for job in ck._jobs for x in job if hasattr(x, "nbytes"))


def test_checkpoints_faster_than_their_digests_do_not_queue_up(store):
    """Each RoundEnd queues a background digest of the chunks changed since
    the last.  A source sending tiny rounds that touch many sparse chunks
    (each digest reads the chunk's span: 2 MiB for two pages) made the
    queue -- and the destination's memory -- grow with every round (+580
    MiB from 20 MiB sent).  Waiting work is merged now, so it stays at one
    snapshot per chunk, and the digests it leaves still describe the image:
    rounds alternate between two halves of the chunks and rewrite them, and
    the committed image verifies."""
    chunk = 2 << 20
    nchunk = 1024
    half = nchunk // 2
    p = (run := DestRun(store)).peer()
    p.handshake(mid="bounds-ckpt")
    p.send(Layout(0, (MappingInfo(BASE, BASE + nchunk * chunk, "rw-p", 0, "", "anon"),)))
    ends = [(BASE + i * chunk, 1) for i in range(nchunk)] + \
           [(BASE + (i + 1) * chunk - PAGE_SIZE, 1) for i in range(nchunk)]
    runs = PageRuns.from_pairs(sorted(ends))
    for piece in runs.split(L.MAX_BATCH_PAGES):
        p.send(Pages.build(0, piece, b"\x5a" * (piece.total_pages() * PAGE_SIZE)))
    p.send(RoundEnd(0, runs.total_pages(), 0, 0.0, 0.0, 0.0, 0.0))
    sent_pages = runs.total_pages()
    rounds = 120
    one_snapshot_each = nchunk * (mf.CHUNK_PAGES + 16)
    peak = 0
    for r in range(1, rounds):
        lo = (r % 2) * half
        firsts = PageRuns.from_pairs([(BASE + i * chunk, 1) for i in range(lo, lo + half)])
        blob = p.conn.send(Pages.build(r, firsts, bytes([r]) * (half * PAGE_SIZE)))
        blob += p.conn.send(RoundEnd(r, half, 0, 0.0, 0.0, 0.0, 0.0))
        assert p.send_raw(blob)
        sent_pages += half
        peak = max(peak, _queued_checkpoint_bytes(run))
    deadline = time.monotonic() + 60
    while run.dm.channel.conn.round < rounds and time.monotonic() < deadline:
        peak = max(peak, _queued_checkpoint_bytes(run))
        time.sleep(0.01)
    assert run.dm.channel.conn.round == rounds
    assert peak <= one_snapshot_each, (peak, one_snapshot_each)
    p.send(Freeze(rounds))
    p.send(FinalEnd(rounds, sent_pages))
    p.send(CommitRequest(runs.total_pages()))
    committed = p.expect(Committed, timeout=60)
    p.send_raw(encode(Release(committed.image_id)))   # (our state machine saw no Committed)
    p.expect(Released, timeout=30)
    p.half_close()
    assert run.wait(30)["status"] == "completed"
    v = store.verify(committed.image_id)
    assert v.ok, v
