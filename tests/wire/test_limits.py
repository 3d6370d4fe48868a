"""Limits and connection behaviour: lengths refused before their data,
count limits at N and N+1, sticky errors, the recv_into path."""

from __future__ import annotations

import os
import random
import struct

import msgpack
import numpy as np
import pytest

from migrated.errors import ProtocolError
from migrated.runs import PAGE_SIZE, PageRuns
from migrated.wire import (NEED_DATA, Accept, Cancel, DestConnection, Dropped,
                           Error, Keepalive, Layout, LocalProtocolError,
                           MappingInfo, Pages, RoundEnd, SourceConnection,
                           State, Welcome, Zeros, encode)
from migrated.wire import limits as L

from .helpers import (ACCEPT, BASE, HELLO, LAYOUT, MAPS, START, WELCOME,
                      deliver, drain, pair, pg, streaming_pair, valid_stream)


def dest_streaming(accept=ACCEPT, layout=LAYOUT):
    s, d = pair()
    deliver(s, d, HELLO)
    deliver(d, s, WELCOME)
    deliver(s, d, START)
    deliver(d, s, accept)
    deliver(s, d, layout)
    return s, d


# -- lengths are checked before the body is buffered ---------------------------

def test_oversized_length_refused_with_no_body_at_all():
    d = DestConnection()
    with pytest.raises(ProtocolError) as e:
        d.receive_data(L.PREAMBLE + struct.pack(">I", L.MAX_CONTROL_FRAME + 1))
    assert e.value.code == "too-large"
    assert d.state is State.ERROR


def test_state_limit_is_checked_before_type_limit():
    _, d = dest_streaming()
    with pytest.raises(ProtocolError) as e:
        d.receive_data(struct.pack(">I", L.MAX_FRAME + 1))
    assert e.value.code == "too-large"


def test_per_type_limit_checked_from_first_body_bytes():
    _, d = dest_streaming()
    d.receive_data(struct.pack(">I", L.MAX_PAGES_FRAME + 1))  # fits MAX_FRAME
    with pytest.raises(ProtocolError) as e:
        d.receive_data(b"\x85\xa4type\xa5pages")
    assert e.value.code == "too-large"


def test_declared_big_frame_allocates_nothing_until_data_arrives():
    _, d = dest_streaming()
    d.receive_data(struct.pack(">I", L.MAX_PAGES_FRAME) + b"\x85\xa4type\xa5pages")
    assert d.next_event() is NEED_DATA
    assert len(d._reader._buf) < 1 << 20


def test_out_of_state_type_refused_before_body():
    d = DestConnection()
    with pytest.raises(ProtocolError) as e:
        d.receive_data(L.PREAMBLE + struct.pack(">I", 4000) + b"\x85\xa4type\xa5pages")
    assert e.value.code == "out-of-state"


