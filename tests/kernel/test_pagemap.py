"""pagemap.py on real children: exact present sets, pread vs PAGEMAP_SCAN.

Soft-dirty is not tested here: the host kernel has no CONFIG_MEM_SOFT_DIRTY
(bit 55 means nothing); the lab VM tests cover it.
"""

import numpy as np
import pytest

from migrated.errors import NoSuchProcess
from migrated.kernel import pagemap as pm_mod
from migrated.kernel.maps import read_layout
from migrated.kernel.pagemap import (PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT,
                                     Pagemap, is_exclusive, is_file, is_present)
from migrated.runs import PAGE_SIZE, PageRuns

P = PAGE_SIZE
WRITTEN = [(0, 3), (10, 1), (20, 10), (63, 1)]   # (first page, count)


def runs_of(target, name, pairs):
    return PageRuns.from_pairs([(target.addr(name, f), n) for f, n in pairs])


def both(pm, *m, **kw):
    """present_runs via pread, and via PAGEMAP_SCAN when the kernel has it;
    assert they agree, return the answer."""
    a = pm.present_runs(*m, **kw)
    if pm.has_scan:
        assert pm.present_runs_scan(*m, **kw) == a
    return a


@pytest.fixture
def pattern(target):
    target.map("a", 64, guard=True)
    for first, count in WRITTEN:
        target.write("a", first, count)
    return target


def test_read_words_known_pattern(pattern):
    t = pattern
    with Pagemap(t.pid) as pm:
        words = pm.read(*t.range("a"))
    assert words.dtype == np.uint64 and words.shape == (64,)
    want = runs_of(t, "a", WRITTEN).to_mask(t.addr("a"), 64)
    assert np.array_equal(is_present(words), want)
    assert not is_file(words).any()
    assert is_exclusive(words)[want].all()   # private pages mapped once


def test_present_runs_exact_and_scan_agrees(pattern):
    t = pattern
    layout = read_layout(t.pid)
    m = layout.find(t.addr("a"))
    assert (m.start, m.end) == t.range("a")
    with Pagemap(t.pid) as pm:
        assert pm.has_scan, "this kernel (6.7+) should have PAGEMAP_SCAN"
        assert both(pm, m) == runs_of(t, "a", WRITTEN)
        assert both(pm, *t.range("a")) == runs_of(t, "a", WRITTEN)


def test_dontneed_drops_pages(pattern):
    t = pattern
    t.dontneed("a", 22, 5)
    with Pagemap(t.pid) as pm:
        got = both(pm, *t.range("a"))
    assert got == runs_of(t, "a", [(0, 3), (10, 1), (20, 2), (27, 3), (63, 1)])


def test_read_fault_maps_zero_page(target):
    target.map("z", 8, guard=True)
    target.touch("z", 2, 3)   # read faults map the shared zero page
    with Pagemap(target.pid) as pm:
        assert both(pm, *target.range("z")) == runs_of(target, "z", [(2, 3)])
        if pm.has_scan:
            zero = pm.scan(*target.range("z"), PAGE_IS_PFNZERO)
            assert zero == runs_of(target, "z", [(2, 3)])


def test_private_file_only_written_pages(target, tmp_path):
    path = tmp_path / "data file.bin"
    path.write_bytes(b"\x01" * 8 * P)
    target.map_file("f", str(path), 8)
    target.touch("f")                 # all 8 pages now page-cache pages
    target.write("f", 2, 2)           # COW: pages 2, 3 are anonymous now
    m = read_layout(target.pid).find(target.addr("f"))
    assert m.kind == "file"
    with Pagemap(target.pid) as pm:
        assert both(pm, m) == runs_of(target, "f", [(2, 2)])
        assert both(pm, m, exclude_file_pages=False) == runs_of(target, "f", [(0, 8)])
        words = pm.read(m.start, m.end)
        assert is_file(words).sum() == 6
        if pm.has_scan:
            r = pm.scan_regions(m.start, m.end, PAGE_IS_PRESENT,
                                return_mask=PAGE_IS_PRESENT | PAGE_IS_FILE)
            assert [(int(s), int(e), int(c)) for s, e, c in zip(*r)] == [
                (m.start, m.start + 2 * P, PAGE_IS_PRESENT | PAGE_IS_FILE),
                (m.start + 2 * P, m.start + 4 * P, PAGE_IS_PRESENT),
                (m.start + 4 * P, m.end, PAGE_IS_PRESENT | PAGE_IS_FILE)]


@pytest.mark.parametrize("kind", ["shared", "memfd"])
def test_shared_anon_pages_not_excluded(target, kind):
    target.map("s", 8, kind)
    target.write("s", 1, 3)
    m = read_layout(target.pid).find(target.addr("s"))
    assert m.kind == "shared-anon"
    with Pagemap(target.pid) as pm:
        assert is_file(pm.read(m.start, m.end)).sum() == 3   # shmem pages carry bit 61
        assert both(pm, m) == runs_of(target, "s", [(1, 3)])


def test_whole_layout_both_paths_agree(pattern):
    t = pattern
    layout = read_layout(t.pid)
    with Pagemap(t.pid) as pm:
        if not pm.has_scan:
            pytest.skip("no PAGEMAP_SCAN on this kernel")
        for m in layout.migratable():
            assert pm.present_runs_scan(m) == pm.present_runs(m), str(m)
        total = pm.present_in(layout)
    assert total.contains(runs_of(t, "a", WRITTEN))


def test_scan_loops_when_vector_fills(target):
    target.map("b", 200, guard=True)
    pairs = [(i, 1) for i in range(0, 200, 2)]    # 100 separate runs
    for f, n in pairs:
        target.fill("b", f, n, 7)
    with Pagemap(target.pid, scan_vec_len=7) as pm:
        if not pm.has_scan:
            pytest.skip("no PAGEMAP_SCAN on this kernel")
        want = runs_of(target, "b", pairs)
        assert pm.scan(*target.range("b"), PAGE_IS_PRESENT) == want
        assert pm.present_runs_scan(*target.range("b")) == want
        first10 = pm.scan(*target.range("b"), PAGE_IS_PRESENT, max_pages=10)
        assert first10 == runs_of(target, "b", pairs[:10])


def test_read_chunks_large_ranges(target, monkeypatch):
    target.map("c", 40, guard=True)
    target.write("c", 5, 30)
    monkeypatch.setattr(pm_mod, "MAX_READ_PAGES", 7)   # force several preads
    with Pagemap(target.pid) as pm:
        assert pm.present_runs(*target.range("c")) == runs_of(target, "c", [(5, 30)])
        assert pm.read(*target.range("c")).size == 40
        # soft-dirty: only the plumbing here (no CONFIG_MEM_SOFT_DIRTY on the
        # host; the lab VM tests the semantics)
        pm_mod.clear_soft_dirty(target.pid)
        sd = pm.soft_dirty_runs(*target.range("c"))
        assert runs_of(target, "c", [(5, 30)]).contains(sd)


def test_unaligned_range_rejected(target):
    with Pagemap(target.pid) as pm:
        with pytest.raises(ValueError):
            pm.read(1, P)


def test_gone_process(target):
    pid = target.pid
    target.close()
    with pytest.raises(NoSuchProcess, match=str(pid)):
        Pagemap(pid)


def test_process_exits_with_pagemap_open(target):
    target.map("a", 4, guard=True)
    target.write("a")
    pm = Pagemap(target.pid)
    try:
        start, end = target.range("a")
        target.close()
        # the mm is gone: reads return nothing and become NoSuchProcess
        with pytest.raises(NoSuchProcess):
            pm.read(start, end)
    finally:
        pm.close()
