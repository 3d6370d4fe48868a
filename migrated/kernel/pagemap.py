"""Bulk page state from /proc/PID/pagemap: pread + numpy, or PAGEMAP_SCAN.

Two paths give the same answer:

* ``Pagemap.read(start, end)`` -- one pread of one u64 per page, decoded
  with numpy (37 M entries/s on the development machines);
* ``Pagemap.scan(...)`` -- the PAGEMAP_SCAN ioctl (Linux 6.7+), which
  returns ranges of pages matching category bits directly, so the cost
  follows the number of runs rather than the number of pages.

Bits of a pagemap word (Documentation/admin-guide/mm/pagemap.rst) are the
``PM_*`` constants below; categories of PAGEMAP_SCAN are ``PAGE_IS_*``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import NamedTuple

import numpy as np

from migrated.errors import KernelUnsupported
from migrated.kernel import procfs
from migrated.runs import PAGE_SHIFT, PAGE_SIZE, PageRuns

_U64 = np.uint64

# -- pagemap word bits --------------------------------------------------------
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_GUARD = 1 << 58
PM_FILE = 1 << 61          # page-cache page or shared anonymous (shmem)
PM_SWAPPED = 1 << 62
PM_PRESENT = 1 << 63

# -- PAGEMAP_SCAN (include/uapi/linux/fs.h) ---------------------------------
PAGEMAP_SCAN = 0xC0606610   # _IOWR('f', 16, struct pm_scan_arg)
PM_SCAN_ARG_SIZE = 96       # 12 x u64
PAGE_REGION_SIZE = 24       # 3 x u64

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7   # 6.8+
PAGE_IS_GUARD = 1 << 8        # ~6.16+

# One pread covers at most this many bytes of pagemap words (64 MiB of
# words = 8 M pages = 32 GiB of address space); larger ranges are read in
# pieces so a sparse 128 TiB range does not allocate 256 GiB.
MAX_READ_WORD_BYTES = 64 << 20
MAX_READ_PAGES = MAX_READ_WORD_BYTES // 8
# Output regions per PAGEMAP_SCAN call: 4096 x 24 B = 96 KiB, enough for
# the run count of a typical round in one call; more loops on walk_end.
SCAN_VEC_LEN = 4096


class Regions(NamedTuple):
    """PAGEMAP_SCAN output: numpy arrays of region start, end, categories."""
    starts: np.ndarray
    ends: np.ndarray
    categories: np.ndarray

    def runs(self) -> PageRuns:
        return PageRuns(self.starts, (self.ends - self.starts) >> _U64(PAGE_SHIFT))


def _bit(words: np.ndarray, mask: int) -> np.ndarray:
    return (words & _U64(mask)) != 0


def is_present(words: np.ndarray) -> np.ndarray:
    return _bit(words, PM_PRESENT)


def is_swapped(words: np.ndarray) -> np.ndarray:
    return _bit(words, PM_SWAPPED)


def is_file(words: np.ndarray) -> np.ndarray:
    return _bit(words, PM_FILE)


def is_exclusive(words: np.ndarray) -> np.ndarray:
    return _bit(words, PM_EXCLUSIVE)


def is_uffd_wp(words: np.ndarray) -> np.ndarray:
    return _bit(words, PM_UFFD_WP)


def is_soft_dirty(words: np.ndarray) -> np.ndarray:
    return _bit(words, PM_SOFT_DIRTY)


def pfns(words: np.ndarray) -> np.ndarray:
    """PFN field (0 without CAP_SYS_ADMIN; meaningless for swapped pages)."""
    return words & _U64(PM_PFN_MASK)


def in_memory(words: np.ndarray) -> np.ndarray:
    """Present or swapped: the page holds data worth copying."""
    return _bit(words, PM_PRESENT | PM_SWAPPED)


def clear_soft_dirty(pid: int) -> None:
    """Write 4 to /proc/PID/clear_refs.  NB: succeeds silently on kernels
    without CONFIG_MEM_SOFT_DIRTY; probe support separately."""
    procfs.write_clear_refs(pid, 4)


def _range_of(a, b) -> tuple[int, int, str]:
    """(start, end, kind) from a Mapping, a (start, end) pair or two ints.
    kind is the mapping's kind, or "" for a bare range."""
    if b is not None:
        return int(a), int(b), ""
    if hasattr(a, "start") and hasattr(a, "kind"):
        return a.start, a.end, a.kind
    s, e = a
    return int(s), int(e), ""


