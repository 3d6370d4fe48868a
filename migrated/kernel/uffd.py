"""The ``uffd-wp`` tracker: async userfaultfd write-protect + PAGEMAP_SCAN.

Exact and race-free, with no freeze in any round (Linux 6.7+, x86_64).

Setup (``UffdWp.create``): a userfaultfd belongs to the mm of the process
that calls userfaultfd(2), so the call is injected into the target with
ptrace (migrated.kernel.ptrace_inject) and the new fd is copied into the
daemon with pidfd_getfd(2), then closed again in the target: its fd table
ends as it was.  The daemon then does UFFDIO_API with WP_ASYNC (faults are
resolved by the kernel itself: a write just clears the page's uffd-wp bit,
nobody is woken) and WP_UNPOPULATED (which PAGEMAP_SCAN requires to
write-protect anonymous memory), UFFDIO_REGISTER (mode WP) on each
migratable mapping, and arms it with its first matching scan, which
write-protects exactly the resident pages (see ``UffdWpTracker._fresh``).

Each collect is one PAGEMAP_SCAN per mapping with PM_SCAN_WP_MATCHING |
PM_SCAN_CHECK_WPASYNC, selecting present-or-swapped pages and returning
WRITTEN: the kernel reports every resident page with its written bit
*and* write-protects again the written ones, under the page-table lock of
each PMD, and flushes the TLB before the call returns.  A write is either
before that (reported now) or after it (it faults, clears the bit, and is
reported next round): nothing is lost and the target never stops
(pause_ms is always 0).  The same scan gives the resident set, so dropped
pages (present at the last collect, gone now: munmap, MADV_DONTNEED) come
with no extra call.

Private file mappings.  Their plain page-cache pages are the file's, not
the target's, and must not be sent; a second scan over them, without
write-protect, tells those apart (asked of the first scan, the kernel would
look up the page behind every present entry of the whole target).  A
written page dropped again with MADV_DONTNEED leaves a uffd-wp marker that
reads as swapped although the page is the file's again: such pages are
read once to settle what they are (UffdWpTracker._file_pages).

Layout changes.  A mapping the tracker has not armed (new, or moved by
mremap, which drops the registration, or re-created at the same address:
the scan fails with EPERM for a VMA without async write-protect) is
registered and scanned once with write-protect matching: all its resident pages are
reported dirty.  A mapping that cannot be registered (no VM_MAYWRITE, an
exotic VMA type) is listed in ``skipped`` with the reason, and all its
resident pages are reported dirty every round -- correct, just not cheap;
in practice these are the [vdso] and read-only mappings.

Shared memory.  The write bit is per page-table entry of this mapping,
but shared memory (memfd, MAP_SHARED anonymous, SysV) is one object that
can change without a write through that entry: the same memfd mapped
twice (a "magic" ring buffer, a JIT's write/execute views: a store
through one view changes the other's page), pwrite(2) on the memfd,
another process's mapping.  None of these is reported, and
the image would keep the old bytes.  So each collect also compares the
content of the resident shared pages that no write bit reported with
digests of what was *sent* (``sent`` records them; the digest tracker's
page_digests, in bulk: ``_content_changed``).  A change at any time before
the read is seen now, one after it next round -- the stored digest stays
that of the sent bytes -- and the frozen final collect is exact.  A shared
page that cannot be read is reported dirty: its content is unknown, and
the engine's final round fails on it rather than keep old bytes.

Cost, measured on the development machine (frozen collect, 1% written):
256 MiB of resident memfd 5 ms without the check, 117 ms with it; 64 MiB
3 ms against 36 ms -- ~0.45 ms per MiB of resident shared memory, in every
collect, the frozen final one (downtime) included, plus as much again
spread over the sends (digesting what is sent, on the reader thread).  The
engine's downtime estimate includes collect time, so it plans for it.
Private anonymous and private file mappings are never read: a target
without shared memory pays nothing.  Rejected: re-sending every resident
shared page in the frozen round (simpler, but reads *and* sends it all
inside the downtime, more than reading and hashing it); trusting the
write bits where a page is mapped once (a forked child can write and
unmap, or exit, between two collects, and pwrite needs no mapping).

Long-term pins (migrated/kernel/pins.py): the kernel writes io_uring
fixed buffers through its own mapping of the pinned pages, with no fault
(a live migration of a target doing READ_FIXED into an 8 MiB buffer
committed all 2048 pages stale).  Each collect reads the registered
buffers from the rings' fdinfo and content-checks their resident pages
like shared memory.  Pins we cannot locate (RDMA, VFIO, iommufd fds;
more VmPin than the listed buffers account for: a ring with no fd) make
the tracker refuse the target (make_tracker; "auto" takes digest) or
fail the collect that finds them.  Cost: a readlink per open fd of the
target, each collect (measured 0.1 ms for 10 fds, 4 ms for 1000, ~100 ms
for 19000), plus the content check of resident fixed-buffer pages.

Limits (shared with soft-dirty): THP is tracked per 2 MiB page.  Short
pins (session 16 review, reproduced): an O_DIRECT read or a
process_vm_writev pins the target's pages (clearing their
write-protection), a collect's scan reports and re-protects them, and the
kernel's write through the pin lands after it, with no fault -- 3 of 9 live
migrations of a target doing 64 MiB O_DIRECT reads committed stale pages.
So each collect also compares by content the private pages the previous
collect reported written and now finds clean, against digests of what was
sent for them (``_recheck``; the frozen collect too).  A read of an
O_DIRECT file still in flight at a collect (a slow or throttled disk:
seconds) is seen in /proc/PID/task/TID/syscall of the thread waiting in
it, and its buffer counted written at every such collect and the next
(pins.direct_reads_in_flight; 3840 of 4096 pages were lost before).
Still missed: other short pins held across more than one round (an
io_uring or AIO direct read: no thread waits in it -- the engine re-checks
recent pages after the freeze for those targets; FUSE direct I/O on a file
not opened O_DIRECT), and what pins.py lists as not detected
(``--tracker digest`` compares everything).  Shared pages this mm has no entry for (never touched
through its mappings, or swapped out: a shmem page leaves no swap entry)
are found from the object's data extents (trackers.hidden_shared_runs)
and migrated as resident; and processes sharing memory with the target are not frozen with it: what
they write after the final read is not in the image.  An exec(2) of the
target ends the migration (the fd belongs to the old mm).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import select
import struct
import time

import numpy as np

from migrated.errors import (AccessDenied, KernelUnsupported, MigratedError,
                             NoSuchProcess, ZombieProcess)
from migrated.kernel import pagemap as pm
from migrated.kernel import probe as kprobe
from migrated.kernel import procfs
from migrated.kernel.freezer import Freezer
from migrated.kernel.maps import Layout, Mapping
from migrated.kernel.ptrace_inject import (SYS_CLOSE, SYS_USERFAULTFD, InjectionError,
                                           Injector, check_arch, pidfd_getfd)
from migrated.kernel.pins import direct_reads_in_flight
from migrated.kernel.reader import MemReader
from migrated.kernel.trackers import (Collected, PageDigests, Tracker, addrs_in,
                                      content_changed, hidden_shared_runs, mapping_runs,
                                      page_digests, pinned_runs, record_sent_digests,
                                      runs_from_addrs, shared_anon_runs)
from migrated.runs import PAGE_SHIFT, PAGE_SIZE, PageRuns

_U64 = np.uint64

# -- include/uapi/linux/userfaultfd.h ------------------------------------------
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFDIO_API = 0xC018AA3F          # struct uffdio_api {api, features, ioctls}
UFFDIO_REGISTER = 0xC020AA00     # struct uffdio_register {start, len, mode, ioctls}
UFFDIO_UNREGISTER = 0x8010AA01   # struct uffdio_range {start, len}
UFFDIO_WRITEPROTECT = 0xC018AA06  # struct uffdio_writeprotect {start, len, mode}
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
REQUIRED_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
OPTIONAL_FEATURES = UFFD_FEATURE_WP_HUGETLBFS_SHMEM

# What /proc/self/fd/N of a userfaultfd reads as.
UFFD_LINK = "anon_inode:[userfaultfd]"

_API = struct.Struct("=3Q")
_REGISTER = struct.Struct("=4Q")
_RANGE = struct.Struct("=2Q")
_WRITEPROTECT = struct.Struct("=3Q")

# Flags of the userfaultfd created in the target: user-mode faults only
# (allowed without CAP_SYS_PTRACE whatever vm.unprivileged_userfaultfd
# says; async write-protect resolves kernel-mode writes too), close-on-exec
# and non-blocking (nobody ever reads it: WP_ASYNC raises no events).
TARGET_UFFD_FLAGS = UFFD_USER_MODE_ONLY | os.O_CLOEXEC | os.O_NONBLOCK

# One collect scan: resident pages (present or swapped), reporting whether
# each was written.  Not whether it is a page-cache page: asking that makes
# the kernel look up the page of every present entry (vm_normal_page), 4x
# the cost of the whole scan for a mostly anonymous 256 MiB target (6-8 ms
# against 1.5-1.8 ms).  Private file mappings get a scan of their own for
# that, without write-protecting (_file_pages).
_SCAN_FLAGS = pm.PM_SCAN_WP_MATCHING | pm.PM_SCAN_CHECK_WPASYNC
_RESIDENT = pm.PAGE_IS_PRESENT | pm.PAGE_IS_SWAPPED
_SCAN_RETURN = pm.PAGE_IS_WRITTEN | pm.PAGE_IS_PRESENT
# A page-cache scan spans file mappings across private anonymous ones of
# up to this size in all (their present pages cost a page lookup each).
_SPAN_JOIN_BYTES = 2 << 20
# Pages read at a time to settle ambiguous entries of private file
# mappings (_file_pages); normally there are none.
_SETTLE_READ_PAGES = 256
# Buffer of the content check of shared memory (_content_changed), 4 MiB:
# 256 MiB checked in 111-123 ms with it, the same as with MemReader's
# 16 MiB default (hashing, not reading, dominates).  Allocated only for a
# target that has shared memory.
_CONTENT_READ_PAGES = 1024


def _ioctl(fd: int, req: int, arg: bytearray, what: str) -> bytearray:
    try:
        fcntl.ioctl(fd, req, arg, True)
    except OSError as e:
        raise OSError(e.errno, f"{what}: {os.strerror(e.errno)}") from None
    return arg


class UffdWp:
    """A userfaultfd of another process's mm, in async write-protect mode."""

    def __init__(self, pid: int, fd: int, features: int):
        self.pid = pid
        self.fd = fd
        self.features = features

    @classmethod
    def create(cls, pid: int, pidfd: int | None = None) -> "UffdWp":
        """Create the fd inside ``pid`` (ptrace injection), take it out with
        pidfd_getfd, close it there, and do the UFFDIO_API handshake.  The
        target is released (not stopped, not traced) on every path."""
        check_arch()
        own_pidfd = pidfd is None
        if own_pidfd:
            with procfs.translate(pid, "pidfd_open"):
                pidfd = os.pidfd_open(pid)
        fd = -1
        try:
            with Injector(pid) as inj:
                tfd = inj.call(SYS_USERFAULTFD, TARGET_UFFD_FLAGS)
                if tfd < 0:
                    why = os.strerror(-tfd)
                    if tfd in (-errno.ENOSYS, -errno.EPERM):
                        raise KernelUnsupported(
                            f"userfaultfd() inside process {pid} failed: {why} (kernel "
                            "without CONFIG_USERFAULTFD, or forbidden); use --tracker digest")
                    raise InjectionError(f"userfaultfd() inside process {pid} failed: {why}")
                try:
                    with procfs.translate(pid, "pidfd_getfd"):
                        fd = pidfd_getfd(pidfd, tfd)
                    # A target thread closing and reusing fd numbers behind
                    # our back would hand us some other file: check.
                    kind = os.readlink(f"/proc/self/fd/{fd}")
                    if kind != UFFD_LINK:
                        raise InjectionError(f"process {pid}: fd {tfd} is {kind!r}, not "
                                             "the userfaultfd just created (fd reused?)")
                finally:
                    # Leave the target's fd table as it was, even if the copy failed.
                    inj.call(SYS_CLOSE, tfd)
            self = cls(pid, fd, 0)
            fd = -1
            try:
                self.api()
            except BaseException:
                self.close()
                raise
            return self
        finally:
            if fd >= 0:
                os.close(fd)
            if own_pidfd:
                os.close(pidfd)

    def api(self) -> int:
        """UFFDIO_API handshake asking for WP_ASYNC|WP_UNPOPULATED (plus
        WP_HUGETLBFS_SHMEM when the kernel offers it)."""
        want = REQUIRED_FEATURES | OPTIONAL_FEATURES
        arg = bytearray(_API.pack(UFFD_API, want, 0))
        try:
            _ioctl(self.fd, UFFDIO_API, arg, "UFFDIO_API")
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # An unknown feature bit is EINVAL: retry with the required ones.
            arg = bytearray(_API.pack(UFFD_API, REQUIRED_FEATURES, 0))
            try:
                _ioctl(self.fd, UFFDIO_API, arg, "UFFDIO_API")
            except OSError as e2:
                raise KernelUnsupported(
                    f"userfaultfd of process {self.pid}: kernel refuses WP_ASYNC|"
                    f"WP_UNPOPULATED ({e2.strerror}); needs Linux 6.7+ with "
                    "CONFIG_PTE_MARKER_UFFD_WP; use --tracker digest") from e2
        _, self.features, _ = _API.unpack(arg)
        return self.features

    def register(self, start: int, end: int) -> None:
        """UFFDIO_REGISTER [start, end) in write-protect mode (idempotent)."""
        arg = bytearray(_REGISTER.pack(start, end - start, UFFDIO_REGISTER_MODE_WP, 0))
        _ioctl(self.fd, UFFDIO_REGISTER, arg,
               f"UFFDIO_REGISTER {start:#x}-{end:#x} of process {self.pid}")

    def unregister(self, start: int, end: int) -> None:
        arg = bytearray(_RANGE.pack(start, end - start))
        _ioctl(self.fd, UFFDIO_UNREGISTER, arg,
               f"UFFDIO_UNREGISTER {start:#x}-{end:#x} of process {self.pid}")

    def protect(self, start: int, end: int, wp: bool = True) -> None:
        """UFFDIO_WRITEPROTECT: set (or clear) write-protection on every
        page of [start, end), including not-yet-populated ones.  The
        tracker does not use it (see UffdWpTracker._fresh: the markers it
        leaves in empty PTEs read as swapped pages)."""
        arg = bytearray(_WRITEPROTECT.pack(start, end - start,
                                           UFFDIO_WRITEPROTECT_MODE_WP if wp else 0))
        _ioctl(self.fd, UFFDIO_WRITEPROTECT, arg,
               f"UFFDIO_WRITEPROTECT {start:#x}-{end:#x} of process {self.pid}")

    def close(self) -> None:
        """Closing the last reference unregisters every range and drops the
        write-protect bits (the kernel's release path)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _gone(pid: int, pidfd: int, what: str) -> None:
    """Raise NoSuchProcess if the process behind ``pidfd`` exited (zombie
    included): a scan of its dead mm reads as empty, not as an error."""
    r, _, _ = select.select([pidfd], [], [], 0)
    if r:
        raise NoSuchProcess(pid, f"uffd-wp tracker: {what}")


def _file_spans(group: list[Mapping]) -> list[tuple[int, int]]:
    """[start, end) spans covering the private file mappings of ``group``
    (address-adjacent mappings, in order) for one page-cache scan each: a
    span runs from a file mapping to the last file mapping after it that is
    separated from it only by private anonymous mappings of at most
    _SPAN_JOIN_BYTES in all."""
    spans: list[list[int]] = []
    gap = None          # anonymous bytes since the last file mapping, or None: no span open
    for m in group:
        if m.kind == "file":
            if gap is not None:
                spans[-1][1] = m.end
            else:
                spans.append([m.start, m.end])
            gap = 0
        elif gap is not None and m.kind == "anon" and gap + (m.end - m.start) <= _SPAN_JOIN_BYTES:
            gap += m.end - m.start
        else:
            gap = None
    return [(a, b) for a, b in spans]


class UffdWpTracker(Tracker):
    """Exact dirty pages with no freeze: see the module docstring.

    ``skipped``: {(start, end): reason} of mappings that could not be
    registered (reported wholly dirty each round).  ``scan_calls``: the
    PAGEMAP_SCAN calls of the last collect.
    """

    name = kprobe.UFFD_WP

    def __init__(self, pid: int, freezer: Freezer | None = None):
        super().__init__(pid, freezer)
        check_arch()
        with procfs.translate(pid, "pidfd_open"):
            self._pidfd = os.pidfd_open(pid)
        self._pm: pm.Pagemap | None = None
        self._uffd: UffdWp | None = None
        try:
            procfs.check_alive(pid, "uffd-wp tracker")
            self._pm = pm.Pagemap(pid)
            if not self._pm.has_scan:
                raise KernelUnsupported("uffd-wp tracker needs PAGEMAP_SCAN (Linux 6.7+); "
                                        "use --tracker digest")
        except ZombieProcess as e:
            self.close()
            raise NoSuchProcess(pid, "uffd-wp tracker (exited, not yet reaped)") from e
        except BaseException:
            self.close()
            raise
        self._armed = PageRuns.empty()      # ranges registered + protected
        self._known = PageRuns.empty()      # resident at the last collect
        self._hidden = PageRuns.empty()     # of those, found only in the object
        self._pending = PageRuns.empty()    # reported dirty, not yet sent
        self._shared = PageRuns.empty()     # shared-anon mappings of the last layout
        self._sent_digests = PageDigests()  # of shared pages, as sent
        # Short pins (module doc, "Limits"): the private pages the last
        # collect reported written, and digests of them as sent since; the
        # next collect re-checks by content those it finds clean.
        self._recheck = PageRuns.empty()
        self._recheck_digests = PageDigests()
        self._inflight = PageRuns.empty()   # buffers of direct reads in flight
        self.recheck_ms = 0.0               # the last collect's content check of them
        self.recheck_pages = 0
        self._content_reader: MemReader | None = None
        self.skipped: dict[tuple[int, int], str] = {}
        self.scan_calls = 0
        self.setup_ms = 0.0
        # Content check of shared memory in the last collect: pages read
        # and digested, and its share of the collect's wall time.
        self.content_pages = 0
        self.content_ms = 0.0

    # -- pieces -----------------------------------------------------------------

    def _arm(self, m: Mapping) -> bool:
        """Register one mapping (mode WP); False (and a ``skipped`` entry)
        if the kernel refuses.  Nothing is write-protected here: the first
        scan of the mapping protects its resident pages (see _fresh)."""
        try:
            self._uffd.register(m.start, m.end)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise NoSuchProcess(self.pid, "uffd-wp register") from e
            self.skipped[(m.start, m.end)] = (
                f"{m.path or m.kind} {m.start:#x}-{m.end:#x} {m.perms}: {e.strerror}")
            return False
        self.skipped.pop((m.start, m.end), None)
        return True

    def _scan_group(self, group: list[Mapping]) -> tuple[PageRuns, PageRuns] | None:
        """(resident, written) of consecutive armed mappings with ONE
        write-protecting scan (written pages protected again); None if some
        VMA in the span has no async write-protect (EPERM from
        CHECK_WPASYNC).  Page-cache pages of private file mappings are
        taken out of both (_file_pages)."""
        start, end = group[0].start, group[-1].end
        reg = self._scan(start, end, _RESIDENT, _SCAN_RETURN, _SCAN_FLAGS)
        if reg is None:
            return None
        counts = (reg.ends - reg.starts) >> _U64(PAGE_SHIFT)
        cats = reg.categories
        is_w = (cats & _U64(pm.PAGE_IS_WRITTEN)) != 0
        resident = PageRuns(reg.starts, counts)
        written = PageRuns(reg.starts[is_w], counts[is_w])
        # Not present but resident reads as swapped: a real swap entry, or a
        # uffd-wp marker left where a page of a file-backed mapping was
        # unmapped (see _file_pages for private file mappings).
        gone = (cats & _U64(pm.PAGE_IS_PRESENT)) == 0
        gone = PageRuns(reg.starts[gone], counts[gone]) if gone.any() else PageRuns.empty()
        shared = [m for m in group if m.kind == "shared-anon"]
        if shared and gone:
            # Shared memory keeps no swap entries in page tables: there it is
            # always a marker, left by reclaim or MADV_DONTNEED (content kept)
            # or by MADV_REMOVE / a hole punched in the memfd (content now
            # zeros), which no write reports.  Sent again: it reads back what
            # is there now, and the read maps it, protected, for next time.
            written = written.union(gone.intersect(mapping_runs(shared)))
        files = [m for m in group if m.kind == "file"]
        if files and resident:
            unsure = gone.intersect(mapping_runs(files)) if gone else gone
            cache = self._file_pages(group, unsure)
            if cache:
                resident = resident.subtract(cache)
                written = written.subtract(cache)
        return resident, written

    def _scan(self, start: int, end: int, anyof: int, ret: int, flags: int,
              mask: int = 0) -> pm.Regions | None:
        self.scan_calls += 1
        try:
            return self._pm.scan_regions(start, end, mask, category_anyof_mask=anyof,
                                         return_mask=ret, flags=flags)
        except AccessDenied as e:
            # The pagemap fd is open already: EPERM here is CHECK_WPASYNC
            # hitting a VMA we have not registered.
            if isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.EPERM:
                return None
            raise

    def _file_pages(self, group: list[Mapping], unsure: PageRuns) -> PageRuns:
        """Plain page-cache pages of the private file mappings of ``group``:
        the file's, not the target's (its own are the copies its writes
        made).  Scanned without write-protecting (a write racing with it is
        in the write-protecting scan, now or next round), over spans of
        file mappings joined across small private anonymous ones (.bss
        after .data: a few page lookups cost less than another call; such
        pages are never page-cache pages).

        ``unsure``: pages of those mappings that read as swapped.  That can
        be a marker: MADV_DONTNEED of a written page in a registered file
        mapping leaves a uffd-wp marker, which PAGEMAP_SCAN (like pagemap)
        reports as swapped -- yet the copy is gone and the page reads as
        the file again.  Taken for resident, the destination would keep
        the old copy.  So they are read first (that maps the file's page
        for a marker, brings a real swap entry back) and the scan then
        classifies them with the rest: no stale copy survives a round.
        """
        if unsure:
            for _ in MemReader(self.pid, buffer_pages=_SETTLE_READ_PAGES).read(unsure):
                pass        # a page that cannot be read stays as reported
        starts, counts = [], []
        for lo, hi in _file_spans(group):
            # Only page-cache pages match: the kernel reports nothing else.
            reg = self._scan(lo, hi, _RESIDENT, pm.PAGE_IS_FILE, 0, mask=pm.PAGE_IS_FILE)
            if reg is not None and reg.starts.size:
                starts.append(reg.starts)
                counts.append((reg.ends - reg.starts) >> _U64(PAGE_SHIFT))
        if not starts:
            return PageRuns.empty()
        return PageRuns(np.concatenate(starts), np.concatenate(counts))

    def _fresh(self, group: list[Mapping]) -> PageRuns:
        """Mappings not (or no longer) armed: register them, then one
        matching scan each reports every resident page (all dirty) and
        write-protects it.  A write before the scan is in what is read
        next; one after it is reported next round.

        Why not UFFDIO_WRITEPROTECT over the whole mapping: with
        WP_UNPOPULATED that fills every empty PTE with a uffd-wp marker
        (page tables for the whole reservation: 2 MiB per GiB), and the
        markers read as swapped pages in pagemap.  Empty PTEs need no
        protection: the first write to one maps a page without the
        uffd-wp bit, which PAGEMAP_SCAN reports as written."""
        parts = []
        for m in group:
            armed = (m.start, m.end) not in self.skipped and self._arm(m)
            got = self._scan_group([m]) if armed else None
            if got is None:
                # Not registrable (or lost the registration again, racing
                # with the target): its resident pages are dirty every round.
                self.scan_calls += 1
                parts.append(self._pm.present_runs_scan(m))
                continue
            self._armed = self._armed.union(m.runs())
            parts.append(got[0])
        return PageRuns.concat(parts)

    def _groups(self, layout: Layout) -> tuple[list[list[Mapping]], list[Mapping]]:
        """(groups of address-consecutive armed mappings, one scan each;
        mappings to arm or that cannot be armed)."""
        migr = [m for m in layout if m.migrates]
        if not migr:
            return [], []
        starts = np.array([m.start for m in migr], _U64)
        ends = np.array([m.end for m in migr], _U64)
        a = self._armed
        if a:
            i = np.searchsorted(a.starts, starts, side="right").astype(np.int64) - 1
            ok = i >= 0
            ii = np.maximum(i, 0)
            armed = ok & (ends <= a.starts[ii] + a.counts[ii] * _U64(PAGE_SIZE))
        else:
            armed = np.zeros(len(migr), bool)
        armed = armed.tolist()
        groups: list[list[Mapping]] = []
        fresh: list[Mapping] = []
        prev_end = -1       # end of the last mapping of the open group
        k = 0
        for m in layout:
            if not m.migrates:
                prev_end = -1           # a VMA we never arm breaks the span
                continue
            is_armed = armed[k] and (m.start, m.end) not in self.skipped
            k += 1
            if not is_armed:
                fresh.append(m)
                prev_end = -1
                continue
            if prev_end >= 0 and groups:
                groups[-1].append(m)
            else:
                groups.append([m])
            prev_end = m.end
        return groups, fresh

    def _round(self, layout: Layout) -> tuple[PageRuns, PageRuns, PageRuns]:
        """(resident, must-send, hidden) over the migratable mappings of
        layout; hidden: the shared pages of resident no page table showed."""
        resident, send = [], []
        self.scan_calls = 0
        groups, fresh = self._groups(layout)
        for g in groups:
            got = self._scan_group(g)
            if got is None:
                # A VMA of the span lost its registration (re-created,
                # mremap): pages protected by the failed call may not have
                # been reported -- treat the whole span as fresh.
                fresh.extend(g)
            else:
                resident.append(got[0])
                send.append(got[1])
        if fresh:
            r = self._fresh(fresh)
            resident.append(r)
            send.append(r)
        _gone(self.pid, self._pidfd, "collect")
        if self.skipped:
            keys = {(m.start, m.end) for m in layout}
            self.skipped = {k: v for k, v in self.skipped.items() if k in keys}
        # Forget ranges that are no longer mapped: a mapping re-created
        # there later must be armed again.
        self._armed = self._armed.intersect(layout.runs())
        resident = PageRuns.concat(resident)
        # Shared pages the page tables do not show (swapped out, written
        # by pwrite or another process) are resident for us too.
        hidden = hidden_shared_runs(self.pid, layout, resident)
        return resident.union(hidden), PageRuns.concat(send), hidden

    def _content_changed(self, todo: PageRuns, digests: PageDigests | None = None) -> PageRuns:
        """Pages of ``todo`` (resident pages no write bit reported: shared
        memory, or the last round's pages re-checked for short pins) whose
        content is not what was sent: digest differs, never sent, or
        unreadable (content unknown: the engine cannot read it either and
        its final round says so).  One process_vm_readv per buffer, digests
        in bulk (page_digests), never a loop per page.  ``digests``: what
        to compare with (default: the shared pages' as sent)."""
        digests = self._sent_digests if digests is None else digests
        if not todo:
            return PageRuns.empty()
        if self._content_reader is None:
            self._content_reader = MemReader(self.pid, buffer_pages=_CONTENT_READ_PAGES)
        changed, nread = content_changed(self._content_reader, digests, todo)
        self.content_pages += nread
        return changed

    # -- Tracker ------------------------------------------------------------------

    def start(self, layout: Layout) -> Collected:
        t0 = time.perf_counter()
        _gone(self.pid, self._pidfd, "start")
        try:
            self._uffd = UffdWp.create(self.pid, self._pidfd)
        except ZombieProcess as e:
            raise NoSuchProcess(self.pid, "uffd-wp setup (exited, not yet reaped)") from e
        self.setup_ms = (time.perf_counter() - t0) * 1000.0
        with self._zombie_gone("start"):
            resident, _, self._hidden = self._round(layout)
        self._known = resident
        self._pending = resident
        self._shared = shared_anon_runs(layout).union(pinned_runs(self))
        self.rounds = 1
        return Collected(resident, PageRuns.empty(), 0.0, (time.perf_counter() - t0) * 1000.0)

    def collect(self, layout: Layout) -> Collected:
        if self._uffd is None:
            raise RuntimeError("UffdWpTracker.collect() before start()")
        t0 = time.perf_counter()
        with self._zombie_gone("collect"):
            resident, written, hidden = self._round(layout)
        # Pages the last collect found only in the object were read since
        # (sent): the read faulted them in without the write-protect bit,
        # and where their 2 MiB block had no page table the scan reports
        # that as written -- every page of a deleted library the process
        # had not touched went twice (7743 of 12481 pages of a numpy
        # process, the second time inside the freeze).  They are shared
        # memory: the content check below compares them with what was sent.
        if self._hidden:
            written = written.subtract(self._hidden)
        self._hidden = hidden
        # Written pages are resident by construction; add pages resident
        # now that were not at the last collect (armed while populated,
        # faulted in by a read: zero page) and pages reported before but
        # never confirmed sent.
        dirty = written.union(resident.subtract(self._known))
        if self._pending:
            dirty = dirty.union(self._pending.intersect(resident))
        # Direct reads in flight (pins.direct_reads_in_flight): after the
        # scan, so a read it found written and that ends before this look
        # is read after its end; counted now and at the next collect.
        # Frozen, no thread is in one (the freeze waited for every thread
        # to stop, which a direct read does only once done): the last
        # collect's count stands, and ~12 us a thread stays out of the freeze.
        if self._freezer is not None and self._freezer.is_frozen:
            inflight = PageRuns.empty()
        else:
            with self._zombie_gone("collect (reads in flight)"):
                inflight = direct_reads_in_flight(self.pid)
        reading = inflight.union(self._inflight)
        self._inflight = inflight
        if reading:
            dirty = dirty.union(reading.intersect(resident))
        self.content_ms = 0.0
        self.content_pages = 0
        self.recheck_ms = 0.0
        self.recheck_pages = 0
        # Short pins: what the last collect reported written and the scan
        # now finds clean may have been written through a pin after that
        # scan re-protected it -- compare with what was sent.
        recheck = self._recheck.intersect(resident).subtract(dirty)
        if recheck:
            t1 = time.perf_counter()
            with self._zombie_gone("collect (content check of the last round)"):
                dirty = dirty.union(self._content_changed(recheck, self._recheck_digests))
            self.recheck_ms = (time.perf_counter() - t1) * 1000.0
            self.recheck_pages, self.content_pages = self.content_pages, 0
        # Shared memory: the write bits only see stores through this
        # mapping's page table; compare the content of the rest with what
        # was sent (module docstring, "Shared memory").  So with long-term
        # pins (io_uring fixed buffers, read again each collect: they can
        # be registered at any time): the kernel writes them without a
        # fault ("Limits").
        self._shared = shared_anon_runs(layout).union(pinned_runs(self))
        self._recheck = written.subtract(self._shared) if self._shared else written
        self._recheck_digests = PageDigests()
        if self._shared or len(self._sent_digests):
            t1 = time.perf_counter()
            shared_resident = resident.intersect(self._shared)
            self._sent_digests.keep_only(shared_resident)
            with self._zombie_gone("collect (content check of shared memory)"):
                dirty = dirty.union(self._content_changed(shared_resident.subtract(dirty)))
            self.content_ms = (time.perf_counter() - t1) * 1000.0
        dropped = self._known.subtract(resident)
        self._known = resident
        self._pending = dirty
        self.rounds += 1
        return Collected(dirty, dropped, 0.0, (time.perf_counter() - t0) * 1000.0)

    def sent(self, runs: PageRuns, data=None) -> None:
        """Confirm ``runs`` sent; ``data`` (their bytes, concatenated) is
        needed when they include shared memory: the digests of what was
        sent are what the next content check compares with."""
        if not runs:
            return
        # Most buffers hold no shared memory: one run intersection says so,
        # before any per-page array.
        if self._shared and runs.intersect(self._shared):
            record_sent_digests(self._sent_digests, self._shared, runs, data,
                                f"uffd-wp tracker of process {self.pid}")
        if self._recheck and data is not None and runs.intersect(self._recheck):
            addrs = runs.page_addresses()
            inside = addrs_in(addrs, self._recheck)
            mv = memoryview(data)
            if inside.any() and mv.nbytes == addrs.size * PAGE_SIZE:
                rows = np.frombuffer(mv, np.uint8).reshape(-1, PAGE_SIZE)
                self._recheck_digests.update(addrs[inside], page_digests(
                    rows if inside.all() else rows[inside]))
        if self._pending:
            self._pending = self._pending.subtract(runs)

    def close(self) -> None:
        self._content_reader = None         # its buffer is unmapped when collected
        self._sent_digests = PageDigests()
        self._recheck_digests = PageDigests()
        try:
            if self._uffd is not None:
                self._uffd.close()
                self._uffd = None
            if self._pm is not None:
                self._pm.close()
                self._pm = None
            if getattr(self, "_pidfd", -1) >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
        finally:
            super().close()

    @contextlib.contextmanager
    def _zombie_gone(self, what: str):
        try:
            yield
        except ZombieProcess as e:
            raise NoSuchProcess(self.pid, f"uffd-wp tracker: {what} (exited, "
                                          "not yet reaped)") from e
        except NoSuchProcess:
            raise
        except MigratedError:
            # /proc answers about a process that just died can be anything
            # (AccessDenied on its pagemap, ...): say "gone" when it is.
            _gone(self.pid, self._pidfd, what)
            raise


def uffd_wp_target_problem(pid: int) -> str | None:
    """Why this tracker cannot be used on ``pid`` (None if it can): a
    seccomp filter (an injected call could kill it) or another tracer.
    NoSuchProcess if it is gone (a zombie too)."""
    try:
        procfs.check_alive(pid, "uffd-wp tracker")
        status = procfs.read_status(pid)
    except ZombieProcess as e:
        raise NoSuchProcess(pid, "uffd-wp tracker (exited, not yet reaped)") from e
    if status.get("Seccomp", "0") != "0":
        return f"process {pid} runs under seccomp: syscall injection is unsafe"
    if status.get("TracerPid", "0") != "0":
        return f"process {pid} is traced by process {status['TracerPid']} (a debugger?)"
    return None


# -- capability probe ---------------------------------------------------------------

# The self-test child writes this page offset of its buffer.
_SELFTEST_PAGES = 4
_SELFTEST_WRITE_PAGE = 2


def _selftest() -> tuple[bool, str]:
    """End to end on a forked child: inject, register, protect, let the
    child write one page, expect exactly that page from one scan."""
    with kprobe.FORK_LOCK:        # (see there)
        return _forked_selftest()


def _forked_selftest() -> tuple[bool, str]:
    buf = mmap.mmap(-1, _SELFTEST_PAGES * PAGE_SIZE,
                    flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    go_r, go_w = os.pipe()
    ack_r, ack_w = os.pipe()
    pid = -1
    try:
        buf[:] = b"\1" * len(buf)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        pid = os.fork()
        if pid == 0:  # child: wait, write one page, ack, wait, exit
            try:
                os.close(go_w)
                os.close(ack_r)
                if os.read(go_r, 1):
                    off = _SELFTEST_WRITE_PAGE * PAGE_SIZE
                    buf[off:off + 1] = b"\2"
                    os.write(ack_w, b"k")
                    os.read(go_r, 1)
            finally:
                os._exit(0)
        os.close(go_r)
        os.close(ack_w)
        go_r = ack_w = -1
        try:
            uffd = UffdWp.create(pid)
        except MigratedError as e:
            return False, f"creating a userfaultfd in a child: {e}"
        try:
            end = addr + _SELFTEST_PAGES * PAGE_SIZE
            uffd.register(addr, end)
            with pm.Pagemap(pid) as pmap:
                armed = pmap.scan(addr, end, pm.PAGE_IS_WRITTEN, flags=_SCAN_FLAGS)
                if armed.total_pages() != _SELFTEST_PAGES:
                    return False, f"uffd-wp self-test: arming scan found {armed}"
                os.write(go_w, b"g")
                if os.read(ack_r, 1) != b"k":
                    return False, "self-test child died"
                got = pmap.scan(addr, end, pm.PAGE_IS_WRITTEN, flags=_SCAN_FLAGS)
                again = pmap.scan(addr, end, pm.PAGE_IS_WRITTEN, flags=_SCAN_FLAGS)
        except OSError as e:
            return False, f"uffd-wp self-test: {e}"
        finally:
            uffd.close()
        want = [(addr + _SELFTEST_WRITE_PAGE * PAGE_SIZE, 1)]
        if got.pairs() != want or again:
            return False, (f"uffd-wp self-test: expected written pages {want}, got "
                           f"{got.pairs()} then {again.pairs()}")
        return True, "self-test passed (inject, register, write, scan)"
    finally:
        for fd in (go_r, go_w, ack_r, ack_w):
            if fd >= 0:
                os.close(fd)
        if pid > 0:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        with contextlib.suppress(BufferError):
            buf.close()


@functools.lru_cache(maxsize=1)
def uffd_wp_tracker_available() -> tuple[bool, str]:
    """(usable, reason): x86_64, async uffd write-protect, PAGEMAP_SCAN with
    the WPALLOWED/WRITTEN categories, ptrace allowed -- proven by a
    self-test on a forked child.  Cached per process."""
    try:
        check_arch()
    except KernelUnsupported as e:
        return False, str(e)
    ok, why, _ = kprobe.probe_uffd_wp_async()
    if not ok:
        return False, why
    ok, cats, why = kprobe.probe_pagemap_scan()
    if not ok:
        return False, why
    if not {"wpallowed", "written"} <= set(cats):
        return False, "PAGEMAP_SCAN lacks the WPALLOWED/WRITTEN categories"
    return _selftest()
