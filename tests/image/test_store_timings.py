"""meta["timings"]: the destination engine's figures, merged at commit,
recorded in the manifest, bounded, never a reason to fail a commit."""

from __future__ import annotations

import json

import pytest

from migrated.errors import ImageError
from migrated.image import manifest as mf

from .conftest import mapping, write_pattern

M = 0x10000000


def _writer(store, meta=None):
    w = store.begin(meta or {"pid": 1}, 0)
    w.set_layout([mapping(M, 4)])
    write_pattern(w, M, 4, 1)
    return w


def _round(i: int) -> dict:
    return {"round": i, "pages": 123456, "bytes": 505675776, "duration_ms": 1234.567,
            "dirty_rate": 123456.7, "bandwidth": 987654321.5, "pause_ms": 0.125}


def test_timings_are_recorded_in_the_manifest(store):
    timings = {"rounds": [_round(i) for i in range(31)], "rounds_total": 31,
               "rounds_left_out": 0, "receive_ms": 1500.25, "frozen_receive_ms": 40.5,
               "bytes_received": 1 << 30}
    image_id, _ = _writer(store).commit({"migration_id": "m", "timings": timings})
    meta = store.show(image_id)["meta"]
    assert meta["timings"] == timings and meta["migration_id"] == "m"
    assert store.verify(image_id).ok


def test_oversized_timings_are_cut_not_refused(store):
    # Far more rounds than the engine keeps: the commit still succeeds, the
    # manifest keeps the first rounds that fit and says it was cut.
    rounds = [_round(i) for i in range(5000)]
    image_id, _ = _writer(store).commit({"timings": {"rounds": rounds, "receive_ms": 5.0}})
    t = store.show(image_id)["meta"]["timings"]
    assert t["truncated"] is True and t["receive_ms"] == 5.0
    assert 0 < len(t["rounds"]) < 5000 and t["rounds"] == rounds[:len(t["rounds"])]
    assert len(json.dumps(t)) <= mf.MAX_META_TIMINGS_BYTES
    assert store.verify(image_id).ok


def test_timings_with_no_list_to_cut_keep_their_numbers(store):
    image_id, _ = _writer(store).commit({"timings": {"blob": "x" * 200_000, "total_ms": 3}})
    assert store.show(image_id)["meta"]["timings"] == {"truncated": True, "total_ms": 3}


def test_timings_fit_next_to_the_largest_metadata_begin_accepts(store):
    # begin() takes up to MAX_META_BYTES of metadata: timings on top of it
    # must not make the commit fail as "too large".
    big = {"pid": 1, "cmdline": ["a" * 130_000], "exe": "/bin/x",
           "options": {f"o{i}": "v" * 4000 for i in range(32)}}
    size = len(json.dumps(big, sort_keys=True))
    assert mf.MAX_META_BYTES - 20_000 < size <= mf.MAX_META_BYTES
    w = _writer(store, big)
    image_id, _ = w.commit({"timings": {"rounds": [_round(i) for i in range(128)]}})
    assert len(store.show(image_id)["meta"]["timings"]["rounds"]) == 128


@pytest.mark.parametrize("bad", ["slow", [1, 2], 5])
def test_timings_must_be_an_object(store, bad):
    w = _writer(store)
    with pytest.raises(ImageError, match="timings"):
        w.prepare({"timings": bad})
    assert w.state == "open"          # refused before anything was sealed
    w.abort()


def test_clip_timings_bounds():
    t = {"rounds": list(range(10_000)), "n": 1}
    cut, was = mf.clip_timings(t, limit=1000)
    assert was and len(json.dumps(cut, sort_keys=True)) <= 1000
    assert cut["rounds"] == list(range(len(cut["rounds"])))
    same, was = mf.clip_timings({"n": 1}, limit=1000)
    assert same == {"n": 1} and not was
