"""Dirty trackers on real child processes.

Every behavioural test runs for both trackers: ``digest`` on the host, and
``soft-dirty`` marked ``lab`` (it needs CONFIG_MEM_SOFT_DIRTY, so it runs in
the lab VM: tests/lab/run.py).  Test regions are guarded (PROT_NONE page on
each side) and smaller than 2 MiB, so they never merge with a neighbour
and never get a transparent huge page: the dirty sets there are exact.

``MiniEngine`` does with a tracker what the source engine does, with a
dict of pages standing in for the destination; its ``verify`` checks the
invariant that matters: after the final frozen collect, what was sent
(minus what was dropped) equals the target's memory, page for page.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import numpy as np
import pytest

from migrated.errors import KernelUnsupported, MigratedError, NoSuchProcess
from migrated.kernel import probe as kprobe
from migrated.kernel.freezer import Freezer
from migrated.kernel.maps import read_layout
from migrated.kernel.pagemap import Pagemap
from migrated.kernel.reader import MemReader
from migrated.kernel.trackers import (Collected, DigestTracker, PageDigests, make_tracker,
                                      page_digests, runs_from_addrs)
from migrated.runs import PAGE_SIZE, PageRuns
from tests.target import TargetError

P = PAGE_SIZE

TRACKERS = [
    pytest.param("digest", id="digest"),
    pytest.param("uffd-wp", id="uffd-wp",
                 marks=pytest.mark.skipif(not kprobe.cached_probe().get("uffd_wp_tracker"),
                                          reason="uffd-wp unavailable on this kernel")),
    pytest.param("soft-dirty", id="soft-dirty", marks=pytest.mark.lab),
]


def pages(target, name, *spans) -> PageRuns:
    """Runs of region ``name`` for (first, count) spans."""
    return PageRuns.from_pairs([(target.addr(name, f), n) for f, n in spans])


def region(target, name) -> tuple[int, int]:
    return target.range(name)


class MiniEngine:
    """The engine's use of a tracker, with a page dict as destination."""

    def __init__(self, tracker, pid: int):
        self.tracker = tracker
        self.pid = pid
        self.reader = MemReader(pid)
        self.mirror: dict[int, bytes] = {}
        self.rounds: list[Collected] = []

    def send(self, c: Collected, *, skip: PageRuns | None = None) -> None:
        """Apply a collect: forget dropped pages, send dirty ones (minus
        ``skip``: pages we pretend failed to send)."""
        for a in c.dropped.page_addresses().tolist():
            self.mirror.pop(a, None)
        todo = c.dirty.subtract(skip) if skip is not None else c.dirty
        for chunk in self.reader.read(todo):
            data = bytes(chunk.data)
            for i, a in enumerate(chunk.runs.page_addresses().tolist()):
                self.mirror[a] = data[i * P:(i + 1) * P]
            self.tracker.sent(chunk.runs, chunk.data)
        self.rounds.append(c)

    def start(self) -> Collected:
        c = self.tracker.start(read_layout(self.pid))
        self.send(c)
        return c

    def round(self, **kw) -> Collected:
        c = self.tracker.collect(read_layout(self.pid))
        self.send(c, **kw)
        return c

    def _zero_anon(self, layout, addrs: set[int]) -> set[int]:
        """Those of ``addrs`` in private anonymous mappings that read as
        zeros.  Never sent, such a page is a zero page at the destination
        too: the same memory.  (khugepaged fills the holes of a 2 MiB block
        with zero pages when it collapses it, even while the target is
        stopped: seen once in the lab, 17 pages of the target's heap.)"""
        anon = PageRuns.concat([m.runs() for m in layout if m.kind == "anon"])
        todo = runs_from_addrs(np.array(sorted(addrs), np.uint64)).intersect(anon)
        zero = set()
        for chunk in self.reader.read(todo):
            data = np.frombuffer(chunk.data, np.uint8).reshape(-1, P)
            zero.update(chunk.runs.page_addresses()[~data.any(axis=1)].tolist())
        return zero

    def verify(self) -> None:
        """Target must be frozen.  Mirror == memory over every present page
        of every migratable mapping, and the mirror holds nothing else."""
        layout = read_layout(self.pid)
        with Pagemap(self.pid) as pm:
            present = pm.present_in(layout)
        addrs = present.page_addresses().tolist()
        extra = set(self.mirror) - set(addrs)
        assert not extra, (f"{len(extra)} pages kept that the target no longer has, "
                           f"e.g. {sorted(extra)[:3]}")
        missing = set(addrs) - set(self.mirror)
        zero = self._zero_anon(layout, missing) if missing else set()
        missing -= zero
        assert not missing, (f"{len(missing)} present pages never sent, "
                             f"e.g. {[hex(a) for a in sorted(missing)[:3]]}")
        bad = []
        blank = bytes(P)
        for chunk in self.reader.read(present):
            assert not chunk.failed
            data = bytes(chunk.data)
            for i, a in enumerate(chunk.runs.page_addresses().tolist()):
                # A page never sent is one of the zero pages just found.
                if self.mirror.get(a, blank) != data[i * P:(i + 1) * P]:
                    bad.append(a)
        assert not bad, (f"{len(bad)} pages differ from what was sent (lost writes), "
                         f"e.g. {[hex(a) for a in bad[:3]]}")


@pytest.fixture(params=TRACKERS)
def kind(request):
    return request.param


# The target imports numpy on its first `write`: seconds under the lab VM's
# software emulation, more than Target's default reply timeout when the
# machine is busy.  One warm-up write with this timeout pays it up front.
WARMUP_TIMEOUT_S = 300


@pytest.fixture
def setup(kind, target):
    """(target, freezer, tracker, engine); everything closed afterwards and
    the target never left stopped."""
    target.map("warmup", 1, guard=True)
    target.cmd("write", "warmup", 0, 1, 1, timeout=WARMUP_TIMEOUT_S)
    fz = Freezer(target.pid)
    tr = make_tracker(kind, target.pid, fz)
    eng = MiniEngine(tr, target.pid)
    try:
        yield target, fz, tr, eng
    finally:
        tr.close()
        fz.close()


