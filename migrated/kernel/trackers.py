"""Dirty-page trackers: which pages changed since the last round.

Every tracker keeps one contract: **collect-and-reset is atomic with
respect to the target's writes** -- a write the target makes at any time
is reported by the collect that follows it, or a later one, never lost.

Protocol (driven by the engine, one tracker per migration)::

    tr = make_tracker("auto", pid, freezer)
    c = tr.start(layout)           # round 0: everything present
    ... read c.dirty, send it, tr.sent(chunk.runs, chunk.data) per chunk ...
    c = tr.collect(read_layout(pid))  # round n: dirty since the last collect
    ... send c.dirty, tell the destination to drop c.dropped, tr.sent(...) ...
    freezer.freeze(); c = tr.collect(read_layout(pid))   # final, frozen round
    tr.close()

``sent()`` must be called for every chunk actually sent: a page reported
dirty and never confirmed (its read failed, say) is reported again.

Trackers:

* ``soft-dirty`` (SoftDirtyTracker): clear_refs 4 + pagemap bit 55.  The
  read of the bits and the clear are two system calls, so the target is
  stopped (Freezer) for that window -- the pause is reported per round, as
  CRIU does.  Needs CONFIG_MEM_SOFT_DIRTY (x86_64, not arm64).
* ``digest`` (DigestTracker): keeps a 128-bit digest of every page as it
  was *sent* and re-reads every present page each round; a page is dirty
  when its digest differs.  Exact by construction, no reset window, no
  freeze; costs a full read of resident memory per round.  Works on every
  kernel (the fallback; arm64 has no soft-dirty).
* ``uffd-wp`` (reserved): async userfaultfd write-protect + PAGEMAP_SCAN.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from migrated.errors import (KernelUnsupported, NoSuchProcess, ProcessError,
                             TargetPinsMemory, ZombieProcess)
from migrated.kernel import pagemap as pm
from migrated.kernel import pins
from migrated.kernel import probe as kprobe
from migrated.kernel import procfs
from migrated.kernel.freezer import Freezer
from migrated.kernel.maps import Layout, Mapping
from migrated.kernel.reader import MemReader
from migrated.runs import PAGE_SIZE, PageRuns

log = logging.getLogger("migrated.kernel.trackers")

_U64 = np.uint64
_PAGE = _U64(PAGE_SIZE)
WORDS_PER_PAGE = PAGE_SIZE // 8

# Pagemap words are read per mapping in slices of at most this many pages
# (4 M pages = 16 GiB of address space = 32 MiB of words) and compacted to
# the present pages at once, so a huge sparse reservation (a JVM heap, Go
# arenas) never needs its whole word array in memory.
PAGEMAP_SLICE_PAGES = 4 << 20

# Digests are computed over blocks of this many pages (1 MiB): the 32-bit
# widening copy and its products stay in L2; measured ~1.5-1.9 GB/s on the
# development machines against ~1.4 GB/s for 16 MiB blocks.
DIGEST_BLOCK_PAGES = 256

# Fixed, public multipliers for the page digest: odd 64-bit constants, 512
# for lane 0 (one per 64-bit word) and 1024 for lane 1 (one per 32-bit
# half-word).  Not a secret: the digest guards against missed writes, not
# against an adversary (the target never sees it).
_DIGEST_SEED = 0x6D6967726174   # "migrat"
_rng = np.random.default_rng(_DIGEST_SEED)
K_WORD = _rng.integers(0, 2**64, size=WORDS_PER_PAGE, dtype=np.uint64) | _U64(1)
K_HALF = _rng.integers(0, 2**64, size=2 * WORDS_PER_PAGE, dtype=np.uint64) | _U64(1)
del _rng


@dataclass(frozen=True)
class Collected:
    """What one collect found.

    ``dirty``: pages to (re)send.  ``dropped``: pages sent earlier that the
    target no longer has (munmap, MADV_DONTNEED, mapping gone) -- the
    destination must forget them.  ``pause_ms``: how long this call kept
    the target stopped (0 when the caller had frozen it, or no freeze was
    needed).  ``scan_ms``: wall time of the whole collect.
    """
    dirty: PageRuns
    dropped: PageRuns
    pause_ms: float = 0.0
    scan_ms: float = 0.0


# -- vectorised helpers --------------------------------------------------------

def runs_from_addrs(addrs: np.ndarray) -> PageRuns:
    """PageRuns of sorted, unique page addresses (vectorised run detection)."""
    a = np.asarray(addrs, _U64)
    if a.size == 0:
        return PageRuns.empty()
    brk = np.flatnonzero(np.diff(a) != _PAGE) + 1
    first = np.concatenate(([0], brk))
    last = np.concatenate((brk, [a.size]))
    return PageRuns(a[first], (last - first).astype(_U64), normalized=True)


def addrs_in(addrs: np.ndarray, runs: PageRuns) -> np.ndarray:
    """Boolean mask: which of ``addrs`` fall inside ``runs``."""
    if addrs.size == 0 or not runs:
        return np.zeros(addrs.size, bool)
    i = np.searchsorted(runs.starts, addrs, side="right").astype(np.int64) - 1
    ok = i >= 0
    inside = np.zeros(addrs.size, bool)
    ii = i[ok]
    inside[ok] = addrs[ok] < runs.starts[ii] + runs.counts[ii] * _PAGE
    return inside


def _member(sorted_keys: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found mask, index into sorted_keys) for each query value."""
    if sorted_keys.size == 0:
        return np.zeros(query.size, bool), np.zeros(query.size, np.int64)
    idx = np.searchsorted(sorted_keys, query)
    idx = np.minimum(idx, sorted_keys.size - 1)
    return sorted_keys[idx] == query, idx


