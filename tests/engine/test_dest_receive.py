"""The destination's receive path: Pages decoded without msgpack (and, when
borrowed, without copying), big frames assembled in place, and the same
answers as the generic decoder for every other shape of input."""

from __future__ import annotations

import os
import random
import struct

import msgpack
import pytest

from migrated.errors import ProtocolError
from migrated.runs import PAGE_SIZE, PageRuns
from migrated.wire import NEED_DATA, DestConnection, Pages
from migrated.wire import events as E
from migrated.wire import limits as L
from migrated.wire.frames import TYPE_LIMITS, FrameReader, _pages_fields, decode_body, encode
from tests.wire.helpers import ACCEPT, BASE, HELLO, LAYOUT, START, WELCOME, pg


def _streaming_dest(**kw) -> DestConnection:
    from migrated.wire import SourceConnection
    s, d = SourceConnection(), DestConnection(**kw)
    for ev, (snd, rcv) in ((HELLO, (s, d)), (WELCOME, (d, s)), (START, (s, d)),
                           (ACCEPT, (d, s)), (LAYOUT, (s, d))):
        rcv.receive_data(snd.send(ev))
        assert rcv.next_event() == ev
    return d


def _pages(n: int, first: int = 0, seed: int = 1) -> Pages:
    data = random.Random(seed).randbytes(pg(n))
    return Pages.build(0, PageRuns.from_pairs([(BASE + pg(first), n)]), data)


def test_borrowed_data_is_a_view_released_at_the_next_call():
    d = _streaming_dest(borrow_pages=True)
    ev1, ev2 = _pages(8), _pages(4, 8, seed=2)
    d.receive_data(encode(ev1)[:] + encode(ev2))
    got = d.next_event()
    assert isinstance(got.data, memoryview) and got == ev1
    held = got.data
    got2 = d.next_event()
    assert got2 == ev2
    with pytest.raises(ValueError):       # the loan ended: no silent reuse
        bytes(held)
    assert d.next_event() is NEED_DATA


def test_default_connection_still_hands_out_bytes():
    d = _streaming_dest()
    ev = _pages(8)
    d.receive_data(encode(ev))
    got = d.next_event()
    assert type(got.data) is bytes and got == ev
    assert d.next_event() is NEED_DATA
    assert bytes(got.data) == bytes(ev.data)     # still valid after more calls


def test_big_frames_are_received_in_place():
    # Once a big frame's length is known, get_buffer offers no more than its
    # rest, so no byte of the next frame is read with it (and nothing of it
    # has to be moved later).
    d = _streaming_dest(borrow_pages=True)
    frames = [encode(_pages(64, 0, seed=k)) for k in range(3)]
    stream = b"".join(frames)
    ends = [sum(len(f) for f in frames[:k + 1]) for k in range(3)]
    pos, got = 0, []
    while pos < len(stream):
        if pos in [0] + ends:
            # a frame starts: deliver its length prefix and a few bytes
            d.receive_data(stream[pos:pos + 8])
            pos += 8
        else:
            buf = d.get_buffer(1 << 22)
            frame_end = min(e for e in ends if e > pos)
            assert len(buf) == frame_end - pos
            n = len(buf)
            buf[:n] = stream[pos:pos + n]
            buf.release()
            d.buffer_updated(n)
            pos += n
        while (ev := d.next_event()) is not NEED_DATA:
            got.append(bytes(ev.data))
    assert got == [bytes(_pages(64, 0, seed=k).data) for k in range(3)]


@pytest.mark.parametrize("declared, head", [
    (L.MAX_FRAME + 1, b""),                                     # over the state's limit
    (TYPE_LIMITS["pages"].max_frame + 1, b"\x85\xa4type\xa5pages"),   # over the type's
])
def test_length_is_still_checked_before_buffering(declared, head):
    d = _streaming_dest(borrow_pages=True)
    with pytest.raises(ProtocolError) as ei:     # as soon as the bytes arrive
        d.receive_data(struct.pack(">I", declared) + head)
    assert ei.value.code == "too-large"


def _body(ev: Pages) -> bytes:
    return encode(ev)[4:]