def final_round(fz, eng) -> Collected:
    fz.freeze()
    try:
        c = eng.round()
        assert c.pause_ms == 0.0          # the caller's freeze, not ours
        assert fz.verify_frozen()          # the tracker did not thaw it
        eng.verify()
        return c
    finally:
        fz.thaw()


# -- behaviour, both trackers ---------------------------------------------------------


def test_start_reports_everything_present(setup, kind):
    t, fz, tr, eng = setup
    t.map("a", 64, guard=True)
    t.write("a", 0, 10)
    t.write("a", 40, 5)
    c = eng.start()
    assert tr.name == kind
    a0, a1 = region(t, "a")
    assert c.dirty.clip(a0, a1) == pages(t, "a", (0, 10), (40, 5))
    assert not c.dropped
    final_round(fz, eng)


def test_exact_dirty_set(setup):
    t, fz, tr, eng = setup
    t.map("a", 200, guard=True)
    t.write("a", 0, 200, seed=1)
    eng.start()
    a0, a1 = region(t, "a")
    c = eng.round()
    assert not c.dirty.clip(a0, a1), "nothing written: nothing dirty in the region"
    t.write("a", 3, 1, seed=2)
    t.write("a", 7, 1, seed=2)
    t.write("a", 100, 51, seed=2)
    c = eng.round()
    assert c.dirty.clip(a0, a1) == pages(t, "a", (3, 1), (7, 1), (100, 51))
    assert not c.dropped.clip(a0, a1)
    if tr.name == "soft-dirty":
        assert c.pause_ms > 0              # it stopped the target itself
    else:
        assert c.pause_ms == 0.0
    c = eng.round()
    assert not c.dirty.clip(a0, a1), "reset after collect: nothing new"
    final_round(fz, eng)


def test_dropped_after_dontneed_and_munmap(setup):
    t, fz, tr, eng = setup
    t.map("a", 64, guard=True)
    t.map("b", 16, guard=True)
    t.write("a", 0, 64)
    t.write("b", 0, 16)
    eng.start()
    t.dontneed("a", 10, 5)
    t.unmap("a", 60, 4)        # the tail: munmap inside a mapping
    b0, b1 = region(t, "b")
    t.unmap("b")
    c = eng.round()
    a0 = t.addr("a")
    assert c.dropped.clip(a0, a0 + 64 * P) == pages(t, "a", (10, 5), (60, 4))
    assert c.dropped.clip(b0, b1) == PageRuns.from_range(b0, b1)
    assert not c.dirty.clip(a0, a0 + 64 * P)
    assert not c.dirty.clip(b0, b1)
    final_round(fz, eng)


def test_dontneed_then_read_fault_is_dirty(setup):
    """MADV_DONTNEED then a read maps the zero page: no write, no soft-dirty
    bit, yet the content changed to zeros -- it must be resent (or
    dropped), never kept stale."""
    t, fz, tr, eng = setup
    t.map("a", 32, guard=True)
    t.write("a", 0, 32)
    eng.start()
    t.dontneed("a", 20, 2)
    t.touch("a", 20, 2)
    c = eng.round()
    a0, a1 = region(t, "a")
    stale = pages(t, "a", (20, 2))
    assert c.dirty.clip(a0, a1).union(c.dropped.clip(a0, a1)) == stale
    final_round(fz, eng)


