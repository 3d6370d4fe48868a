"""The manifest as commit builds it, inside the freeze: the mapping records
(runs cut per mapping, all mappings at once) and the sealed file (digest
and text from one encoding of each record).  Both are held to the plain,
slow definitions they replace."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from migrated.image import manifest as mf
from migrated.runs import PAGE_SIZE, PageRuns

P = PAGE_SIZE
KINDS = ["anon", "file", "shared-file", "vdso", "skip"]


def _runs_inside(runs: PageRuns, start: int, end: int) -> list[list]:
    """The obvious definition: intersect with the range, per range."""
    part = runs.intersect(PageRuns.from_range(start, end))
    return mf.runs_to_json(part.starts, part.counts)


@st.composite
def layouts_and_runs(draw):
    """Mappings that may touch each other (a run then spans both), with
    gaps and non-migrating kinds between, and page runs: inside the
    migrating ones as commit has them (runs that cross from one mapping
    into its neighbour included), or anywhere."""
    layout, cursor = [], 0x10000
    for _ in range(draw(st.integers(0, 12))):
        cursor += draw(st.sampled_from([0, 0, 1, 7])) * P           # often adjacent
        npages = draw(st.integers(1, 40))
        kind = draw(st.sampled_from(KINDS))
        layout.append({"start": cursor, "end": cursor + npages * P, "perms": "rw-p",
                       "offset": 0, "kind": kind, "path": ""})
        cursor += npages * P
    moving = mf.migratable_runs(mf.normalize_layout(layout))
    anywhere = draw(st.booleans())

    def some_runs():
        picks = draw(st.lists(st.tuples(st.integers(0, 1 << 12), st.integers(1, 60)),
                              max_size=15))
        base = PageRuns.from_pairs([(0x10000 + a * P, n) for a, n in picks]) \
            if picks else PageRuns.empty()
        return base if anywhere else base.intersect(moving)
    return mf.normalize_layout(layout), some_runs(), some_runs()


@settings(max_examples=300, deadline=None)
@given(layouts_and_runs())
def test_mapping_records_cut_runs_as_intersecting_each_mapping_would(case):
    layout, data, zero = case
    records = mf.mapping_records(layout, data, zero)
    assert [r["start"] for r in records] == [f"{m['start']:#x}" for m in layout]
    for rec, mp in zip(records, layout):
        assert rec["end"] == f"{mp['end']:#x}" and rec["offset"] == f"{mp['offset']:#x}"
        assert rec["kind"] == mp["kind"] and rec["perms"] == mp["perms"]
        assert rec["migrates"] == (mp["kind"] in mf.MIGRATABLE_KINDS)
        if rec["migrates"]:
            assert rec["data"] == _runs_inside(data, mp["start"], mp["end"])
            assert rec["zero"] == _runs_inside(zero, mp["start"], mp["end"])
        else:
            assert "data" not in rec and "zero" not in rec


def test_a_run_across_three_adjacent_mappings_is_cut_at_both_seams():
    lay = mf.normalize_layout([
        {"start": 0x1000, "end": 0x3000, "perms": "r--p", "kind": "anon"},
        {"start": 0x3000, "end": 0x4000, "perms": "rw-p", "kind": "anon"},
        {"start": 0x4000, "end": 0x9000, "perms": "r--p", "kind": "anon"}])
    data = PageRuns.from_pairs([(0x2000, 4)])           # 0x2000-0x6000
    recs = mf.mapping_records(lay, data, PageRuns.empty())
    assert [r["data"] for r in recs] == [[["0x2000", 1]], [["0x3000", 1]], [["0x4000", 2]]]
    assert all(r["zero"] == [] for r in recs)


def _old_file(man: dict) -> bytes:
    """The file as it was written before seal_manifest: json's encoder
    per record, default separators."""
    enc = json.JSONEncoder(sort_keys=True, allow_nan=False).encode
    lines = []
    for key in sorted(man):
        value = man[key]
        if key in ("mappings", "chunks") and isinstance(value, list) and value:
            inner = ",\n".join("  " + enc(item) for item in value)
            lines.append(f" {enc(key)}: [\n{inner}\n ]")
        else:
            lines.append(f" {enc(key)}: {enc(value)}")
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                      st.floats(allow_nan=False, allow_infinity=False), text)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(text, json_value, max_size=4),
       st.lists(st.dictionaries(text, json_value, max_size=5), max_size=5),
       st.lists(st.dictionaries(text, json_value, max_size=3), max_size=5))
def test_sealed_manifest_digest_and_file_are_those_of_the_plain_encodings(meta, maps, chunks):
    man = {"format": mf.FORMAT, "version": 1, "meta": meta, "mappings": maps,
           "chunks": chunks, "digest": "stale"}
    digest, blob = mf.seal_manifest(man)
    assert man["digest"] == digest
    assert digest == mf.image_digest(man)        # canonical json.dumps of the body
    assert blob == _old_file(man)
    assert json.loads(blob) == man


def test_seal_refuses_what_json_refuses():
    for bad in (float("nan"), {1: object()}, object()):
        with pytest.raises((ValueError, TypeError)):
            mf.seal_manifest({"meta": bad, "mappings": [], "chunks": []})