def _variants(ev: Pages) -> list[bytes]:
    """Other legal encodings of the same message (receivers accept any)."""
    w = ev.to_wire()
    out = []
    # map16 header, fields reordered after "type", bigger int and bin forms
    items = [("type", w["type"]), ("data", bytes(w["data"])), ("digest", w["digest"]),
             ("runs", w["runs"]), ("round", w["round"])]
    body = b"\xde\x00\x05"
    for k, v in items:
        body += msgpack.packb(k)
        if k == "round":
            body += b"\xcf" + v.to_bytes(8, "big")
        elif isinstance(v, bytes):
            body += b"\xc6" + len(v).to_bytes(4, "big") + v
        else:
            body += msgpack.packb(v)
    out.append(body)
    out.append(msgpack.packb(dict(items[:1] + items[:0:-1]), use_bin_type=True))
    return out


def _decode_both(body: bytes):
    """(generic result, fast-path result) -- each an event or an error code."""
    def run(fn):
        try:
            return fn()
        except ProtocolError as e:
            return ("error", e.code)
    generic = run(lambda: decode_body("pages", body))
    r = FrameReader(borrow=True)
    r._preamble_left = 0
    r.feed(struct.pack(">I", len(body)) + body)
    fast = run(lambda: r.next_frame(1 << 30, lambda t: None))
    return generic, fast


def test_fast_path_agrees_with_msgpack_on_legal_variants():
    ev = _pages(5, 3)
    for body in [_body(ev)] + _variants(ev):
        generic, fast = _decode_both(body)
        assert generic == ev and fast == ev


def test_fast_path_gives_the_generic_answer_for_broken_bodies():
    ev = _pages(2)
    good = _body(ev)
    rng = random.Random(3)
    broken = [
        good + b"\x00",                                   # trailing byte
        b"\x86" + good[1:] + msgpack.packb("x") + msgpack.packb(1),   # unknown field
        good[:-1],                                        # data one byte short
        good.replace(b"\xa5round", b"\xa5rounf", 1),      # unknown key
        good.replace(b"\xa5round\x00", b"\xa5round\xff", 1),   # negative round
        good.replace(b"\xa5round\x00", b"\xa5round\xc3", 1),   # bool round
        good.replace(b"\xa4runs", b"\xa4data", 1),        # duplicate key
    ]
    for _ in range(200):                                  # random byte flips in the header
        b = bytearray(good)
        i = rng.randrange(min(len(b), 80))
        b[i] = rng.randrange(256)
        broken.append(bytes(b))
    for body in broken:
        generic, fast = _decode_both(body)
        if isinstance(generic, tuple):
            assert fast == generic, body[:40]
        else:
            assert fast == generic


def test_fields_parser_refuses_what_it_does_not_know():
    lim = TYPE_LIMITS["pages"]
    assert _pages_fields(b"", lim, True) is None
    assert _pages_fields(b"\x85", lim, True) is None
    assert _pages_fields(msgpack.packb({"type": "pages"}), lim, True) is None
    body = _body(_pages(1))
    f = _pages_fields(memoryview(body), lim, True)
    assert f is not None and isinstance(f["data"], memoryview)
    assert type(_pages_fields(memoryview(body), lim, False)["data"]) is bytes
    # Pages.from_wire accepts the result as is
    assert E.Pages.from_wire(f) == _pages(1)


def test_checkpointed_migration_is_exact(tmp_path):
    # A steady writer over several rounds and a final delta big enough for
    # checkpoints while frozen: the image equals the frozen source page for
    # page, and commit used the background digests.
    from migrated.engine import dest as dest_mod
    from migrated.engine.source import SendOptions
    from migrated.image.store import ImageStore
    from tests.engine.harness import migrate
    from tests.engine.imagecheck import compare
    from tests.engine.procs import workload

    store = ImageStore(str(tmp_path / "state"))
    old = dest_mod.FROZEN_CHECKPOINT_BYTES, dest_mod.LIVE_FLUSH_BYTES
    dest_mod.FROZEN_CHECKPOINT_BYTES = dest_mod.LIVE_FLUSH_BYTES = 256 * 1024
    try:
        with workload(mib=24, rate=30000) as w:
            try:
                out = migrate(w.pid, store, SendOptions(then="stop"))
                s = out.source
                assert s["status"] == "completed", s.get("error")
                compare(store, s["image_id"], w.pid)
                assert store.verify(s["image_id"]).ok
                commit = [e for e in out.dest_events if e["event"] == "commit"][0]
                st = commit["store"]
                assert st["checkpoints"] >= 1 and st["checkpoint_chunks"] >= 1
                assert st["chunks_digested"] <= st["chunks"]
            finally:
                os.kill(w.pid, 18)      # SIGCONT: then=stop left it stopped
    finally:
        dest_mod.FROZEN_CHECKPOINT_BYTES, dest_mod.LIVE_FLUSH_BYTES = old