def test_private_file_mapping_sends_only_the_targets_copies(setup, tmp_path):
    """Plain page-cache pages of a private file mapping are the file's
    (the destination has the file): never sent.  The pages the target
    wrote are its copies: sent.  A copy dropped again with MADV_DONTNEED
    reads as the file once more and must not stay at the destination --
    also when that happens right before the freeze.  (Under uffd-wp the
    dropped copy leaves a marker that reads as swapped.)"""
    t, fz, tr, eng = setup
    path = tmp_path / "backing"
    path.write_bytes(bytes(range(256)) * (16 * P // 256))
    t.map_file("f", str(path), 16)
    f = region(t, "f")
    t.touch("f", 0, 8)                       # page cache, mapped by reads
    t.write("f", 2, 2, seed=3)               # copies on write
    assert eng.start().dirty.clip(*f) == pages(t, "f", (2, 2))
    t.touch("f", 8, 4)                       # more page cache
    t.write("f", 12, 1, seed=4)              # a new copy
    t.write("f", 0, 1, seed=4)               # a copy of a page-cache page
    c = eng.round()
    assert c.dirty.clip(*f) == pages(t, "f", (0, 1), (12, 1))
    assert not c.dropped.clip(*f)
    t.dontneed("f", 2, 1)
    c = eng.round()
    assert c.dropped.clip(*f) == pages(t, "f", (2, 1))
    assert not c.dirty.clip(*f)
    t.touch("f", 2, 1)                       # the file's page again
    c = eng.round()
    assert not c.dirty.clip(*f) and not c.dropped.clip(*f)
    t.dontneed("f", 12, 1)
    c = final_round(fz, eng)
    assert c.dropped.clip(*f) == pages(t, "f", (12, 1))


@pytest.mark.parametrize("mem", ["shared", "memfd"])
def test_hole_punched_in_shared_memory_is_not_kept(setup, mem):
    """MADV_REMOVE frees shared memory: the pages read as zeros from then
    on, and nothing wrote them through the page table.  They must be sent
    again or dropped, never kept -- also right before the freeze."""
    t, fz, tr, eng = setup
    t.map("s", 16, mem)
    t.write("s", 0, 16, seed=2)
    eng.start()
    s = region(t, "s")
    t.advise("s", 3, 2, "remove")
    c = eng.round()
    assert not pages(t, "s", (3, 2)).subtract(c.dirty.union(c.dropped))
    t.advise("s", 12, 1, "remove")
    c = final_round(fz, eng)
    assert not pages(t, "s", (12, 1)).subtract(c.dirty.union(c.dropped))


def test_lazily_freed_pages_reclaimed(setup):
    """MADV_FREE then reclaim (MADV_PAGEOUT) discards the pages: they read
    as zeros though nothing wrote them.  Whatever the tracker makes of it
    (dropped, or sent again), the destination must not keep the old bytes;
    and a page written again after MADV_FREE keeps its new content."""
    t, fz, tr, eng = setup
    t.map("a", 16, guard=True)
    t.write("a", 0, 16, seed=2)
    eng.start()
    t.advise("a", 4, 4, "free")
    t.write("a", 6, 1, seed=3)               # cancels the free of this one
    t.advise("a", 4, 4, "pageout")
    c = eng.round()
    a = region(t, "a")
    assert not pages(t, "a", (4, 2), (7, 1)).subtract(c.dirty.union(c.dropped).clip(*a))
    assert c.dirty.clip(*a).contains(pages(t, "a", (6, 1)))
    t.advise("a", 10, 2, "free")
    t.advise("a", 10, 2, "pageout")          # right before the freeze
    final_round(fz, eng)


def test_huge_page_collapse(setup):
    """khugepaged (here MADV_COLLAPSE) copies a 2 MiB block into one huge
    page and fills its holes with zero pages.  The memory is the same; what
    was sent must still equal it, and a write after it is not lost."""
    t, fz, tr, eng = setup
    t.map("h", 1024)                         # holds one 2 MiB-aligned block
    block = 2 << 20
    k = (-t.addr("h") % block) // P          # its first page in the region
    for i in range(0, 512, 16):
        t.write("h", k + i, 1, seed=1)       # 32 pages, 480 holes
    eng.start()
    try:
        t.advise("h", k, 512, "collapse")
    except TargetError as e:
        # uffd-wp: the kernel does not collapse write-protected entries.
        assert tr.name == "uffd-wp", e
    t.write("h", k + 5, 1, seed=2)
    eng.round()
    t.write("h", k + 300, 1, seed=3)
    final_round(fz, eng)


def test_mremap_dontunmap(setup):
    """MREMAP_DONTUNMAP moves the pages to a new range and leaves the old
    one mapped but empty (zeros from then on): the old pages are dropped
    (or resent as zeros), the new ones sent, nothing kept stale."""
    t, fz, tr, eng = setup
    t.map("m", 16, guard=True)
    t.write("m", 0, 16, seed=5)
    eng.start()
    old = region(t, "m")
    new = t.remap("m", 16, move="dontunmap")
    c = eng.round()
    assert not PageRuns.from_range(*old).subtract(c.dropped.union(c.dirty))
    assert c.dirty.clip(new, new + 16 * P) == PageRuns.from_range(new, new + 16 * P)
    t.write("m", 3, 1, seed=6)
    final_round(fz, eng)


def test_vma_churn_between_rounds(setup):
    t, fz, tr, eng = setup
    t.map("keep", 32, guard=True)
    t.map("gone", 16, guard=True)
    t.map("grow", 16)
    t.write("keep", 0, 32)
    t.write("gone", 0, 16)
    t.write("grow", 0, 16)
    eng.start()
    old_grow = region(t, "grow")
    gone = region(t, "gone")
    t.unmap("gone")
    t.map("new", 24, guard=True)
    t.write("new", 2, 10, seed=5)
    t.remap("grow", 48)                 # grow (in place or moved)
    t.write("grow", 40, 8, seed=6)
    c = eng.round()
    assert c.dropped.clip(*gone) == PageRuns.from_range(*gone)
    assert not c.dirty.clip(*gone)
    assert c.dirty.contains(pages(t, "new", (2, 10)))
    assert c.dirty.contains(pages(t, "grow", (40, 8)))
    n0, n1 = region(t, "new")
    if tr.name == "digest":
        # Content based: exactly the written pages, wherever they sit.
        assert c.dirty.clip(n0, n1) == pages(t, "new", (2, 10))
        assert not c.dirty.clip(*region(t, "keep"))
        if t.addr("grow") == old_grow[0]:
            assert c.dirty.clip(*region(t, "grow")) == pages(t, "grow", (40, 8))
    else:
        # The kernel marks a new VMA wholly soft-dirty: a documented superset,
        # but only present pages are ever reported.
        assert c.dirty.clip(n0, n1) == pages(t, "new", (2, 10))
        assert not c.dirty.clip(*region(t, "keep"))
    if t.addr("grow") != old_grow[0]:   # moved: the old place is gone
        old = PageRuns.from_range(*old_grow).subtract(PageRuns.from_range(*region(t, "grow")))
        assert c.dropped.contains(old)
    final_round(fz, eng)


def test_unsent_pages_are_reported_again(setup):
    t, fz, tr, eng = setup
    t.map("a", 64, guard=True)
    t.write("a", 0, 64)
    c = tr.start(read_layout(t.pid))
    skipped = pages(t, "a", (8, 8))
    eng.send(c, skip=skipped)            # pretend those failed to send
    c = eng.round()
    a0, a1 = region(t, "a")
    assert c.dirty.clip(a0, a1) == skipped
    final_round(fz, eng)


def test_caller_frozen_collect_does_not_thaw(setup):
    t, fz, tr, eng = setup
    t.map("a", 16, guard=True)
    t.write("a", 0, 16)
    eng.start()
    t.write("a", 5, 2, seed=9)
    c = final_round(fz, eng)
    a0, a1 = region(t, "a")
    assert c.dirty.clip(a0, a1) == pages(t, "a", (5, 2))


def test_continuous_writer_loses_nothing(setup):
    """A target writing flat out while rounds run: every write is caught by
    some round, and after the final frozen round mirror == memory."""
    t, fz, tr, eng = setup
    # The writer stores (i & 0xFF) into page i % n: with n prime to 256 each
    # lap writes new values (n = 256 would rewrite identical bytes forever).
    n = 251
    t.map("hot", n, guard=True)
    t.write("hot", 0, n)
    t.spin("hot")
    try:
        eng.start()
        caught = 0
        for _ in range(3):
            time.sleep(0.05)
            c = eng.round()
            caught += c.dirty.clip(*region(t, "hot")).total_pages()
        assert caught > 0, "the live rounds saw none of the writer's pages"
        final_round(fz, eng)
    finally:
        written = t.stop_spin("hot")
    assert written > n, "the writer did not even lap the region once"


@pytest.mark.parametrize("how", ["exit", "zombie"])
def test_pid_exits_mid_round(setup, how):
    t, fz, tr, eng = setup
    t.map("a", 8, guard=True)
    t.write("a", 0, 8)
    layout = read_layout(t.pid)
    eng.start()
    if how == "exit":
        t.exit(0)                        # exits and is reaped
    else:
        os.kill(t.pid, signal.SIGKILL)   # exits, not reaped: a zombie
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{t.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
    with pytest.raises(NoSuchProcess) as ei:
        tr.collect(layout)
    assert str(t.pid) in str(ei.value)
    assert ei.value.pid == t.pid


def test_new_tracker_on_gone_pid(kind, target):
    pid = target.pid
    target.exit(0)
    with pytest.raises(NoSuchProcess):
        make_tracker(kind, pid).start(read_layout(os.getpid()))


# -- host facts and the factory --------------------------------------------------------


def _host_has_soft_dirty() -> bool:
    return kprobe.cached_probe()["soft_dirty"]


def test_auto_picks_by_probe(target):
    want = kprobe.cached_probe()["trackers_available"][0]
    with make_tracker("auto", target.pid) as tr:
        assert tr.name == want


def test_forced_soft_dirty_refused_without_kernel_support(target):
    if _host_has_soft_dirty():
        pytest.skip("this kernel has soft-dirty")
    with pytest.raises(KernelUnsupported) as ei:
        make_tracker("soft-dirty", target.pid)
    msg = str(ei.value)
    assert "soft-dirty" in msg and "digest" in msg and os.uname().release in msg


def test_unknown_tracker_name(target):
    with pytest.raises(MigratedError, match="unknown tracker 'bogus'"):
        make_tracker("bogus", target.pid)


def test_digest_sent_size_mismatch(target):
    t = target
    t.map("a", 4, guard=True)
    with DigestTracker(t.pid) as tr:
        tr.start(read_layout(t.pid))
        with pytest.raises(ValueError):
            tr.sent(pages(t, "a", (0, 2)), bytes(P))


# -- digest internals -------------------------------------------------------------------


def test_single_word_change_always_changes_digest():
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2**64, size=512, dtype=np.uint64)
    # One page per (word position, delta): every position, several deltas
    # including the top bit alone and the lowest bit alone.
    deltas = np.array([1, 1 << 63, 0xFFFFFFFFFFFFFFFF, 1 << 32, 12345], np.uint64)
    pos = np.repeat(np.arange(512), deltas.size)
    pages_ = np.tile(base, (pos.size, 1))
    pages_[np.arange(pos.size), pos] ^= np.tile(deltas, 512)
    d0 = page_digests(base.tobytes())
    d = page_digests(pages_.tobytes())
    assert (d != d0).any(axis=1).all()
    assert (d[:, 0] != d0[0, 0]).all(), "the linear lane alone must catch one word"


def test_two_top_bit_flips_change_digest():
    base = np.arange(512, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    i, j = np.triu_indices(512, 1)
    sel = np.random.default_rng(3).choice(i.size, 4000, replace=False)
    pages_ = np.tile(base, (sel.size, 1))
    rows = np.arange(sel.size)
    top = np.uint64(1 << 63)
    pages_[rows, i[sel]] ^= top
    pages_[rows, j[sel]] ^= top      # sign flip of two doubles
    d0 = page_digests(base.tobytes())
    assert (page_digests(pages_.tobytes()) != d0).any(axis=1).all()


def test_half_word_constants_never_cancel_in_pairs():
    """Two top-bit flips (lane 0 is blind) cancel in lane 1 only if two
    constants are equal or opposite mod 2^33: none are."""
    from migrated.kernel.trackers import K_HALF, K_WORD
    assert (K_WORD & np.uint64(1)).all() and (K_HALF & np.uint64(1)).all()
    m = K_HALF & np.uint64((1 << 33) - 1)
    neg = (np.uint64(1 << 33) - m) & np.uint64((1 << 33) - 1)
    assert np.unique(m).size == m.size
    assert not np.isin(neg, m).any()


def test_digest_deterministic_and_per_page():
    data = np.random.default_rng(1).integers(0, 255, size=5 * P, dtype=np.uint8).tobytes()
    a = page_digests(data)
    assert a.shape == (5, 2)
    assert np.array_equal(a, page_digests(data))
    assert np.array_equal(a[2], page_digests(data[2 * P:3 * P])[0])
    with pytest.raises(ValueError):
        page_digests(data[:-1])


def test_page_digests_store_merge_and_forget():
    s = PageDigests()
    a = np.array([0x1000, 0x3000, 0x5000], np.uint64)
    s.update(a, np.arange(6, dtype=np.uint64).reshape(3, 2))
    s.update(np.array([0x2000, 0x3000], np.uint64),
             np.array([[9, 9], [7, 7]], np.uint64))
    assert s.addrs.tolist() == [0x1000, 0x2000, 0x3000, 0x5000]
    found, d = s.lookup(np.array([0x3000, 0x4000], np.uint64))
    assert found.tolist() == [True, False] and d[0].tolist() == [7, 7]
    gone = s.keep_only(PageRuns.from_pairs([(0x1000, 2)]))
    assert gone.pairs() == [(0x3000, 1), (0x5000, 1)]
    assert s.addrs.tolist() == [0x1000, 0x2000]


def test_runs_from_addrs():
    a = np.array([0x1000, 0x2000, 0x3000, 0x8000, 0xa000, 0xb000], np.uint64)
    assert runs_from_addrs(a).pairs() == [(0x1000, 3), (0x8000, 1), (0xa000, 2)]
    assert not runs_from_addrs(np.empty(0, np.uint64))


def _direct_file(tmp_path, request, name: str, npages: int) -> str:
    """A file of ``npages`` pages of 0xa1, synced, on a filesystem with
    O_DIRECT (or skip); removed after the test.  The lab's /tmp (an overlay
    on tmpfs) has none: tests/lab/run.py names a directory that has (the
    one it shares with the VM)."""
    where = os.environ.get("MIGRATED_LAB_DIRECT_DIR") or str(tmp_path)
    path = os.path.join(where, f"{name}-{os.getpid()}.bin")
    request.addfinalizer(lambda: os.path.exists(path) and os.unlink(path))
    with open(path, "wb") as f:
        f.write(b"\xa1" * (npages * P))
        os.fsync(f.fileno())
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except (AttributeError, OSError):
        pytest.skip("no O_DIRECT on this filesystem")
    return path


def test_a_write_through_a_short_pin_is_not_lost(setup, tmp_path, request):
    """An O_DIRECT read pins the target's pages -- clearing their write
    protection -- before the disk writes into them.  A collect in between
    reports and re-protects them, the engine sends the old bytes, and the
    write then lands through the pin with no fault: uffd-wp never saw it
    again (129-2173 of 16384 pages lost in three of three runs).  The next
    collect compares what the last one reported with what was sent."""
    import urllib.parse
    t, fz, tr, eng = setup
    n = 64 * 256                                   # 64 MiB
    path = _direct_file(tmp_path, request, f"disk-{tr.name}", n)
    t.map("a", n, guard=True)
    t.fill("a", 0, n, 0x5A)
    eng.start()
    t.cmd("dread", "a", urllib.parse.quote(path))
    time.sleep(0.005)
    eng.round()                                    # the read in flight
    assert int(t.cmd("djoin", timeout=60)) == n * P
    final_round(fz, eng)                           # mirror == memory


@contextlib.contextmanager
def _slow_reads(pid: int, path: str, bytes_per_s: int):
    """Reads of ``pid`` from the disk holding ``path`` throttled to
    ``bytes_per_s`` (cgroup v1 blkio), or skip.  The cgroup is removed
    afterwards, the process moved back first."""
    root = "/sys/fs/cgroup/blkio"
    if not os.path.exists(f"{root}/blkio.throttle.read_bps_device"):
        pytest.skip("no cgroup v1 blkio throttling here")
    dev = os.stat(path).st_dev
    sysdev = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if os.path.exists(os.path.join(sysdev, "partition")):
        sysdev = os.path.dirname(sysdev)            # throttled at the whole disk
    with open(os.path.join(sysdev, "dev")) as f:
        disk = f.read().strip()
    group = f"{root}/migrated-test-{os.getpid()}-{pid}"
    os.mkdir(group)
    try:
        try:
            with open(f"{group}/blkio.throttle.read_bps_device", "w") as f:
                f.write(f"{disk} {bytes_per_s}")
        except OSError as e:
            pytest.skip(f"cannot throttle {disk}: {e}")
        with open(f"{group}/cgroup.procs", "w") as f:
            f.write(str(pid))
        yield
    finally:
        with open(f"{root}/cgroup.procs", "w") as f:
            try:
                f.write(str(pid))
            except OSError:
                pass                                 # gone already
        os.rmdir(group)


# Host trackers only: the lab VM has no blkio throttling to hold a read in
# flight (and soft-dirty keeps a pinned page dirty until it is unpinned:
# clear_refs leaves it alone).
@pytest.mark.parametrize("files", ["", "own"], ids=["shared-files", "own-files"])
@pytest.mark.parametrize("kind", [p for p in TRACKERS if p.id != "soft-dirty"])
def test_a_direct_read_in_flight_over_several_rounds_is_not_lost(setup, tmp_path, request,
                                                                 files):
    """A synchronous O_DIRECT read held in flight over several collects
    (its disk throttled to 8 MiB/s for the target): the pin made the pages
    look written once, at the first collect; the content re-check covers
    the next one only; the device writes the rest later, with no fault.
    A thread blocked in a read of an O_DIRECT file has its buffer counted
    written at every collect while it waits, and once after -- also when
    the thread reads through a file table of its own (``files``)."""
    import urllib.parse
    t, fz, tr, eng = setup
    n = 16 * 256                                   # 16 MiB: 2 s at 8 MiB/s
    path = _direct_file(tmp_path, request, f"long-{tr.name}", n)
    t.map("a", n, guard=True)
    t.fill("a", 0, n, 0x5A)
    eng.start()
    with _slow_reads(t.pid, path, 8 << 20):
        t.cmd("dread", "a", urllib.parse.quote(path), files)
        for _ in range(25):                        # 2.5 s: the read in flight
            eng.round()
            time.sleep(0.1)
        assert int(t.cmd("djoin", timeout=60)) == n * P
    final_round(fz, eng)                           # mirror == memory


def test_a_direct_read_from_a_threads_own_file_table_is_seen(target, tmp_path, request):
    """A thread may have a file table of its own (unshare(CLONE_FILES)):
    the fd in its /proc/PID/task/TID/syscall is one of that table, and
    looking it up in the process's (/proc/PID/fdinfo) found another file or
    none -- the read was not seen, and uffd-wp lost what the throttled disk
    wrote later (like the 3840 of 4096 pages before the look existed)."""
    import urllib.parse
    from migrated.kernel.pins import direct_reads_in_flight
    n = 4 * 256                                    # 4 MiB: 1 s at 4 MiB/s
    path = _direct_file(tmp_path, request, "ownfiles", n)
    target.map("a", n, guard=True)
    target.fill("a", 0, n, 0x5A)
    with _slow_reads(target.pid, path, 4 << 20):
        target.cmd("dread", "a", urllib.parse.quote(path), "own")
        time.sleep(0.2)                            # the read in flight
        seen = direct_reads_in_flight(target.pid)
        assert int(target.cmd("djoin", timeout=60)) == n * P
    assert seen.contains(pages(target, "a", (0, n))), seen


# -- long-term pins (migrated/kernel/pins.py) -------------------------------------------


def _register_ring(t, name, path, *how) -> None:
    """The target's io_uring with region ``name`` as fixed buffer, or skip."""
    import urllib.parse
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            if f.read().strip() == "2":
                pytest.skip("io_uring disabled (kernel.io_uring_disabled = 2)")
    except FileNotFoundError:
        pass                            # older kernels have no switch
    try:
        t.cmd("uring", name, urllib.parse.quote(str(path)), *how)
    except TargetError as e:
        pytest.skip(f"no io_uring fixed buffers here: {e}")


@pytest.mark.parametrize("mem", ["private", "memfd"])
@pytest.mark.parametrize("when", ["before-start", "after-start"])
def test_a_write_through_an_io_uring_fixed_buffer_is_not_lost(setup, tmp_path, when, mem):
    """IORING_REGISTER_BUFFERS pins the buffer for the ring's life; a
    READ_FIXED writes file data into it through the kernel's own mapping:
    no fault, no write bit, no soft-dirty bit, and a pin older than the
    last round, which the short-pin re-check does not cover.  Measured
    before the fix: uffd-wp lost 256 of 256 private pages either way round
    (memfd pages were caught by its shared-memory content check);
    soft-dirty lost none of the private ones (clear_refs leaves pinned
    pages of private mappings soft-dirty) but 256 of 256 memfd pages."""
    t, fz, tr, eng = setup
    n = 256
    path = tmp_path / "ring.bin"
    path.write_bytes(b"\xa1" * (n * P))
    t.map("a", n, kind=mem, guard=mem == "private")
    t.fill("a", 0, n, 0x5A)
    if when == "before-start":
        _register_ring(t, "a", path)
        eng.start()
    else:
        eng.start()
        _register_ring(t, "a", path)    # the pin breaks the protection once
        eng.round()
    assert int(t.cmd("uread")) == n * P
    eng.round()
    path.write_bytes(b"\xb2" * (n * P))
    assert int(t.cmd("uread")) == n * P
    final_round(fz, eng)                # mirror == memory


# The refusals run wherever a page-table tracker does: uffd-wp on the host,
# soft-dirty in the lab VM.
WHERE = [pytest.param("host", id="host"), pytest.param("lab", id="lab", marks=pytest.mark.lab)]


@pytest.mark.parametrize("where", WHERE)
def test_pins_that_cannot_be_located_refuse_page_table_trackers(target, tmp_path,
                                                                monkeypatch, where):
    """An RDMA / VFIO fd pins memory at addresses /proc does not show: a
    named page-table tracker is refused with the reason, "auto" takes
    digest.  (No such device here: a file standing in for one, by path.)"""
    from migrated.errors import TargetPinsMemory
    from migrated.kernel import pins
    dev = tmp_path / "uverbs0"
    dev.write_bytes(b"")
    monkeypatch.setattr(pins, "_UNLOCATABLE", ((str(dev), "an RDMA memory registration"),))
    import urllib.parse
    fd = int(target.cmd("openfd", urllib.parse.quote(str(dev))))
    assert fd >= 0
    if kprobe.available_trackers(kprobe.cached_probe()) == ["digest"]:
        pytest.skip("no page-table tracker (uffd-wp, soft-dirty) on this kernel")
    for forced in kprobe.available_trackers(kprobe.cached_probe()):
        if forced == "digest":
            continue
        with pytest.raises(TargetPinsMemory,
                           match=rf"process {target.pid} holds .*--tracker digest"):
            make_tracker(forced, target.pid)
    with make_tracker("auto", target.pid) as tr:
        assert tr.name == "digest"


def test_io_uring_fdinfo_is_parsed_with_bounds():
    """The buffer list is the target's (counts, addresses, lengths): bounded."""
    from migrated.kernel import pins
    ok = [b"UserFiles:\t0\n", b"UserBufs:\t3\n", b"    0: 0x7f0000001000/8192\n",
          b"    1: <none>\n", b"    2: 0x7f0000100000/0\n", b"PollList:\n"]
    assert pins.parse_user_bufs(iter(ok)) == [(0x7F0000001000, 8192)]
    assert pins.parse_user_bufs(iter([b"UserBufs:\t0\n", b"PollList:\n"])) == []
    with pytest.raises(pins._Busy):          # a busy ring: count, no list
        pins.parse_user_bufs(iter([b"UserBufs:\t2\n", b"PollList:\n"]))
    with pytest.raises(pins._Busy):          # the list cut short
        pins.parse_user_bufs(iter([b"UserBufs:\t2\n", b"    0: 0x1000/4096\n"]))
    with pytest.raises(pins._Busy):          # a busy ring on 6.18: nothing of its state
        pins.parse_user_bufs(iter([b"pos:\t0\n", b"flags:\t02000002\n", b"mnt_id:\t17\n",
                                   b"ino:\t1814397\n"]))
    for bad in ([b"UserBufs:\t99999999999\n"], [b"UserBufs:\t-1\n"],
                [b"UserBufs:\t16385\n"],
                [b"UserBufs:\t1\n", b"    0: 0x7f0000000000/2147483648\n"],
                [b"UserBufs:\t1\n", b"    0: 0xffffffffffff0000/4096\n"]):
        with pytest.raises(ValueError):
            pins.parse_user_bufs(iter(bad))


@pytest.mark.parametrize("where", WHERE)
def test_an_io_uring_without_an_fd_refuses_page_table_trackers(target, tmp_path, where):
    """A ring whose fd was registered with IORING_REGISTER_RING_FDS and
    closed keeps writing into its fixed buffer, with no fdinfo to list it.
    VmPin still counts the pin: named page-table trackers are refused,
    "auto" takes digest, and one armed before the ring existed fails its
    next collect instead of losing the writes (before the fix: 64 of 64
    pages lost)."""
    from migrated.errors import TargetPinsMemory
    n = 64
    path = tmp_path / "ring.bin"
    path.write_bytes(b"\xa1" * (n * P))
    target.map("a", n, guard=True)
    target.fill("a", 0, n, 0x5A)
    target.map("warmup", 1, guard=True)
    target.cmd("write", "warmup", 0, 1, 1, timeout=WARMUP_TIMEOUT_S)
    page_table = [k for k in kprobe.available_trackers(kprobe.cached_probe()) if k != "digest"]
    if not page_table:
        pytest.skip("no page-table tracker (uffd-wp, soft-dirty) on this kernel")
    armed = [make_tracker(k, target.pid) for k in page_table]
    try:
        for tr in armed:
            tr.start(read_layout(target.pid))
        _register_ring(target, "a", path, "hidden")
        assert not any(os.readlink(f"/proc/{target.pid}/fd/{fd}") == "anon_inode:[io_uring]"
                       for fd in os.listdir(f"/proc/{target.pid}/fd"))
        assert int(target.cmd("uread")) == n * P
        for tr in armed:
            with pytest.raises(TargetPinsMemory, match=rf"VmPin.*--tracker digest"):
                tr.collect(read_layout(target.pid))
    finally:
        for tr in armed:
            tr.close()
    for forced in page_table:
        with pytest.raises(TargetPinsMemory, match=rf"process {target.pid} has .*VmPin"):
            make_tracker(forced, target.pid)
    with make_tracker("auto", target.pid) as tr:
        assert tr.name == "digest"


def test_hidden_shared_pages_of_a_sparse_split_arena(target, monkeypatch):
    """A MAP_SHARED arena split in two VMAs (one page made read-only): each
    VMA's object holds more than the VMA shows, so its data extents are
    listed.  Resident pieces there are many (every other page touched) but
    pagemap shows them: they must not count against MAX_SHARED_EXTENTS
    (before: a 140002-page arena failed every migration, uffd-wp and
    digest alike); the one page written by another process is reported."""
    from migrated.kernel import trackers
    monkeypatch.setattr(trackers, "MAX_SHARED_EXTENTS", 16)
    n = 130
    target.map("s", n, "shared")
    for i in range(0, n - 2, 2):
        target.touch("s", i, 1)                # 64 separate resident pieces
    target.touch("s", n - 1, 1)
    target.protect("s", n - 1, 1, "r")         # split: [0, n-1) and [n-1, n)
    lo, _ = region(target, "s")
    fd = os.open(f"/proc/{target.pid}/map_files/{lo:x}-{lo + (n - 1) * P:x}", os.O_RDWR)
    try:
        os.pwrite(fd, b"\x77" * P, 41 * P)     # never mapped by the target
    finally:
        os.close(fd)
    layout = read_layout(target.pid)
    with Pagemap(target.pid) as pm:
        present = pm.present_in(layout)
    hidden = trackers.hidden_shared_runs(target.pid, layout, present)
    assert hidden == pages(target, "s", (41, 1))
    with DigestTracker(target.pid) as tr:
        assert tr.start(layout).dirty.contains(pages(target, "s", (41, 1)))


@pytest.mark.parametrize("obj", ["deleted-file", "memfd"])
def test_hidden_pages_of_a_private_mapping_behind_its_own_copies(target, tmp_path, obj):
    """A private mapping of a deleted file or a memfd (migrated like shared
    memory) whose object holds data in pages 4-7 only: the target wrote
    pages 0-3 (its own copies, over the object's holes) and never touched
    4-7.  The mapping shows as many pages as the object holds, yet none of
    them is the object's: 4-7 must still be found.  They were not (the
    shortcut took every shown page for one of the object's), and the image
    held zeros where the source reads the object's data (2 of 2 kinds,
    uffd-wp and digest alike; imagecheck.compare passed)."""
    from migrated.kernel import trackers
    if obj == "memfd":
        import ctypes
        target.map("f", 8, "memfd-private")
        target.fill("f", 0, 4, 0xEE)            # a shmem fault fills the holes too
        lo, hi = region(target, "f")
        fd = os.open(f"/proc/{target.pid}/map_files/{lo:x}-{hi:x}", os.O_RDWR)
        try:
            os.pwrite(fd, b"\x77" * (4 * P), 4 * P)
            # ... so punch them again (the copies stay: a punch spares them)
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(4 * P)) == 0, \
                os.strerror(ctypes.get_errno())     # PUNCH_HOLE | KEEP_SIZE
        finally:
            os.close(fd)
    else:
        path = tmp_path / "sparse.bin"
        with open(path, "wb") as f:
            f.seek(4 * P)                       # pages 0-3: a hole
            f.write(b"\x77" * (4 * P))
        target.map_file("f", str(path), 8)
        os.unlink(path)
        target.fill("f", 0, 4, 0xEE)
    layout = read_layout(target.pid)
    with Pagemap(target.pid) as pm:
        present = pm.present_in(layout)
    assert present.intersect(pages(target, "f", (0, 8))) == pages(target, "f", (0, 4))
    assert trackers.hidden_shared_runs(target.pid, layout, present) == pages(target, "f", (4, 4))
    with DigestTracker(target.pid) as tr:
        assert tr.start(layout).dirty.contains(pages(target, "f", (4, 4)))


def test_a_pagemap_fd_from_a_procfs_mounted_elsewhere_is_seen(tmp_path):
    """A target may hold a pagemap file from a procfs mounted anywhere (a
    chroot's /proc, a /host/proc): its fd's link reads that path from our
    root.  Only "/proc/PID/pagemap" was recognised, so uffd-wp was chosen
    for such a target and its PAGEMAP_SCAN erased the marks of 16 of 16
    pages written just before the freeze (stale in the image, 2 of 2 runs)."""
    import shutil
    import subprocess
    import sys
    from migrated.kernel import pins
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) here")
    where = tmp_path / "proc"
    where.mkdir()
    child = ("import os, sys, time\n"
             f"fd = os.open({str(where)!r} + '/self/pagemap', os.O_RDONLY)\n"
             "print(fd, flush=True)\n"
             "time.sleep(60)\n")
    # A private mount namespace: the procfs mount goes away with it.
    p = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                          f'mount -t proc proc "$0" && exec "$1" -c "$2"',
                          str(where), sys.executable, child],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = p.stdout.readline()
        if not line:
            pytest.skip(f"no procfs mount in a new mount namespace: {p.stderr.read()!r}")
        fd = int(line)
        assert os.readlink(f"/proc/{p.pid}/fd/{fd}") == f"{where}/{p.pid}/pagemap"
        got = pins.read_pins(p.pid)
        assert got.self_protect and "PAGEMAP_SCAN" in got.self_protect, got
    finally:
        p.kill()
        p.wait()


