"""Any msgpack map form is a valid body (SPEC.md 4.1; review 16 found map32
refused): the type is still read from a bounded prefix, and a map32 body
decodes to the same event as the canonical one."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import msgpack
import pytest

from migrated.errors import ProtocolError
from migrated.runs import PageRuns
from migrated.wire import Keepalive, Pages, RoundEnd, encode
from migrated.wire import limits as L
from migrated.wire.frames import MAX_TYPE_PEEK_BYTES, decode_body, peek_type
from tests.wire.helpers import BASE, HELLO, LAYOUT, START, deliver, streaming_pair

SPEC = (Path(__file__).resolve().parents[2] / "protocol" / "SPEC.md").read_text()


def as_map32(event) -> bytes:
    """The body of ``event`` as a map32, fields in the canonical order."""
    fields = msgpack.unpackb(encode(event)[4:], raw=False)
    return b"\xdf" + struct.pack(">I", len(fields)) + b"".join(
        msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in fields.items())


def test_the_type_of_the_widest_form_is_read_within_the_bound_spec_states():
    name = "x" * L.MAX_TYPE_NAME_BYTES
    body = (b"\xdf\x00\x00\x00\x02" + b"\xdb" + struct.pack(">I", 4) + b"type"
            + b"\xdb" + struct.pack(">I", len(name)) + name.encode())
    assert len(body) == MAX_TYPE_PEEK_BYTES
    for k in range(len(body)):
        assert peek_type(body[:k]) is None          # waits: never reads further
    assert peek_type(body) == name
    m = re.search(r"first\s+bytes of the body \(at most (\d+)", SPEC)
    assert m and int(m.group(1)) == MAX_TYPE_PEEK_BYTES


@pytest.mark.parametrize("event", [
    HELLO, START, LAYOUT, Keepalive(2 ** 64 - 1), RoundEnd(3, 1, 2, 3.5, 4.0, 5.0, 0.0),
    Pages.build(0, PageRuns.from_pairs([(BASE, 2)]), b"\x07" * 8192),
], ids=lambda e: e.type_name)
def test_a_map32_body_decodes_to_the_same_event(event):
    body = as_map32(event)
    assert body[0] == 0xDF
    assert peek_type(body) == event.type_name
    assert decode_body(event.type_name, body) == event


def test_a_map32_frame_goes_through_a_connection():
    s, d = streaming_pair()
    deliver(s, d, LAYOUT)
    ev = Pages.build(0, PageRuns.from_pairs([(BASE, 1)]), b"\x01" * 4096)
    s.send(ev)                                   # keep the source's counts in step
    body = as_map32(ev)
    d.receive_data(struct.pack(">I", len(body)) + body)
    assert d.next_event() == ev and d.round_pages == 1


@pytest.mark.parametrize("header", [b"\xdf\x00\x00\x00\x00", b"\xde\x00\x00"])
def test_an_empty_map_is_malformed_in_any_form(header):
    with pytest.raises(ProtocolError) as e:
        peek_type(header + b"\xa4type")
    assert e.value.code == "malformed"