def _check_range(start: int, end: int) -> None:
    if start % PAGE_SIZE or end % PAGE_SIZE or end < start:
        raise ValueError(f"range {start:#x}-{end:#x} is not page aligned")


class Pagemap:
    """/proc/PID/pagemap opened once.  Use as a context manager."""

    def __init__(self, pid: int, scan_vec_len: int = SCAN_VEC_LEN):
        self.pid = pid
        with procfs.translate(pid, "opening pagemap"):
            self.fd = os.open(procfs.proc_path(pid, "pagemap"), os.O_RDONLY | os.O_CLOEXEC)
        self._has_scan: bool | None = None
        self._arg = np.zeros(12, _U64)
        self._vec = np.zeros((scan_vec_len, 3), _U64)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Pagemap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- pread path ---------------------------------------------------------

    def read(self, start: int, end: int) -> np.ndarray:
        """One pagemap word per page of [start, end) as np.uint64: one pread
        (several only above MAX_READ_PAGES pages)."""
        _check_range(start, end)
        npages = (end - start) >> PAGE_SHIFT
        out = np.empty(npages, _U64)
        self._read_into(start, out)
        return out

    def _read_into(self, start: int, out: np.ndarray) -> None:
        npages = out.size
        done = 0
        while done < npages:
            want = min(npages - done, MAX_READ_PAGES)
            view = memoryview(out[done:done + want]).cast("B")
            off = ((start >> PAGE_SHIFT) + done) * 8
            with procfs.translate(self.pid, "reading pagemap"):
                got = os.preadv(self.fd, [view], off)
            if got <= 0:
                # pagemap never ends early inside the user address space;
                # a 0 here means the mm is gone (process exited).
                procfs.check_alive(self.pid, "reading pagemap")
                raise OSError(errno.EIO, f"pid {self.pid}: empty pagemap read at {off:#x}")
            # Short reads of whole words are legal: continue from there.
            done += got // 8

    def _chunks(self, start: int, end: int):
        """(chunk start, words) pieces of at most MAX_READ_PAGES pages, so a
        huge sparse range never needs its whole word array at once."""
        _check_range(start, end)
        step = MAX_READ_PAGES << PAGE_SHIFT
        buf = None
        for s in range(start, end, step):
            n = (min(end, s + step) - s) >> PAGE_SHIFT
            if buf is None or buf.size < n:
                buf = np.empty(n, _U64)
            self._read_into(s, buf[:n])
            yield s, buf[:n]

    def _runs_where(self, start: int, end: int, select) -> PageRuns:
        parts = [PageRuns.from_mask(s, select(w)) for s, w in self._chunks(start, end)]
        return parts[0] if len(parts) == 1 else PageRuns.concat(parts)

    def present_runs(self, a, b=None, *, exclude_file_pages: bool = True) -> PageRuns:
        """Pages that hold data to copy: present or swapped.

        ``a`` is a Mapping, a (start, end) pair, or start with end ``b``.
        For a private file mapping (kind "file") plain page-cache pages
        (bit 61) are left out when ``exclude_file_pages``: only pages the
        process wrote (now anonymous copies) are taken.  Other mapping
        kinds never exclude (shared anonymous pages carry bit 61 too).  For
        a bare range, ``exclude_file_pages`` applies as given.
        NB: shared-anon pages the process never touched itself are not in
        its page table and so do not show as present.
        """
        start, end, kind = _range_of(a, b)
        drop_file = exclude_file_pages and kind in ("file", "")

        def select(words):
            mask = in_memory(words)
            if drop_file:
                mask &= ~is_file(words)
            return mask
        return self._runs_where(start, end, select)

    def soft_dirty_runs(self, a, b=None, *, exclude_file_pages: bool = True,
                        present_only: bool = True) -> PageRuns:
        """Pages with bit 55 set.  ``present_only`` drops holes that only
        inherit VM_SOFTDIRTY from a new VMA (nothing there to copy).
        Meaningless on a kernel without CONFIG_MEM_SOFT_DIRTY."""
        start, end, kind = _range_of(a, b)
        drop_file = exclude_file_pages and kind in ("file", "")

        def select(words):
            mask = is_soft_dirty(words)
            if present_only:
                mask &= in_memory(words)
            if drop_file:
                mask &= ~is_file(words)
            return mask
        return self._runs_where(start, end, select)

    def present_in(self, mappings) -> PageRuns:
        """present_runs over every migratable mapping of a Layout."""
        parts = [self.present_runs(m) for m in mappings if m.migrates]
        return PageRuns.concat(parts)

    # -- PAGEMAP_SCAN path --------------------------------------------------

    @property
    def has_scan(self) -> bool:
        """Whether the kernel has PAGEMAP_SCAN (probed once, on an empty
        page of this fd)."""
        if self._has_scan is None:
            try:
                self._ioctl_scan(0, PAGE_SIZE, 0, 0, PAGE_IS_PRESENT, 0, PAGE_IS_PRESENT, 0)
                self._has_scan = True
            except OSError as e:
                # No ioctl handler on the pagemap file: a kernel before 6.7.
                if e.errno == errno.ENOTTY:
                    self._has_scan = False
                else:
                    raise
        return self._has_scan

    def _ioctl_scan(self, start, end, flags, inverted, mask, anyof, ret, max_pages) -> int:
        arg = self._arg
        arg[:] = (PM_SCAN_ARG_SIZE, flags, start, end, 0, self._vec.ctypes.data,
                  self._vec.shape[0], max_pages, inverted, mask, anyof, ret)
        buf = (ctypes.c_char * PM_SCAN_ARG_SIZE).from_buffer(arg)
        with procfs.translate(self.pid, "PAGEMAP_SCAN"):
            return fcntl.ioctl(self.fd, PAGEMAP_SCAN, buf, True)

    def scan_regions(self, start: int, end: int, category_mask: int, *,
                     category_inverted: int = 0, category_anyof_mask: int = 0,
                     return_mask: int | None = None, flags: int = 0,
                     max_pages: int = 0) -> Regions:
        """PAGEMAP_SCAN over [start, end): regions (start, end, categories).

        A page matches if ((cats ^ category_inverted) & category_mask) ==
        category_mask and, when category_anyof_mask is set, cats &
        category_anyof_mask != 0.  ``return_mask`` (default: mask | anyof)
        selects the categories reported; neighbours with equal reported
        categories merge.  Loops on walk_end when the output vector fills;
        stops after ``max_pages`` matching pages when that is non-zero.
        ``end`` must not pass the top of the user address space (EFAULT).
        """
        _check_range(start, end)
        if not self.has_scan:
            raise KernelUnsupported("PAGEMAP_SCAN needs Linux 6.7 or newer")
        if return_mask is None:
            return_mask = category_mask | category_anyof_mask
        parts = []
        pos, left = start, max_pages
        while pos < end:
            n = self._ioctl_scan(pos, end, flags, category_inverted, category_mask,
                                 category_anyof_mask, return_mask, left)
            if n:
                parts.append(self._vec[:n].copy())
            walk_end = int(self._arg[4])
            if walk_end >= end or walk_end <= pos:
                break
            if max_pages:
                found = int(((self._vec[:n, 1] - self._vec[:n, 0]) >> _U64(PAGE_SHIFT)).sum())
                left -= found
                if left <= 0:
                    break
            pos = walk_end
        if not parts:
            e = np.empty(0, _U64)
            return Regions(e, e.copy(), e.copy())
        v = np.concatenate(parts)
        return Regions(v[:, 0].copy(), v[:, 1].copy(), v[:, 2].copy())

    def scan(self, start: int, end: int, category_mask: int, category_inverted: int = 0,
             category_anyof_mask: int = 0, return_mask: int | None = None,
             flags: int = 0, max_pages: int = 0) -> PageRuns:
        """PAGEMAP_SCAN as PageRuns (categories dropped, regions merged)."""
        return self.scan_regions(start, end, category_mask,
                                 category_inverted=category_inverted,
                                 category_anyof_mask=category_anyof_mask,
                                 return_mask=return_mask, flags=flags,
                                 max_pages=max_pages).runs()

    def present_runs_scan(self, a, b=None, *, exclude_file_pages: bool = True) -> PageRuns:
        """Same answer as present_runs, computed with PAGEMAP_SCAN."""
        start, end, kind = _range_of(a, b)
        anyof = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
        if exclude_file_pages and kind in ("file", ""):
            # FILE must be clear: invert it and require it.
            return self.scan(start, end, PAGE_IS_FILE, category_inverted=PAGE_IS_FILE,
                             category_anyof_mask=anyof, return_mask=anyof)
        return self.scan(start, end, 0, category_anyof_mask=anyof, return_mask=anyof)