def test_receive_buffer_limit():
    _, d = dest_streaming()
    chunk = b"\0" * (1 << 20)
    with pytest.raises(ProtocolError) as e:
        for _ in range(L.RECEIVE_BUFFER_LIMIT // len(chunk) + 2):
            d.receive_data(struct.pack(">I", 100) + b"\x82\xa4type\xa9keepalive" + chunk)
    assert e.value.code in ("too-large", "malformed")


# -- counts at N and N+1 ----------------------------------------------------------

def _maps(n):
    return [MappingInfo(BASE + pg(2 * i), BASE + pg(2 * i + 1), "rw-p", 0, "", "anon")
            for i in range(n)]


def test_max_mappings():
    s, d = pair()
    deliver(s, d, HELLO)
    deliver(d, s, WELCOME)
    deliver(s, d, START)
    deliver(d, s, ACCEPT)
    deliver(s, d, Layout(0, _maps(L.MAX_MAPPINGS)))
    assert len(d.layout.mappings) == L.MAX_MAPPINGS
    with pytest.raises(LocalProtocolError) as e:
        s.send(Layout(0, _maps(L.MAX_MAPPINGS + 1)))
    assert e.value.code == "too-large"
    n = L.MAX_MAPPINGS + 1
    starts = (np.arange(n, dtype="<u8") * np.uint64(pg(2)) + np.uint64(BASE))
    frame = msgpack.packb({
        "type": "layout", "round": 0, "starts": starts.tobytes(),
        "ends": (starts + np.uint64(PAGE_SIZE)).tobytes(),
        "offsets": bytes(8 * n), "perms": bytes(n), "kinds": bytes(n),
        "flags": bytes(n), "path_ends": bytes(4 * n), "paths": b""}, use_bin_type=True)
    with pytest.raises(ProtocolError) as e:
        d.receive_data(struct.pack(">I", len(frame)) + frame)
        d.next_event()
    assert e.value.code == "too-large"


def test_max_runs():
    pairs = [(BASE + pg(2 * i), 1) for i in range(L.MAX_RUNS)]
    layout = Layout(0, [MappingInfo(BASE, BASE + pg(2 * L.MAX_RUNS + 2), "rw-p", 0, "",
                                    "anon")])
    s, d = dest_streaming(layout=layout)
    deliver(s, d, Zeros(0, PageRuns.from_pairs(pairs)))
    with pytest.raises(LocalProtocolError) as e:
        s.send(Dropped(0, PageRuns.from_pairs(pairs + [(BASE + pg(2 * L.MAX_RUNS), 1)])))
    assert e.value.code == "too-large"


def test_batch_pages_limit():
    n = min(L.MAX_BATCH_PAGES, L.MAX_BATCH_BYTES // PAGE_SIZE)
    layout = Layout(0, [MappingInfo(BASE, BASE + pg(4096), "rw-p", 0, "", "anon")])
    s, d = dest_streaming(accept=Accept(n, 1 << 40), layout=layout)
    data = os.urandom(pg(n))
    deliver(s, d, Pages.build(0, PageRuns.from_pairs([(BASE, n)]), data))
    with pytest.raises(LocalProtocolError) as e:
        s.send(Pages.build(0, PageRuns.from_pairs([(BASE, n + 1)]), data + bytes(PAGE_SIZE)))
    assert e.value.code == "too-large"


def test_quota_exactly_reached_then_refused():
    s, d = dest_streaming(accept=Accept(16, pg(4)))
    deliver(s, d, Pages.build(0, PageRuns.from_pairs([(BASE, 4)]), bytes(pg(4))))
    assert d.total_bytes == pg(4)
    with pytest.raises(LocalProtocolError) as e:
        s.send(Pages.build(0, PageRuns.from_pairs([(BASE, 1)]), bytes(pg(1))))
    assert e.value.code == "quota"


# -- semantics -------------------------------------------------------------------

def test_runs_may_span_adjacent_migratable_mappings_but_not_gaps():
    s, d = streaming_pair()
    deliver(s, d, Zeros(0, PageRuns.from_pairs([(BASE + pg(60), 10)])))  # anon|file
    with pytest.raises(LocalProtocolError) as e:
        s.send(Zeros(0, PageRuns.from_pairs([(BASE + pg(79), 2)])))  # into the gap
    assert e.value.code == "bad-pages"
    with pytest.raises(LocalProtocolError):
        s.send(Zeros(0, PageRuns.from_pairs([(BASE + pg(100), 1)])))  # shared-file


def test_new_layout_replaces_old_one():
    s, d = streaming_pair()
    deliver(s, d, RoundEnd(0, 0, 0, 0, 0, 0, 0))
    deliver(s, d, Layout(1, MAPS[1:]))
    with pytest.raises(LocalProtocolError) as e:
        s.send(Dropped(1, PageRuns.from_pairs([(BASE, 1)])))
    assert e.value.code == "bad-pages"


def test_round_end_must_count_pages():
    s, d = streaming_pair()
    deliver(s, d, Pages.build(0, PageRuns.from_pairs([(BASE, 2)]), bytes(pg(2))))
    with pytest.raises(LocalProtocolError) as e:
        s.send(RoundEnd(0, 1, 0, 0, 0, 0, 0))
    assert e.value.code == "bad-pages" and s.state is State.STREAMING
    deliver(s, d, RoundEnd(0, 2, 0, 0, 0, 0, 0))
    assert d.round == s.round == 1 and d.round_pages == 0


def test_local_error_changes_nothing():
    s, d = streaming_pair()
    before = (s.state, s.round, s.total_pages)
    with pytest.raises(LocalProtocolError):
        s.send(Welcome(1, "x", ()))
    with pytest.raises(LocalProtocolError):
        s.send(Error("made-up-code", "x"))
    with pytest.raises(LocalProtocolError):
        s.send("not an event")  # type: ignore[arg-type]
    assert (s.state, s.round, s.total_pages) == before


def test_sticky_error_then_only_error_or_cancel():
    _, d = streaming_pair()
    with pytest.raises(ProtocolError) as first:
        d.receive_data(encode(Keepalive(1))[:-1] + b"\xc1")
        d.next_event()
    with pytest.raises(ProtocolError) as again:
        d.next_event()
    assert again.value is first.value
    d.receive_data(b"more bytes are ignored")
    with pytest.raises(LocalProtocolError):
        d.send(Keepalive(2))
    d.send(Error(first.value.code, first.value.message[:100]))
    assert d.state is State.CLOSED


def test_version_negotiation_picks_highest_common():
    s = SourceConnection(versions=(1, 2))
    d = DestConnection(versions=(1, 2, 3))
    from migrated.wire import Hello
    d.receive_data(s.send(Hello((1, 2), "a", (), "m")))
    drain(d)
    assert d.version == 2
    with pytest.raises(LocalProtocolError) as e:
        d.send(Welcome(1, "b", ()))
    assert e.value.code == "version"
    s.receive_data(d.send(Welcome(2, "b", ())))
    drain(s)
    assert s.version == 2 and s.state is State.WELCOMED


def test_dest_may_cancel():
    s, d = streaming_pair()
    deliver(d, s, Cancel("operator on dest"))
    assert s.state is d.state is State.CLOSED


def test_recv_into_path_decodes_whole_stream():
    _, chunks, events = valid_stream()
    stream = b"".join(chunks)
    from .test_properties import SCRIPT
    d = DestConnection()
    replies, k = {}, -1
    for who, ev in SCRIPT:
        if who == "s":
            k += 1
        else:
            replies.setdefault(k, []).append(ev)
    got, pos, rng = [], 0, random.Random(5)
    while pos < len(stream):
        buf = d.get_buffer(rng.randint(1, 70000))
        n = min(len(buf), len(stream) - pos)
        buf[:n] = stream[pos:pos + n]
        del buf
        d.buffer_updated(n)
        pos += n
        while (ev := d.next_event()) is not NEED_DATA:
            got.append(ev)
            for r in replies.get(len(got) - 1, []):
                d.send(r)
    assert got == events


_TOP = L.USER_ADDRESS_LIMIT


@pytest.mark.parametrize("start,count,ok", [
    (BASE, 1, True), (BASE, L.MAX_BATCH_PAGES, True),
    (_TOP - PAGE_SIZE, 1, True), (0, _TOP // PAGE_SIZE, True),      # up to the very end
    (_TOP - PAGE_SIZE, 2, False), (PAGE_SIZE, _TOP // PAGE_SIZE, False),  # one page past it
    (_TOP, 1, False), (2 ** 64 - PAGE_SIZE, 1, False), (BASE, 2 ** 64 - 1, False),
    (BASE, 0, False), (BASE + 8, 1, False)])
def test_one_run_is_checked_like_many(start, count, ok):
    """A batch of one run takes a short path through the checks: it must
    accept and refuse exactly what the general path does (the same run
    behind a valid first run takes the general path)."""
    from migrated.wire.events import runs_from_wire
    run = struct.pack("<QQ", start, count)
    cases = [run]
    if start >= 2 * PAGE_SIZE:
        cases.append(struct.pack("<QQ", 0, 1) + run)
    for b in cases:
        if ok:
            assert runs_from_wire(b, "pages.runs").total_pages() == count + (b is not run)
        else:
            with pytest.raises(ProtocolError) as e:
                runs_from_wire(b, "pages.runs")
            assert e.value.code == "malformed"