def test_hidden_shared_runs_never_reports_hugetlb_holes(target):
    """A hugetlb memfd split in two VMAs holds more than either shows, but
    hugetlbfs' lseek calls everything below EOF data: reporting that had
    the engine fault in a huge page per hole (HugePages_Free 14 -> 8 for
    one migration of a 2-of-8-pages memfd) and carry zeros."""
    from migrated.kernel.trackers import hidden_shared_runs
    with open("/proc/meminfo") as f:
        free = [int(x.split()[1]) for x in f if x.startswith("HugePages_Free")]
    if not free:
        pytest.skip("no hugetlb on this kernel")
    added = 0
    if free[0] < 8:
        # Eight more 2 MiB pages for the test's run, given back after it.
        try:
            with open("/proc/sys/vm/nr_hugepages") as f:
                before = int(f.read())
            with open("/proc/sys/vm/nr_hugepages", "w") as f:
                f.write(str(before + 8 - free[0]))
            added = 8 - free[0]
        except OSError as e:
            pytest.skip(f"cannot reserve huge pages: {e}")
    child = ("import ctypes, mmap, os, sys\n"
             "H = 2 << 20\n"
             "fd = os.memfd_create('huge', os.MFD_HUGETLB)\n"
             "os.ftruncate(fd, 8 * H)\n"
             "m = mmap.mmap(fd, 8 * H, mmap.MAP_SHARED)\n"
             "m[0] = 1; m[7 * H] = 1\n"
             "base = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
             "assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(base + 7 * H), H, 1) == 0\n"
             "print('ready', flush=True)\n"
             "sys.stdin.read()\n")
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"ready"
        layout = read_layout(p.pid)
        with Pagemap(p.pid) as pm:
            present = pm.present_in(layout)
        huge = PageRuns.concat([m.runs() for m in layout if m.path.startswith("/memfd:huge")])
        assert huge.total_pages() == 8 * 512
        assert present.intersect(huge).total_pages() == 2 * 512
        assert not hidden_shared_runs(p.pid, layout, present).subtract(present)
    finally:
        p.kill()
        p.wait()
        if added:
            with open("/proc/sys/vm/nr_hugepages", "w") as f:
                f.write(str(before))


