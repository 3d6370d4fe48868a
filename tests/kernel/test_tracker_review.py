"""Writes no tracker may lose: shared memory changed without going through
the target's own page-table entry (uffd-wp), and pages that turn
unreadable after they were sent (digest).

Real child processes.  ``RingChild`` is a small target of its own: one
memfd mapped twice, back to back (a "magic ring buffer", or a JIT's
write/execute dual mapping), changed through the first view or with
pwrite(2) on the memfd -- things tests/target.py cannot do.  Both kinds of
check are made: the tracker's own (MiniEngine mirror == memory after the
frozen final collect) and the engine's end to end (image == frozen
source, tests/engine/imagecheck.compare).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from migrated.engine.source import SendOptions
from migrated.image.store import ImageStore
from migrated.kernel import probe as kprobe
from migrated.kernel.freezer import Freezer
from migrated.kernel.trackers import DigestTracker, SoftDirtyTracker
from migrated.kernel.uffd import UffdWpTracker
from migrated.runs import PAGE_SIZE, PageRuns
from tests.engine.harness import migrate
from tests.engine.imagecheck import compare
from tests.kernel.test_trackers import MiniEngine, final_round, pages, region

P = PAGE_SIZE

needs_uffd_wp = pytest.mark.skipif(not kprobe.cached_probe().get("uffd_wp_tracker"),
                                   reason="uffd-wp unavailable on this kernel")

RING_PAGES = 64

# The ring child: prints "ready V1 V2 FD", then per stdin line "w N BYTE"
# (memset page N through view 1) or "pw N BYTE" (pwrite page N of the
# memfd) replies "ok".  Both views are read once so both are mapped.
RING_CHILD = r"""
import ctypes, os, sys
PG = os.sysconf("SC_PAGE_SIZE")
NP = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
RW, SHARED, PRIVATE, FIXED, ANON = 3, 0x01, 0x02, 0x10, 0x20
fd = os.memfd_create("ring")
os.ftruncate(fd, NP * PG)
base = libc.mmap(None, 2 * NP * PG, 0, PRIVATE | ANON, -1, 0)
v1 = libc.mmap(base, NP * PG, RW, SHARED | FIXED, fd, 0)
v2 = libc.mmap(base + NP * PG, NP * PG, RW, SHARED | FIXED, fd, 0)
if v1 != base or v2 != base + NP * PG:
    sys.exit("mmap failed: errno %d" % ctypes.get_errno())
ctypes.memset(v1, 0x11, NP * PG)
for i in range(NP):
    ctypes.c_char.from_address(v2 + i * PG).value
print("ready %#x %#x %d" % (v1, v2, fd), flush=True)
while True:
    line = sys.stdin.readline()
    if not line:
        break
    op, n, b = line.split()
    n, b = int(n), int(b, 16)
    if op == "w":
        ctypes.memset(v1 + n * PG, b, PG)
    else:
        os.pwrite(fd, bytes([b]) * PG, n * PG)
    print("ok", flush=True)