@pytest.mark.parametrize("n", [1, 1024])
def test_random_page_data_round_trips(n):
    d = _streaming_dest(borrow_pages=True)
    data = os.urandom(pg(n))
    ev = Pages.build(0, PageRuns.from_pairs([(BASE, min(n, 64))]), data[:pg(min(n, 64))])
    d.receive_data(encode(ev))
    got = d.next_event()
    assert bytes(got.data) == bytes(ev.data) and got.runs == ev.runs
    assert PAGE_SIZE * got.runs.total_pages() == len(got.data)


# -- hand-over: big batches change hands instead of being copied -------------

def _one_by_one(d, events):
    """Deliver each frame on its own (as get_buffer() makes a big frame
    arrive) and collect the events."""
    out = []
    for ev in events:
        d.receive_data(encode(ev))
        got = d.next_event()
        assert got == ev
        out.append(got)
    assert d.next_event() is NEED_DATA
    return out


def test_big_batches_are_handed_over_and_stay_valid_until_given_back():
    from migrated.wire.frames import handed_over
    d = _streaming_dest(hand_over_pages=True)
    evs = [_pages(64, 0, seed=k) for k in range(3)]     # 256 KiB each
    got = _one_by_one(d, evs)
    owners = [handed_over(g.data) for g in got]
    assert all(o is not None for o in owners)
    assert len({id(o) for o in owners}) == 3          # three buffers, none reused
    # Still intact after the reader received two more batches.
    assert [bytes(g.data) for g in got] == [bytes(e.data) for e in evs]
    # Given back, a buffer is received into again (warm, not a new one):
    # the reader takes it as its next buffer after the one it is filling.
    owners[0].give_back()
    assert handed_over(got[0].data) is None
    later = _one_by_one(d, [_pages(64, 0, seed=8), _pages(64, 0, seed=9)])
    assert handed_over(later[1].data) is owners[0]
    assert bytes(later[1].data) == bytes(_pages(64, 0, seed=9).data)
    assert bytes(later[0].data) == bytes(_pages(64, 0, seed=8).data)
    owners[0].give_back()
    owners[0].give_back()                               # idempotent


def test_small_batches_and_batches_with_bytes_behind_are_only_lent():
    from migrated.wire.frames import handed_over
    d = _streaming_dest(hand_over_pages=True)
    small = _pages(8)                                   # 32 KiB: below the cap
    assert len(encode(small)) < FrameReader.FRAME_CAP_MIN
    got = _one_by_one(d, [small])[0]
    assert handed_over(got.data) is None
    big1, big2 = _pages(64, 0, seed=1), _pages(64, 0, seed=2)
    d.receive_data(encode(big1) + encode(big2))         # big1 has bytes behind it
    g1 = d.next_event()
    assert g1 == big1 and handed_over(g1.data) is None
    held = g1.data
    g2 = d.next_event()                                 # big2 ends the buffer
    assert g2 == big2 and handed_over(g2.data) is not None
    with pytest.raises(ValueError):                     # big1's loan ended
        bytes(held)


def test_a_receiver_behind_its_sender_still_gets_big_batches_handed_over():
    """A receiver slower than its sender finds several frames waiting and
    asks for a big buffer each time (Channel._pull).  Reads must still stop
    at the end of each big batch -- not run on into the next one -- or
    every such batch is copied instead of handed over."""
    from migrated.engine.transport import RECV_BUFFER_HINT
    from migrated.wire import Zeros
    from migrated.wire.frames import handed_over
    d = _streaming_dest(hand_over_pages=True)
    small = Zeros(0, PageRuns.from_pairs([(BASE + pg(60), 2)]))
    evs = [_pages(16, 0, seed=1), small, _pages(16, 16, seed=2), _pages(16, 32, seed=3),
           _pages(8, 48, seed=4)]
    stream = b"".join(encode(e) for e in evs)
    got, pos = [], 0
    while pos < len(stream):
        buf = d.get_buffer(RECV_BUFFER_HINT)
        n = min(len(buf), len(stream) - pos)     # all that the socket holds
        buf[:n] = stream[pos:pos + n]
        buf.release()
        d.buffer_updated(n)
        pos += n
        while (ev := d.next_event()) is not NEED_DATA:
            assert ev == evs[len(got)]              # (a lent batch is valid until the next call)
            got.append(handed_over(ev.data) is not None if isinstance(ev, Pages) else None)
    assert got == [True, None, True, True, False]   # the last is below the cap: lent


