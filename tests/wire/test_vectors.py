"""Every golden vector in protocol/vectors/index.json, run against the codec
and the state machines; valid frames must re-encode to the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from migrated.errors import ProtocolError
from migrated.runs import PAGE_SIZE
from migrated.wire import (NEED_DATA, ConnectionClosed, DestConnection,
                           SourceConnection, encode)
from migrated.wire.jsonform import event_from_json, event_to_json

VEC_DIR = Path(__file__).resolve().parents[2] / "protocol" / "vectors"
INDEX = json.loads((VEC_DIR / "index.json").read_text())
VECTORS = INDEX["vectors"]

pytestmark = pytest.mark.skipif(PAGE_SIZE != INDEX["page_size"],
                                reason="vectors are written for 4096-byte pages")


def run_step(conn, step):
    data = (VEC_DIR / step["recv"]).read_bytes()
    got, err = [], None
    try:
        if data:
            conn.receive_data(data)
        if step["eof"]:
            conn.receive_data(b"")
        while (ev := conn.next_event()) is not NEED_DATA:
            got.append(event_to_json(ev))
            if isinstance(ev, ConnectionClosed):
                break
    except ProtocolError as e:
        err = e
    return got, err


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(vector):
    conn = DestConnection() if vector["role"] == "dest" else SourceConnection()
    for k, step in enumerate(vector["steps"]):
        if "send" in step:
            conn.send(event_from_json(step["send"]))
            continue
        got, err = run_step(conn, step)
        assert got == step["expect"], f"step {k}: events differ"
        code = err.code if err else None
        assert code == step["error"], f"step {k}: expected {step['error']}, got {err!r}"
        if err is not None:
            # The failure is sticky and only Error/Cancel may follow.
            with pytest.raises(ProtocolError):
                conn.next_event()
        if step.get("canonical"):
            again = b"".join(encode(event_from_json(e)) for e in step["expect"])
            assert again == (VEC_DIR / step["recv"]).read_bytes()


def test_index_covers_every_error_code_we_raise():
    codes = {s["error"] for v in VECTORS for s in v["steps"] if s.get("error")}
    assert codes >= {"malformed", "too-large", "out-of-state", "version",
                     "unsupported", "quota", "bad-pages", "digest"}


def test_every_message_type_appears_valid():
    seen = {e["type"] for v in VECTORS for s in v["steps"]
            for e in s.get("expect", []) + ([s["send"]] if "send" in s else [])}
    from migrated.wire import MESSAGE_TYPES
    assert {t.type_name for t in MESSAGE_TYPES} <= seen