def test_asynchronous_io_contexts_are_seen(target, tmp_path):
    """What makes the engine re-check recent pages after the freeze
    (source.py SETTLE_*): an io_uring (its mappings; its fd) and a Linux
    AIO context (its ring's mapping).  A target with neither: none."""
    import urllib.parse
    from migrated.kernel import pins
    from migrated.kernel.maps import read_layout
    assert pins.async_io_in(read_layout(target.pid)) is None
    assert not pins.has_io_uring_fd(target.pid)
    path = tmp_path / "f.bin"
    path.write_bytes(b"\xa1" * (16 * P))
    target.map("a", 16, guard=True)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("no O_DIRECT on this filesystem")
    target.cmd("aread", "a", urllib.parse.quote(str(path)))
    assert pins.async_io_in(read_layout(target.pid)) == "a Linux AIO context"
    assert int(target.cmd("areap")) == 16 * P
    _register_ring(target, "a", path)
    assert pins.has_io_uring_fd(target.pid)
    assert pins.async_io_in(read_layout(target.pid)) == "an io_uring"


def test_direct_reads_in_flight_are_listed(target, tmp_path, request):
    """pins.direct_reads_in_flight: a thread blocked in a pread of an
    O_DIRECT file shows its buffer; once the read is done, nothing."""
    import urllib.parse
    from migrated.kernel import pins
    n = 4 * 256                                    # 4 MiB: 1 s at 4 MiB/s
    path = _direct_file(tmp_path, request, "slow", n)
    addr = target.map("a", n, guard=True)
    assert not pins.direct_reads_in_flight(target.pid)
    with _slow_reads(target.pid, path, 4 << 20):
        target.cmd("dread", "a", urllib.parse.quote(path))
        seen = PageRuns.empty()
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            seen = pins.direct_reads_in_flight(target.pid)
        assert seen.pairs() == [(addr, n)]
        assert int(target.cmd("djoin", timeout=60)) == n * P
    assert not pins.direct_reads_in_flight(target.pid)