def test_spare_buffers_kept_for_reuse_are_bounded():
    from migrated.wire.frames import MAX_SPARE_BUFFERS, handed_over
    d = _streaming_dest(hand_over_pages=True)
    n = MAX_SPARE_BUFFERS + 4
    got = _one_by_one(d, [_pages(64, 0, seed=k) for k in range(n)])
    for g in got:
        handed_over(g.data).give_back()
    assert len(d._reader._spares) == MAX_SPARE_BUFFERS


def test_a_hand_over_reader_is_freed_with_its_buffers_without_the_cycle_collector():
    # Buffers point back to their reader's spares only weakly: dropping a
    # finished migration's connection frees every receive buffer at once
    # (a cycle would hold them -- 4 MiB each -- until a full collection).
    import gc
    import weakref
    from migrated.wire.frames import handed_over
    gc.disable()
    try:
        d = _streaming_dest(hand_over_pages=True)
        got = _one_by_one(d, [_pages(64, 0, seed=k) for k in range(4)])
        owners = [handed_over(g.data) for g in got]
        for o in owners[:3]:
            o.give_back()                      # three spares, one still out
        spares = weakref.ref(d._reader._spares)
        bufs = [weakref.ref(o) for o in owners]
        del d, got, o, owners
        assert spares() is None and all(b() is None for b in bufs)
    finally:
        gc.enable()


def _mapping_perms(buf) -> str:
    """The permissions field of the /proc/self/maps line holding ``buf``."""
    import ctypes
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return line.split()[1]
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_batches_whose_heads_grow_reuse_the_spare_buffers():
    """Each batch here has one run more than the one before, so its head is
    a few bytes longer.  Every batch must still fit the spare the last one
    left: no buffer of twice a batch, no spare dropped for a new one (with
    buffers given back at once, two buffers take turns).  And the buffers
    are private memory: an anonymous shared mapping is shmem, dearer to
    fault in."""
    from migrated.engine.transport import RECV_BUFFER_HINT
    from migrated.wire.frames import BIG_BUFFER_GRAIN, handed_over
    d = _streaming_dest(hand_over_pages=True)
    evs = []
    for k in range(1, 7):          # 48 pages in k runs, one page apart
        runs = PageRuns.from_pairs([(BASE + pg(j * (48 // k + 1)), 48 // k) for j in range(k)])
        evs.append(Pages.build(0, runs, random.Random(k).randbytes(pg(48 // k * k))))
    owners = {}
    for ev in evs:
        frame = encode(ev)
        pos = 0
        while pos < len(frame):
            buf = d.get_buffer(RECV_BUFFER_HINT)
            n = min(len(buf), len(frame) - pos)
            buf[:n] = frame[pos:pos + n]
            buf.release()
            d.buffer_updated(n)
            pos += n
        got = d.next_event()
        assert got == ev and d.next_event() is NEED_DATA
        owner = handed_over(got.data)
        assert owner is not None
        assert len(owner) <= -(-len(frame) // BIG_BUFFER_GRAIN) * BIG_BUFFER_GRAIN
        assert _mapping_perms(owner) == "rw-p"
        owners[id(owner)] = owner
        owner.give_back()
    assert len(owners) == 2


def test_a_big_frame_fed_in_small_pieces_grows_its_buffer_by_doubling():
    """receive_data() in 64 KiB pieces (a connection without get_buffer):
    the buffer must grow geometrically up to the frame, not by one size
    step per piece -- each growth copies everything received so far."""
    reader = FrameReader(borrow=True)
    reader.feed(L.PREAMBLE)
    frame = encode(Pages.build(0, PageRuns.from_pairs([(BASE, 1024)]), bytes(pg(1024))))
    buffers, last = 0, None
    for k in range(0, len(frame), 64 * 1024):
        reader.feed(frame[k:k + 64 * 1024])
        if reader._buf is not last:
            buffers, last = buffers + 1, reader._buf
        reader.next_frame(L.MAX_FRAME, lambda t: None, decode=False)
    assert reader.next_frame(L.MAX_FRAME, lambda t: None) is not None
    assert buffers <= 8                 # 64 KiB doubling to 4 MiB, and one at most to fit
    assert len(reader._buf) < 2 * len(frame)
