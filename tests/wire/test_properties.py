"""Property tests: round trips, mutated and split streams."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from migrated.errors import ProtocolError
from migrated.runs import PAGE_SIZE
from migrated.wire import (NEED_DATA, ConnectionClosed, DestConnection, Pages,
                           SourceConnection, State, encode, limits)
from migrated.wire.frames import decode_body, peek_type

from .helpers import valid_stream
from .strategies import EVENTS, any_event


def decode_frame(frame: bytes):
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4
    body = memoryview(frame)[4:]
    return decode_body(peek_type(body), body)


@pytest.mark.parametrize("name", sorted(EVENTS))
def test_round_trip(name):
    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(EVENTS[name])
    def check(ev):
        frame = encode(ev)
        back = decode_frame(frame)
        assert back == ev
        assert type(back) is type(ev)
        assert encode(back) == frame  # canonical: one encoding per event
    check()


# -- whole conversations ------------------------------------------------------

SCRIPT, SRC_CHUNKS, SRC_EVENTS = valid_stream()


def run_dest(pieces: list[bytes], eof: bool = True):
    """Feed ``pieces`` to a dest, answering as the script says.  Returns the
    decoded events; raises ProtocolError (and only that) on bad input."""
    d = DestConnection()
    replies = {}  # index of source event -> dest events sent after it
    k = -1
    for who, ev in SCRIPT:
        if who == "s":
            k += 1
        else:
            replies.setdefault(k, []).append(ev)
    got = []

    def pump():
        while (ev := d.next_event()) is not NEED_DATA:
            got.append(ev)
            if isinstance(ev, ConnectionClosed):
                return
            for r in replies.get(len(got) - 1, []):
                d.send(r)

    for p in pieces:
        d.receive_data(p)
        pump()
    if eof:
        d.receive_data(b"")
        pump()
    return got, d


def test_valid_stream_decodes():
    got, d = run_dest([b"".join(SRC_CHUNKS)])
    assert got[:-1] == SRC_EVENTS
    assert got[-1] == ConnectionClosed(clean=True)
    assert d.state is State.CLOSED


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_splits_decode_identically(data):
    stream = b"".join(SRC_CHUNKS)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    got, _ = run_dest([p for p in pieces if p])
    assert got[:-1] == SRC_EVENTS


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10 ** 9), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10 ** 9), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, 10 ** 9), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.integers(0, 10 ** 9), st.just(0)),
)


def mutate(stream: bytes, muts) -> bytes:
    b = bytearray(stream)
    for kind, pos, arg in muts:
        if not b:
            break
        pos %= len(b)
        if kind == "flip":
            b[pos] ^= arg
        elif kind == "cut":
            del b[pos:pos + arg]
        elif kind == "insert":
            b[pos:pos] = arg
        else:
            del b[pos:]
    return bytes(b)


@settings(max_examples=300, deadline=None)
@given(st.lists(mutation, min_size=1, max_size=4), st.lists(st.integers(1, 5000), max_size=6))
def test_mutated_streams_only_raise_protocol_error(muts, splits):
    stream = mutate(b"".join(SRC_CHUNKS), muts)
    pieces, pos = [], 0
    for s in splits:
        pieces.append(stream[pos:pos + s])
        pos += s
    pieces.append(stream[pos:])
    try:
        run_dest([p for p in pieces if p])
    except ProtocolError as e:
        assert e.code in {"malformed", "too-large", "out-of-state", "version",
                          "unsupported", "bad-pages", "digest", "quota"}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_after_preamble_only_raises_protocol_error(junk):
    for conn in (DestConnection(), SourceConnection()):
        try:
            conn.receive_data(limits.PREAMBLE + junk)
            while conn.next_event() is not NEED_DATA:
                pass
            conn.receive_data(b"")
            conn.next_event()
        except ProtocolError:
            pass


@settings(max_examples=150, deadline=None)
@given(any_event, st.integers(0, 200))
def test_truncated_frames_never_decode(ev, cut):
    frame = encode(ev)
    cut = min(cut, len(frame) - 1)
    body = memoryview(frame)[4:len(frame) - 1 - cut]
    try:
        t = peek_type(body)
        if t is not None:
            decode_body(t, body)
    except ProtocolError:
        return
    # A body missing bytes can only "decode" if it is missing nothing.
    assert t is None


def test_pages_send_parts_do_not_copy_data():
    from .helpers import streaming_pair, BASE
    from migrated.runs import PageRuns
    s, d = streaming_pair()
    data = memoryview(bytearray(b"\x11" * (4 * PAGE_SIZE)))
    parts = s.send_parts(Pages.build(0, PageRuns.from_pairs([(BASE, 4)]), data))
    assert len(parts) == 2 and parts[1] is data
    for p in parts:
        d.receive_data(bytes(p))
    ev = d.next_event()
    assert bytes(ev.data) == bytes(data)