"""


class RingChild:
    def __init__(self, npages: int = RING_PAGES):
        self.proc = subprocess.Popen([sys.executable, "-c", RING_CHILD, str(npages)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0)
        self.pid = self.proc.pid
        self.npages = npages
        words = self._readline().split()
        assert words[0] == "ready", words
        self.v1, self.v2 = int(words[1], 16), int(words[2], 16)

    def _readline(self, timeout: float = 20.0) -> str:
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                raise RuntimeError(f"ring child {self.pid}: no reply (stopped?)")
            c = os.read(fd, 1)
            if not c:
                raise RuntimeError(f"ring child {self.pid} exited")
            buf += c
        return buf.decode().strip()

    def cmd(self, op: str, page: int, byte: int) -> None:
        self.proc.stdin.write(f"{op} {page} {byte:x}\n".encode())
        assert self._readline() == "ok"

    def page(self, view: int, n: int, count: int = 1) -> PageRuns:
        return PageRuns.from_range(view + n * P, view + (n + count) * P)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)       # our own child, by pid
        self.proc.wait(10)


@pytest.fixture
def ring():
    r = RingChild()
    try:
        yield r
    finally:
        r.close()


def _uffd_engine(pid):
    fz = Freezer(pid)
    tr = UffdWpTracker(pid, fz)
    return fz, tr, MiniEngine(tr, pid)


# -- uffd-wp: shared memory changed outside this mapping's page-table entry -----------


def _changed_outside_its_pte(ring, op: str, engine) -> None:
    """A store through view 1 changes view 2's page without a write
    through view 2's entry; pwrite(2) changes both without any.  Each
    must be reported -- in a live round and in the frozen final one."""
    fz, tr, eng = engine(ring.pid)
    try:
        eng.start()
        ring.cmd(op, 5, 0x5A)
        c = eng.round()
        assert not ring.page(ring.v2, 5).subtract(c.dirty)
        assert not ring.page(ring.v1, 5).subtract(c.dirty)
        ring.cmd(op, 9, 0x6B)           # right before the freeze
        c = final_round(fz, eng)        # mirror == memory, page for page
        assert not ring.page(ring.v2, 9).subtract(c.dirty)
        assert not ring.page(ring.v1, 9).subtract(c.dirty)
        assert tr.content_pages > 0 if isinstance(tr, UffdWpTracker) else True
    finally:
        tr.close()
        fz.close()


@needs_uffd_wp
@pytest.mark.parametrize("op", ["w", "pw"], ids=["other-view", "pwrite"])
def test_uffd_wp_shared_page_changed_outside_its_pte_is_sent_again(ring, op):
    _changed_outside_its_pte(ring, op, _uffd_engine)


def _written_by_another_process(target, mem: str, engine) -> None:
    """Another process changes the target's shared memory (here the test,
    through /proc/PID/map_files): no entry of the target's page table is
    written.  Resident pages are compared by content, so it is sent -- in
    a live round and in the frozen final one."""
    if mem == "sysv":
        target.sysv("s", 16)
    else:
        target.map("s", 16, mem)
    target.write("s", 0, 16, seed=2)
    lo, hi = region(target, "s")
    try:
        fd = os.open(f"/proc/{target.pid}/map_files/{lo:x}-{hi:x}", os.O_RDWR)
    except OSError as e:
        pytest.skip(f"cannot open the target's mapping from outside: {e}")
    fz, tr, eng = engine(target.pid)
    try:
        eng.start()
        os.pwrite(fd, b"\x77" * P, 3 * P)
        c = eng.round()
        assert not pages(target, "s", (3, 1)).subtract(c.dirty)
        os.pwrite(fd, b"\x78" * P, 11 * P)
        c = final_round(fz, eng)
        assert not pages(target, "s", (11, 1)).subtract(c.dirty)
    finally:
        os.close(fd)
        tr.close()
        fz.close()


@needs_uffd_wp
@pytest.mark.parametrize("mem", ["memfd", "shared", "sysv"])
def test_uffd_wp_shared_memory_written_by_another_process(target, mem):
    _written_by_another_process(target, mem, _uffd_engine)


@needs_uffd_wp
def test_uffd_wp_private_memory_keeps_the_fast_path(target, tmp_path):
    """Private anonymous and private file mappings are never read by a
    collect: the write bits are exact for them.  Only shared memory is."""
    target.map("a", 64, guard=True)
    target.write("a", 0, 64)
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * (16 * P // 256))
    target.map_file("f", str(path), 16)
    target.touch("f", 0, 16)
    target.write("f", 2, 2)
    fz, tr, eng = _uffd_engine(target.pid)
    try:
        eng.start()
        target.write("a", 5, 3, seed=3)
        c = eng.round()
        assert c.dirty.clip(*region(target, "a")) == pages(target, "a", (5, 3))
        assert tr.content_pages == 0 and tr.content_ms == 0.0
        target.map("s", 8, "memfd")
        target.write("s", 0, 8)
        eng.round()                     # new: sent whole, digests recorded
        c = eng.round()
        assert tr.content_pages == 8     # the shared pages alone
        assert not c.dirty.clip(*region(target, "s"))
        final_round(fz, eng)
    finally:
        tr.close()
        fz.close()


@needs_uffd_wp
@pytest.mark.parametrize("op", ["w", "pw"], ids=["other-view", "pwrite"])
def test_uffd_wp_migration_of_a_double_mapped_memfd_is_exact(ring, tmp_path, op):
    """End to end with the engine: the change made after round 0 is in
    the image, which equals the frozen source page for page."""
    store = ImageStore(str(tmp_path / "state"))
    done = []

    def after_round_0(sm, e):
        if e["event"] == "round" and e["round"] == 0 and not done:
            ring.cmd(op, 5, 0x5A)
            ring.cmd(op, 40, 0x6B)
            done.append(True)

    out = migrate(ring.pid, store, SendOptions(then="stop", tracker="uffd-wp"),
                  on_event=after_round_0)
    s = out.source
    assert done and s["status"] == "completed", s.get("error")
    assert s["tracker"] == "uffd-wp"
    assert store.read_memory(s["image_id"], ring.v2 + 5 * P, 4) == b"\x5a" * 4
    compare(store, s["image_id"], ring.pid)


# -- digest: pages that turn unreadable are not gone -------------------------------------


def test_digest_unreadable_page_is_dirty_not_dropped(target):
    """mprotect to write-only: still mapped, still holding data, but
    process_vm_readv fails.  The page stays known and is reported dirty
    (the engine will fail to read it, and say so), never dropped -- also a
    page that was never readable at all."""
    target.map("warmup", 1, guard=True)
    target.write("warmup", 0, 1)
    target.map("a", 16, guard=True)
    target.write("a", 0, 16)
    fz = Freezer(target.pid)
    tr = DigestTracker(target.pid, fz)
    eng = MiniEngine(tr, target.pid)
    try:
        eng.start()
        target.protect("a", 0, 16, "w")
        target.map("b", 4, guard=True)
        target.write("b", 0, 4)
        target.protect("b", 0, 4, "w")
        c = eng.round()
        a, b = pages(target, "a", (0, 16)), pages(target, "b", (0, 4))
        assert not c.dropped.intersect(a), "unreadable pages reported gone"
        assert not a.subtract(c.dirty) and not b.subtract(c.dirty)
        fz.freeze()
        try:
            c = eng.round()
        finally:
            fz.thaw()
        assert not c.dropped.intersect(a)
        assert not a.subtract(c.dirty) and not b.subtract(c.dirty)
        # Readable again with the content that was sent: clean again.
        target.protect("a", 0, 16, "rw")
        c = eng.round()
        assert not c.dirty.intersect(a)
        # Unmapped: now it is gone.
        target.unmap("a")
        c = eng.round()
        assert not a.subtract(c.dropped)
    finally:
        tr.close()
        fz.close()


def test_digest_migration_fails_when_a_sent_page_turns_unreadable(target, tmp_path):
    """End to end: the frozen final round cannot read the pages, so the
    migration fails with the engine's clear error and publishes nothing
    (it used to complete with those pages missing from the image)."""
    target.map("warmup", 1, guard=True)
    target.write("warmup", 0, 1)
    target.map("a", 256, guard=True)
    target.write("a", 0, 256)
    store = ImageStore(str(tmp_path / "state"))
    done = []

    def after_round_0(sm, e):
        if e["event"] == "round" and e["round"] == 0 and not done:
            target.protect("a", 0, 256, "w")
            done.append(True)

    out = migrate(target.pid, store, SendOptions(then="stop", tracker="digest"),
                  on_event=after_round_0)
    s = out.source
    assert done
    assert s["status"] == "failed", "completed without pages it could not read"
    assert "could not be read while it was frozen" in s["error"]
    assert not store.list()
    with open(f"/proc/{target.pid}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] != "T", "left stopped"


# -- soft-dirty: the same shared memory, and a target that runs in the window ---------
# (lab: tests/lab/run.py boots a kernel with CONFIG_MEM_SOFT_DIRTY)


def _soft_dirty_engine(pid):
    fz = Freezer(pid)
    tr = SoftDirtyTracker(pid, fz)
    return fz, tr, MiniEngine(tr, pid)


@pytest.mark.lab
@pytest.mark.parametrize("op", ["w", "pw"], ids=["other-view", "pwrite"])
def test_soft_dirty_shared_page_changed_outside_its_pte_is_sent_again(ring, op):
    """The soft-dirty bit is per page-table entry too."""
    _changed_outside_its_pte(ring, op, _soft_dirty_engine)


@pytest.mark.lab
@pytest.mark.parametrize("mem", ["memfd", "shared", "sysv"])
def test_soft_dirty_shared_memory_written_by_another_process(target, mem):
    target.map("warmup", 1, guard=True)
    target.cmd("write", "warmup", 0, 1, 1, timeout=300)   # numpy import, slow in the lab
    _written_by_another_process(target, mem, _soft_dirty_engine)


@pytest.mark.lab
def test_soft_dirty_migration_of_a_double_mapped_memfd_is_exact(ring, tmp_path):
    store = ImageStore(str(tmp_path / "state"))
    done = []

    def after_round_0(sm, e):
        if e["event"] == "round" and e["round"] == 0 and not done:
            ring.cmd("w", 5, 0x5A)
            ring.cmd("pw", 40, 0x6B)
            done.append(True)

    out = migrate(ring.pid, store, SendOptions(then="stop", tracker="soft-dirty"),
                  on_event=after_round_0, timeout=120)
    s = out.source
    assert done and s["status"] == "completed", s.get("error")
    assert store.read_memory(s["image_id"], ring.v2 + 5 * P, 4) == b"\x5a" * 4
    compare(store, s["image_id"], ring.pid)


@pytest.mark.lab
def test_soft_dirty_target_run_inside_the_window_loses_nothing(target, monkeypatch):
    """Someone else's SIGCONT lands inside the read-and-clear window (here
    right before the clear): the target runs, and what it writes between
    the read and the clear would be cleared unseen.  The collect notices
    it ran and reports every present page."""
    from migrated.kernel import pagemap as pm
    target.map("warmup", 1, guard=True)
    target.cmd("write", "warmup", 0, 1, 1, timeout=300)
    target.map("a", 16, guard=True)
    target.write("a", 0, 16, seed=1)
    fz, tr, eng = _soft_dirty_engine(target.pid)
    real_clear = pm.clear_soft_dirty
    hit = []

    def clear_after_a_sigcont(pid):
        if not hit:
            os.kill(pid, signal.SIGCONT)        # a third party's
            target.write("a", 3, 2, seed=9)     # the target runs and writes
            hit.append(True)
        real_clear(pid)
    try:
        eng.start()
        monkeypatch.setattr(pm, "clear_soft_dirty", clear_after_a_sigcont)
        c = eng.round()
        monkeypatch.setattr(pm, "clear_soft_dirty", real_clear)
        assert hit and tr.ran_in_window == 1
        assert c.dirty.contains(pages(target, "a", (3, 2)))
        final_round(fz, eng)
    finally:
        tr.close()
        fz.close()


@pytest.mark.lab
def test_soft_dirty_hidden_shared_page_punched_later_is_dropped(target):
    """A shared page the page tables stopped showing (MADV_DONTNEED on a
    memfd: the data stays in the object) is kept, not dropped; when it is
    then punched out (MADV_REMOVE) the next collect must drop it -- the
    destination otherwise keeps its old bytes where the source has a hole."""
    target.map("s", 16, "memfd")
    target.write("s", 0, 16, seed=2)
    fz, tr, eng = _soft_dirty_engine(target.pid)
    try:
        eng.start()
        target.dontneed("s", 3, 1)              # hidden: in the memfd, not mapped
        c = eng.round()
        assert not c.dropped.intersect(pages(target, "s", (3, 1)))
        target.advise("s", 3, 1, "remove")      # now a hole: reads as zeros
        fz.freeze()
        try:
            c = eng.round()
            assert c.dropped.contains(pages(target, "s", (3, 1))), \
                "a punched-out page kept at the destination"
            eng.verify()                        # mirror == memory
        finally:
            fz.thaw()
    finally:
        tr.close()
        fz.close()