def page_digests(data, out: np.ndarray | None = None) -> np.ndarray:
    """128-bit digest of each page of ``data`` -> np.uint64 array (n, 2).

    Lane 0 = sum of word_i * K_WORD_i over the 512 64-bit words (mod 2^64).
    K is odd, hence invertible mod 2^64: a change of any single word always
    changes lane 0.  Lane 1 = sum of half_j * K_HALF_j over the 1024 32-bit
    half-words.  Lane 0 is blind to changes that are multiples of 2^63
    (the top bit flipped in an even number of words: the sign of two
    doubles); in lane 1 such a change is +-2^31 * K_HALF_j per word, which
    reaches every bit above 31, so a collision needs a signed sum of the
    K_HALF of the touched half-words to vanish mod 2^33 -- no two constants
    do (checked by the tests), and in general the chance is ~2^-33 for such
    structured changes and ~2^-128 for arbitrary ones.
    """
    buf = np.frombuffer(data, np.uint8)
    if buf.size % PAGE_SIZE:
        raise ValueError("page_digests needs whole pages")
    n = buf.size // PAGE_SIZE
    words = buf.view(np.uint64).reshape(n, WORDS_PER_PAGE)
    if out is None:
        out = np.empty((n, 2), _U64)
    blk = min(DIGEST_BLOCK_PAGES, max(n, 1))
    wide = np.empty((blk, 2 * WORDS_PER_PAGE), _U64)
    lane0 = np.empty(n, _U64)
    lane1 = np.empty(n, _U64)
    for s in range(0, n, blk):          # per block of pages, never per page
        x = words[s:s + blk]
        k = x.shape[0]
        np.matmul(x, K_WORD, out=lane0[s:s + k])
        w = wide[:k]
        w[...] = x.view(np.uint32)      # widen the half-words to 64 bits
        np.matmul(w, K_HALF, out=lane1[s:s + k])
    out[:, 0] = lane0
    out[:, 1] = lane1
    return out