def test_hidden_shared_runs_reads_smaps_once_per_call(target, monkeypatch):
    """Each shared mapping holding pages it does not show had its own read
    of /proc/PID/smaps (the userfaultfd check): smaps walks every page
    table of the target, and this runs at every collect, the frozen one
    too -- 100 such memfds (MAP_PRIVATE, wasmtime's way) next to 2 GiB of
    memory took 1.46 s a collect.  One read now serves them all."""
    from migrated.kernel import procfs, trackers
    n = 12
    for i in range(n):
        target.map(f"m{i}", 64, "memfd")
        target.touch(f"m{i}", 0, 1)
        lo, hi = region(target, f"m{i}")
        fd = os.open(f"/proc/{target.pid}/map_files/{lo:x}-{hi:x}", os.O_RDWR)
        try:
            os.pwrite(fd, b"\x33" * P, 40 * P)     # never mapped by the target
        finally:
            os.close(fd)
    reads = []
    real = procfs._read_bytes

    def counting(pid, name):
        if name == "smaps":
            reads.append(pid)
        return real(pid, name)
    monkeypatch.setattr(procfs, "_read_bytes", counting)
    layout = read_layout(target.pid)
    with Pagemap(target.pid) as pm:
        present = pm.present_in(layout)
    hidden = trackers.hidden_shared_runs(target.pid, layout, present)
    assert hidden.total_pages() == n
    assert len(reads) == 1, f"{len(reads)} reads of smaps for {n} mappings"