class PageDigests:
    """Digest per page address: sorted address array + (n, 2) digest array.

    Survives any layout change (keyed by address, not by mapping); merges
    with searchsorted, never a per-page Python dict.
    """

    def __init__(self) -> None:
        self.addrs = np.empty(0, _U64)
        self.digests = np.empty((0, 2), _U64)

    def __len__(self) -> int:
        return int(self.addrs.size)

    def update(self, addrs: np.ndarray, digests: np.ndarray) -> None:
        """Record digests for sorted unique ``addrs`` (replacing old ones)."""
        if addrs.size == 0:
            return
        found, idx = _member(self.addrs, addrs)
        if found.any():
            self.digests[idx[found]] = digests[found]
        new = ~found
        if new.any():
            pos = np.searchsorted(self.addrs, addrs[new])
            self.addrs = np.insert(self.addrs, pos, addrs[new])
            self.digests = np.insert(self.digests, pos, digests[new], axis=0)

    def lookup(self, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, digests; rows of missing addresses are garbage)."""
        found, idx = _member(self.addrs, addrs)
        return found, self.digests[idx] if self.addrs.size else np.zeros((addrs.size, 2), _U64)

    def changed(self, addrs: np.ndarray, data) -> np.ndarray:
        """Those of ``addrs`` whose content (``data``: their pages back to
        back) differs from the digest recorded, or has none recorded."""
        found, old = self.lookup(addrs)
        return addrs[~found | (old != page_digests(data)).any(axis=1)]

    def keep_only(self, present: PageRuns) -> PageRuns:
        """Forget pages outside ``present``; return them as runs."""
        inside = addrs_in(self.addrs, present)
        if inside.all():
            return PageRuns.empty()
        gone = runs_from_addrs(self.addrs[~inside])
        self.addrs = self.addrs[inside]
        self.digests = self.digests[inside]
        return gone


# -- the interface ------------------------------------------------------------------

class Tracker(abc.ABC):
    """Finds the pages a process wrote between rounds (see module doc)."""

    name: str = ""

    def __init__(self, pid: int, freezer: Freezer | None = None):
        self.pid = pid
        self._own_freezer = freezer is None
        self._freezer = freezer
        self.rounds = 0

    @property
    def freezer(self) -> Freezer:
        if self._freezer is None:
            self._freezer = Freezer(self.pid)
        return self._freezer

    @abc.abstractmethod
    def start(self, layout: Layout) -> Collected:
        """Arm tracking; return every page present in migratable mappings."""

    @abc.abstractmethod
    def collect(self, layout: Layout) -> Collected:
        """Pages written (dirty) and gone (dropped) since the last collect."""

    def sent(self, runs: PageRuns, data) -> None:
        """``runs`` were sent with content ``data`` (pages concatenated)."""

    def close(self) -> None:
        if self._own_freezer and self._freezer is not None:
            self._freezer.close()
            self._freezer = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _gone_is_no_such_process(self, what: str):
        return _zombie_is_gone(self.pid, f"{self.name} tracker: {what}")


@contextlib.contextmanager
def _zombie_is_gone(pid: int, what: str) -> Iterator[None]:
    """A zombie has exited too: report one error type for "gone"."""
    try:
        yield
    except ZombieProcess as e:
        raise NoSuchProcess(pid, f"{what} (exited, not yet reaped)") from e


def _migratable(layout: Layout) -> list[Mapping]:
    return [m for m in layout if m.migrates]


# -- soft-dirty -------------------------------------------------------------------------

# Bits of a pagemap word that identify what backs a page: its frame (or
# swap entry) and whether it is present or swapped.  A change of this key
# between rounds means the page was replaced.
_FRAME_KEY = pm.PM_PFN_MASK | pm.PM_SWAPPED | pm.PM_PRESENT


class SoftDirtyTracker(Tracker):
    """clear_refs 4 + pagemap bit 55, under a freeze.

    Per collect: stop the target, read the pagemap words of every
    migratable mapping (one pread per mapping), write 4 to clear_refs, let
    it go.  A present page is dirty when

    * its soft-dirty bit is set (written since the last clear; the kernel
      also sets it for every page of a new or grown VMA, and per 2 MiB for
      THP -- documented supersets), or
    * it was not present at the last collect (new mapping, or a mapping
      that appeared between the caller's maps read and our freeze), or
    * its frame changed without a write: MADV_DONTNEED then a *read* fault
      maps the shared zero page (or huge zero page), which never sets the
      soft-dirty bit, yet the content changed to zeros; KSM merges are
      caught the same way.  When PFNs are hidden (no CAP_SYS_ADMIN) frames
      cannot be compared: every page not mapped exclusively (zero page, KSM,
      COW-shared after fork) is counted dirty instead.

    * it is resident shared memory (memfd, MAP_SHARED anonymous, SysV)
      whose content differs from what was sent: the bit lives in this
      mapping's page-table entry, and shared memory also changes through
      a second mapping, pwrite(2) or another process (uffd-wp has the same
      check, uffd.py "Shared memory").  Compared outside the freeze: a
      change before the read is seen now, one after it next round, and the
      caller's frozen final collect is exact.

    If the target ran inside the window anyway (someone else's SIGCONT),
    a write between the read and the clear may have been cleared unseen:
    that collect reports every present page dirty.

    Dropped = present at the last collect, not present now.  Pages reported
    dirty but never confirmed by sent() are reported again.
    """

    name = kprobe.SOFT_DIRTY

    def __init__(self, pid: int, freezer: Freezer | None = None):
        super().__init__(pid, freezer)
        with self._gone_is_no_such_process("opening pagemap"):
            self._pm = pm.Pagemap(pid)
        self._addrs = np.empty(0, _U64)     # present pages at the last collect
        self._keys = np.empty(0, _U64)      # their frame keys
        self._hidden = PageRuns.empty()     # shared pages pagemap did not list then
        self._pending = PageRuns.empty()    # reported dirty, not yet sent
        self._pfn_visible: bool | None = None
        self._shared = PageRuns.empty()     # shared-anon mappings of the last layout
        self._sent_digests = PageDigests()  # their pages, as sent
        self._content_reader: MemReader | None = None
        self.ran_in_window = 0              # collects the target ran inside (SIGCONT)

    @contextlib.contextmanager
    def _window(self) -> Iterator[list[float]]:
        """Keep the target stopped for the read-and-clear window; yields a
        one-element list that receives the pause in ms (0 if the caller
        had it frozen already: their freeze, their accounting)."""
        pause = [0.0]
        fz = self.freezer
        if fz.is_frozen:
            yield pause
            return
        t0 = time.perf_counter()
        fz.freeze()
        try:
            fz.mark_quiescent()
            yield pause
            if not fz.still_frozen():
                pause.append(True)      # it ran between the read and the clear
        finally:
            fz.thaw()
            pause[0] = (time.perf_counter() - t0) * 1000.0

    def _read_and_clear(self, layout: Layout) -> tuple[np.ndarray, np.ndarray, float, bool]:
        """Inside one freeze: pagemap words of present pages of migratable
        mappings, then clear_refs 4.  Returns (addresses, words, pause,
        whether the target ran inside the window)."""
        addr_parts: list[np.ndarray] = []
        word_parts: list[np.ndarray] = []
        with self._gone_is_no_such_process("collect"), self._window() as pause:
            for m in _migratable(layout):
                for s in range(m.start, m.end, PAGEMAP_SLICE_PAGES * PAGE_SIZE):
                    e = min(m.end, s + PAGEMAP_SLICE_PAGES * PAGE_SIZE)
                    w = self._pm.read(s, e)
                    keep = pm.in_memory(w)
                    if m.kind == "file":
                        keep &= ~pm.is_file(w)   # plain page-cache pages: not ours
                    idx = np.flatnonzero(keep)
                    if idx.size:
                        addr_parts.append(_U64(s) + idx.astype(_U64) * _PAGE)
                        word_parts.append(w[idx])
            pm.clear_soft_dirty(self.pid)
        if addr_parts:
            addrs = np.concatenate(addr_parts)
            words = np.concatenate(word_parts)
        else:
            addrs, words = np.empty(0, _U64), np.empty(0, _U64)
        return addrs, words, pause[0], len(pause) > 1

    def start(self, layout: Layout) -> Collected:
        t0 = time.perf_counter()
        addrs, words, pause, _ = self._read_and_clear(layout)
        present_frames = (words & _U64(pm.PM_PRESENT | pm.PM_PFN_MASK))[pm.is_present(words)]
        self._pfn_visible = bool((present_frames & _U64(pm.PM_PFN_MASK)).any())
        self._addrs, self._keys = addrs, words & _U64(_FRAME_KEY)
        everything = runs_from_addrs(addrs)
        self._hidden = hidden_shared_runs(self.pid, layout, everything)
        everything = everything.union(self._hidden)
        self._pending = everything
        self._shared = shared_anon_runs(layout)
        self.rounds = 1
        return Collected(everything, PageRuns.empty(), pause,
                         (time.perf_counter() - t0) * 1000.0)

    def collect(self, layout: Layout) -> Collected:
        if self._pfn_visible is None:
            raise RuntimeError("SoftDirtyTracker.collect() before start()")
        t0 = time.perf_counter()
        addrs, words, pause, ran = self._read_and_clear(layout)
        if ran:
            self.ran_in_window += 1
        keys = words & _U64(_FRAME_KEY)
        found, idx = _member(self._addrs, addrs)
        dirty = pm.is_soft_dirty(words) | ~found | ran
        if self._pfn_visible:
            if self._keys.size:
                dirty |= found & (self._keys[idx] != keys)
        else:
            dirty |= ~pm.is_exclusive(words)
        dirty_runs = runs_from_addrs(addrs[dirty])
        present = runs_from_addrs(addrs)
        # Shared pages pagemap does not list (swapped out, never mapped
        # here): present, and content-checked below with the rest.
        hidden = hidden_shared_runs(self.pid, layout, present)
        present = present.union(hidden)
        # Long-term pins: the kernel writes there with no soft-dirty bit;
        # every such page counts as written in every collect.
        pinned = pinned_runs(self)
        if pinned:
            dirty_runs = dirty_runs.union(pinned.intersect(present))
        if self._pending:
            dirty_runs = dirty_runs.union(self._pending.intersect(present))
        self._shared = shared_anon_runs(layout)
        if self._shared or len(self._sent_digests):
            shared_resident = present.intersect(self._shared)
            self._sent_digests.keep_only(shared_resident)
            with self._gone_is_no_such_process("collect (content check of shared memory)"):
                dirty_runs = dirty_runs.union(
                    self._content_changed(shared_resident.subtract(dirty_runs)))
        # Dropped: present last time -- listed by pagemap or hidden -- and
        # neither now (a hidden page punched out since is gone too).
        still, _ = _member(addrs, self._addrs)
        dropped = runs_from_addrs(self._addrs[~still]).union(self._hidden).subtract(present)
        self._addrs, self._keys, self._hidden = addrs, keys, hidden
        self._pending = dirty_runs
        self.rounds += 1
        return Collected(dirty_runs, dropped, pause, (time.perf_counter() - t0) * 1000.0)

    def _content_changed(self, todo: PageRuns) -> PageRuns:
        """Pages of ``todo`` whose content is not what was sent (digest
        differs, never sent, or unreadable: content unknown)."""
        if not todo:
            return PageRuns.empty()
        if self._content_reader is None:
            self._content_reader = MemReader(self.pid)
        return content_changed(self._content_reader, self._sent_digests, todo)[0]

    def sent(self, runs: PageRuns, data=None) -> None:
        if not runs:
            return
        if self._shared and runs.intersect(self._shared):
            record_sent_digests(self._sent_digests, self._shared, runs, data,
                                f"soft-dirty tracker of process {self.pid}")
        if self._pending:
            self._pending = self._pending.subtract(runs)

    def close(self) -> None:
        self._content_reader = None
        self._sent_digests = PageDigests()
        try:
            self._pm.close()
        finally:
            super().close()


def shared_anon_runs(layout: Layout) -> PageRuns:
    """Address ranges of ``layout``'s migrated shared-anon mappings (memfd,
    MAP_SHARED anonymous, SysV): memory that changes without a write
    through the target's own page-table entry -- what the content checks
    of soft-dirty and uffd-wp cover."""
    return mapping_runs([m for m in layout if m.migrates and m.kind == "shared-anon"])


def mapping_runs(maps: list[Mapping]) -> PageRuns:
    """The pages of ``maps`` (in address order)."""
    return PageRuns(np.array([m.start for m in maps], _U64),
                    np.array([m.npages for m in maps], _U64))


# Pieces of a shared-anon mapping holding data the page tables do not show,
# per mapping and collect: more fails the collect rather than keep a list
# without bound.  Extents pagemap already shows are not counted (a sparse
# arena of many resident pieces is common); they are listed in batches of
# _EXTENT_BATCH and dropped at once.
MAX_SHARED_EXTENTS = 1 << 16
_EXTENT_BATCH = 4096


def hidden_shared_runs(pid: int, layout: Layout, present: PageRuns) -> PageRuns:
    """Pages of ``layout``'s shared-anon mappings that hold data though the
    target's page tables do not show them, so pagemap (and PAGEMAP_SCAN)
    never lists them: a shmem page swapped out leaves no swap entry in
    the page table (its swap slot is kept in the object), and a page
    written only by pwrite(2) or another process was never mapped here.
    Both read fine with process_vm_readv (it faults them in).

    Per mapping one open of /proc/PID/map_files and one fstat: the object's
    allocated blocks (resident and swapped pages) against the pages
    ``present`` shows in the mapping; only when there are more (or the
    mapping is private: its own copies count as shown) are its data
    extents listed (SEEK_DATA/SEEK_HOLE over the mapped window) and those
    ``present`` does not cover kept, at most MAX_SHARED_EXTENTS pieces.
    Returns them as address runs."""
    parts: list[PageRuns] = []
    holding: list[Mapping] = []         # mappings with hidden pages
    for m in layout:
        if not (m.migrates and m.kind == "shared-anon"):
            continue
        try:
            fd = os.open(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}", os.O_RDONLY)
        except FileNotFoundError:
            continue                    # unmapped since the layout was read (or exited:
                                        # the tracker's own checks say so)
        try:
            st = os.fstat(fd)
            if st.st_blksize > PAGE_SIZE:
                # hugetlbfs (its block is the huge page): its lseek calls
                # every byte below EOF data, so the holes would be read --
                # faulting in a huge page each, in the target's pool.  Its
                # pages are never swapped; only what pagemap shows is taken.
                continue
            allocated = st.st_blocks * 512 // PAGE_SIZE
            shown = present.clip(m.start, m.end)
            if m.shared and allocated <= shown.total_pages():
                continue                # every page it holds is mapped here
            # Not so for a private mapping (a memfd or a deleted file): a page
            # it shows may be the process's own copy over a hole of the
            # object, so as many pages shown as the object holds proves
            # nothing (4 such copies hid 4 data pages never touched: zeros
            # in the image).  Its extents are always listed.
            got = _hidden_extents(pid, m, fd, shown)
        finally:
            os.close(fd)
        if got:
            holding.append(m)
            parts.extend(got)
    if holding:
        _check_no_fault_handler(pid, holding)
    return PageRuns.concat(parts) if parts else PageRuns.empty()


# VmFlags (/proc/PID/smaps) of a mapping registered with a userfaultfd in
# minor or missing mode.  Not ours (uffd-wp registers write-protect only):
# the process's own, or a monitor's it handed the fd to (a lazy restore, a
# post-copy destination).
_FAULT_HANDLER_FLAGS = frozenset({"ui", "um"})


def _check_no_fault_handler(pid: int, maps: list[Mapping]) -> None:
    """Fail if one of the shared mappings ``maps``, which hold pages their
    page tables do not show, is registered with a userfaultfd in minor or
    missing mode.  Reading such a page faults it in, and the fault waits for that
    userfaultfd's handler -- a thread of the target, which is stopped
    while we read its final delta: process_vm_readv then waits for good,
    with the target frozen, and neither a cancel nor the timeout can end
    it (seen: a memfd registered in minor mode, a page written through
    another view just before the freeze).  One read of smaps for all of
    them: it walks every page table of the target, and this runs at every
    collect, the frozen one too (one read per mapping: 1.46 s for 100
    such mappings next to 2 GiB of memory)."""
    got = procfs.read_vma_flags(pid, [m.start for m in maps])
    for m in maps:
        flags = got[m.start]
        if not (flags and flags & _FAULT_HANDLER_FLAGS):
            continue
        mode = "minor" if "ui" in flags else "missing"
        raise ProcessError(
            pid, f"process {pid} has its shared memory {m.path or 'anonymous'} at "
                 f"{m.start:#x}-{m.end:#x} registered with a userfaultfd ({mode} faults, its "
                 "own fault handler), and it holds pages not mapped there: reading them "
                 "would wait for that handler, which does not run while the process is "
                 "frozen; migrate it once it no longer handles its own faults")


def shared_window_has_data(pid: int, m: Mapping) -> bool:
    """Whether the object behind the shared-memory mapping ``m`` holds data
    in the window ``m`` maps (resident or swapped pages, mapped here or
    not): one open of /proc/PID/map_files and one SEEK_DATA.  False if the
    mapping is gone.  hugetlbfs calls every byte below EOF data: such a
    window counts as holding data."""
    try:
        fd = os.open(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return os.lseek(fd, m.offset, os.SEEK_DATA) < m.offset + m.size
    except OSError as e:
        if e.errno == errno.ENXIO:
            return False                # no data at or after the window's start
        raise
    finally:
        os.close(fd)


def _hidden_extents(pid: int, m: Mapping, fd: int, shown: PageRuns) -> list[PageRuns]:
    """The data extents of ``fd`` (``m``'s object) over ``m``'s window that
    ``shown`` (its pages pagemap lists) does not cover, as address runs."""
    lo, hi = m.offset, m.offset + m.size
    out: list[PageRuns] = []
    hidden = 0
    starts: list[int] = []
    counts: list[int] = []
    pos = lo
    while True:
        data = hi
        if pos < hi:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = hi               # no data past pos
        if data < hi:
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), hi)
            starts.append(m.start + (data - lo))
            counts.append((hole - data + PAGE_SIZE - 1) // PAGE_SIZE)
            pos = hole
        if len(starts) >= _EXTENT_BATCH or (data >= hi and starts):
            # Only the runs of ``shown`` that can overlap the batch (it is
            # sorted, so is ``shown``): a set op over all of it per batch
            # took most of the time.
            i = int(np.searchsorted(shown.ends(), _U64(starts[0]), side="right"))
            end = starts[-1] + counts[-1] * PAGE_SIZE
            j = int(np.searchsorted(shown.starts, _U64(end), side="left"))
            near = PageRuns(shown.starts[i:j], shown.counts[i:j], normalized=True)
            got = PageRuns(np.array(starts, _U64), np.array(counts, _U64)).subtract(near)
            starts.clear()
            counts.clear()
            if got:
                out.append(got)
                hidden += len(got)
                if hidden > MAX_SHARED_EXTENTS:
                    raise KernelUnsupported(
                        f"process {pid}: shared memory {m.path or 'anonymous'} at "
                        f"{m.start:#x} holds data in more than {MAX_SHARED_EXTENTS} "
                        "separate pieces not mapped by the process (swapped out or "
                        "written by another process); they cannot all be listed")
        if data >= hi:
            return out


def content_changed(reader: MemReader, digests: PageDigests,
                    todo: PageRuns) -> tuple[PageRuns, int]:
    """(pages of ``todo`` whose content now differs from ``digests`` or has
    none recorded, plus those that cannot be read -- content unknown;
    pages read).  One read per buffer, digests in bulk, never a loop per
    page."""
    changed: list[np.ndarray] = []
    failed: list[PageRuns] = []
    nread = 0
    for chunk in reader.read(todo):
        if chunk.failed:
            failed.append(chunk.failed)
        if not chunk.runs:
            continue
        diff = digests.changed(chunk.runs.page_addresses(), chunk.data)
        if diff.size:
            changed.append(diff)
        nread += chunk.runs.total_pages()
    out = runs_from_addrs(np.concatenate(changed)) if changed else PageRuns.empty()
    return (out.union(PageRuns.concat(failed)) if failed else out), nread


def record_sent_digests(digests: PageDigests, region: PageRuns, runs: PageRuns, data,
                        who: str) -> None:
    """Record in ``digests`` the pages of ``runs`` inside ``region``, as
    sent (``data``: the bytes of ``runs``, concatenated)."""
    addrs = runs.page_addresses()
    inside = addrs_in(addrs, region)
    if not inside.any():
        return
    if data is None:
        raise ValueError(f"{who}: sent() of shared memory pages needs their data")
    mv = memoryview(data)
    if mv.nbytes != addrs.size * PAGE_SIZE:
        raise ValueError(f"{who}: sent() of {addrs.size} pages with {mv.nbytes} bytes of data")
    if inside.all():
        digests.update(addrs, page_digests(mv))
    else:
        rows = np.frombuffer(mv, np.uint8).reshape(-1, PAGE_SIZE)[inside]
        digests.update(addrs[inside], page_digests(rows))


# -- digest -------------------------------------------------------------------------------

class DigestTracker(Tracker):
    """Digests of what was sent vs digests of what is there now.

    collect() lists present pages from pagemap (PAGEMAP_SCAN when the
    kernel has it), reads them all with MemReader and digests them in bulk
    (page_digests).  dirty = present pages never sent or whose digest
    differs from the digest of the data sent; dropped = pages sent before
    that are no longer present.

    A page whose read fails is asked about again (``_still_present``): if
    its mapping vanished mid-read it is gone and dropped like any other.
    If it is still there -- mprotect to write-only, say: mapped, holding
    data, but not readable with process_vm_readv -- its content cannot be
    checked, so it keeps its stored digest and is reported dirty every
    round.  The engine then fails to read it, carries it, and its frozen
    final round aborts with a clear error instead of publishing an image
    without those pages (treating them as dropped did exactly that).

    No freeze: a write racing with the read is seen now or next round
    (the stored digest is of the *sent* bytes), and the caller's final
    frozen collect is exact.
    """

    name = kprobe.DIGEST

    def __init__(self, pid: int, freezer: Freezer | None = None,
                 buffer_pages: int | None = None):
        super().__init__(pid, freezer)
        with self._gone_is_no_such_process("opening pagemap"):
            self._pm = pm.Pagemap(pid)
        self._reader = MemReader(pid, buffer_pages=buffer_pages)
        self._store = PageDigests()
        self._started = False
        self.bytes_read = 0

    def _present(self, layout: Layout) -> PageRuns:
        use_scan = self._pm.has_scan
        parts = []
        for m in _migratable(layout):
            parts.append(self._pm.present_runs_scan(m) if use_scan else self._pm.present_runs(m))
        present = PageRuns.concat(parts)
        # Shared pages pagemap does not list (swapped out, never mapped here).
        return present.union(hidden_shared_runs(self.pid, layout, present))

    def _still_present(self, layout: Layout, failed: PageRuns) -> PageRuns:
        """Those of ``failed`` (pages whose read just failed) that pagemap
        still shows present or swapped: unreadable, not gone.  One scan per
        mapping that had failures, over the span of its failed pages."""
        use_scan = self._pm.has_scan
        ends = failed.starts + failed.counts * _PAGE
        parts = []
        for m in _migratable(layout):
            # failed runs overlapping m, found by bisection (runs are sorted)
            i = int(np.searchsorted(ends, _U64(m.start), side="right"))
            j = int(np.searchsorted(failed.starts, _U64(m.end), side="left"))
            if i >= j:
                continue
            lo = max(m.start, int(failed.starts[i]))
            hi = min(m.end, int(ends[j - 1]))
            # Shared memory pages carry the file bit: exclude page-cache
            # pages only where the mapping is a private file mapping.
            drop_file = m.kind == "file"
            got = (self._pm.present_runs_scan(lo, hi, exclude_file_pages=drop_file) if use_scan
                   else self._pm.present_runs(lo, hi, exclude_file_pages=drop_file))
            parts.append(got.intersect(failed))
        return PageRuns.concat(parts) if parts else PageRuns.empty()

    def start(self, layout: Layout) -> Collected:
        t0 = time.perf_counter()
        with self._gone_is_no_such_process("start"):
            present = self._present(layout)
        self._started = True
        self.rounds = 1
        return Collected(present, PageRuns.empty(), 0.0, (time.perf_counter() - t0) * 1000.0)

    def collect(self, layout: Layout) -> Collected:
        if not self._started:
            raise RuntimeError("DigestTracker.collect() before start()")
        t0 = time.perf_counter()
        dirty_parts: list[np.ndarray] = []
        failed_parts: list[PageRuns] = []
        with self._gone_is_no_such_process("collect"):
            present = self._present(layout)
            for chunk in self._reader.read(present):
                if chunk.failed:
                    failed_parts.append(chunk.failed)
                if not chunk.runs:
                    continue
                dirty_parts.append(self._store.changed(chunk.runs.page_addresses(),
                                                       chunk.data))
                self.bytes_read += len(chunk.data)
            unreadable = PageRuns.empty()
            keep = present
            if failed_parts:
                failed = PageRuns.concat(failed_parts)
                unreadable = self._still_present(layout, failed)
                keep = present.subtract(failed.subtract(unreadable))
        dropped = self._store.keep_only(keep)
        dirty = (runs_from_addrs(np.concatenate(dirty_parts)) if dirty_parts
                 else PageRuns.empty())
        if unreadable:
            dirty = dirty.union(unreadable)
        self.rounds += 1
        return Collected(dirty, dropped, 0.0, (time.perf_counter() - t0) * 1000.0)

    def sent(self, runs: PageRuns, data) -> None:
        if not runs:
            return
        addrs = runs.page_addresses()
        mv = memoryview(data)
        if mv.nbytes != addrs.size * PAGE_SIZE:
            raise ValueError(f"sent(): {addrs.size} pages but {mv.nbytes} bytes of data")
        self._store.update(addrs, page_digests(mv))

    def close(self) -> None:
        try:
            self._pm.close()
        finally:
            super().close()


# -- long-term pins (migrated/kernel/pins.py) ----------------------------------------------

# The trackers that see writes only through the target's page tables.
PAGE_TABLE_TRACKERS = (kprobe.UFFD_WP, kprobe.SOFT_DIRTY)


def pinned_runs(tracker: Tracker) -> PageRuns:
    """The long-term pinned pages of the tracker's target that it can
    locate (io_uring fixed buffers), read now: buffers can be registered
    at any time.  TargetPinsMemory if some pins cannot be located (an RDMA
    or VFIO fd opened since the tracker was chosen)."""
    with tracker._gone_is_no_such_process("checking pinned memory"):
        got = pins.read_pins(tracker.pid)
    problem = _pins_problem(got, tracker.name)
    if problem is not None:
        raise TargetPinsMemory(tracker.pid, problem, tracker.name)
    return got.runs


def _pins_problem(got: pins.Pins, tracker: str) -> str | None:
    """Why ``tracker`` cannot trust its write marks on a target with
    ``got`` (None if it can): pins nobody can locate; for uffd-wp also a
    target able to write-protect its own pages (pins.py)."""
    if got.problem is not None:
        return got.problem
    return got.self_protect if tracker == kprobe.UFFD_WP else None


# -- factory --------------------------------------------------------------------------------

TRACKER_CLASSES: dict[str, type[Tracker]] = {
    kprobe.SOFT_DIRTY: SoftDirtyTracker,
    kprobe.DIGEST: DigestTracker,
}


def make_tracker(name: str, pid: int, freezer: Freezer | None = None,
                 probe_result: dict | None = None) -> Tracker:
    """Tracker ``name`` ("auto", "uffd-wp", "soft-dirty", "digest") for ``pid``.

    "auto" asks the kernel probe (cached per process).  A forced tracker
    this kernel cannot run raises KernelUnsupported explaining why.
    """
    chosen = kprobe.select_tracker(name, probe_result)
    auto = (name or kprobe.AUTO).strip().lower() == kprobe.AUTO
    if chosen in PAGE_TABLE_TRACKERS:
        # Memory pinned at addresses we cannot locate (RDMA, VFIO) is
        # written unseen by the page tables: only digest is exact there.
        # "auto" means "the best tracker that works", so it takes digest
        # (the result names the tracker used); a tracker the operator
        # named is refused, saying why.
        with _zombie_is_gone(pid, "checking pinned memory"):
            problem = _pins_problem(pins.read_pins(pid), chosen)
        if problem is not None:
            if not auto:
                raise TargetPinsMemory(pid, problem, chosen)
            log.warning("process %d: %s; tracker digest chosen", pid, problem)
            chosen = kprobe.select_tracker(kprobe.DIGEST, probe_result)
    if chosen == kprobe.UFFD_WP:
        # Imported here: uffd.py imports this module (Tracker, Collected).
        from migrated.kernel.uffd import UffdWpTracker, uffd_wp_target_problem
        problem = uffd_wp_target_problem(pid)
        if problem is None:
            return UffdWpTracker(pid, freezer)
        if not auto:
            raise KernelUnsupported(f"tracker uffd-wp on process {pid}: {problem}; "
                                    "use --tracker digest")
        # auto: this target cannot take an injection (seccomp, traced).
        chosen = kprobe.select_tracker(kprobe.DIGEST, probe_result)
    return TRACKER_CLASSES[chosen](pid, freezer)
