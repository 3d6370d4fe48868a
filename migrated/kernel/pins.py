"""Long-term pins: target memory the kernel writes without a page fault.

The page-table trackers (uffd-wp, soft-dirty) see a write only when it goes
through the target's page tables.  A page pinned with FOLL_LONGTERM is
written by the kernel or a device through its own mapping of the page:
no fault, no write bit, no soft-dirty bit.  Such pins are held across
rounds -- for the life of a ring, a memory registration, a DMA mapping --
so the short-pin re-check of the uffd-wp tracker (last round's pages)
cannot see them either.  Measured: a live migration of a target doing
IORING_OP_READ_FIXED into an 8 MiB registered buffer committed 2048 of
2048 pages stale with uffd-wp (0 with digest).

What a migrator can locate, from /proc/PID/fd and fdinfo:

* io_uring registered (fixed) buffers: the fdinfo of a ring lists them,
  ``UserBufs:\\t<n>`` then one ``<index>: 0x<addr>/<len>`` line per buffer
  (``<index>: <none>`` for an empty slot of a sparse table, 6.13+).  The
  kernel prints the list only when it gets the ring's lock without waiting
  (mutex_trylock): a busy ring shows the count and no lines (6.1), or no
  UserBufs line at all (6.18: seen in 14 of 3000 reads of a ring doing
  READ_FIXED flat out) -- asked again a few times, then given up as
  unlocatable.  Buffers can be registered at any time, so the trackers
  read this every collect.
* Not locatable: an RDMA memory registration (/dev/infiniband/uverbs*),
  a VFIO or iommufd DMA mapping (/dev/vfio/*, /dev/iommu).  Nothing in
  /proc says which addresses they pin.  The page-table trackers refuse
  such a target (``--tracker digest`` compares content and is exact).
* Not in any fd: an io_uring whose fd was closed after registering it as
  a ring fd (IORING_REGISTER_RING_FDS; liburing's io_uring_close_ring_fd)
  keeps working with no fd to read -- and with IORING_SETUP_NO_MMAP no
  mapping either.  The kernel still counts its buffers in VmPin (pinned_vm,
  as RDMA's): pinned memory beyond what the listed buffers can account for
  is refused like an RDMA fd.

Not detected (limits): VFIO and AF_XDP umems are counted in locked_vm of
the user (not per process) and AF_XDP sockets are not told apart in
/proc/PID/fd; the rings of an IORING_SETUP_NO_MMAP io_uring (the kernel
writes completions into the target's own pinned pages) are not in VmPin.
A buffer in a 1 GiB hugetlb page is accounted whole by io_uring and so
refused (safe, not exact).

The same fd scan notes what lets the target write-protect its own pages
(``Pins.self_protect``): a userfaultfd of its own -- UFFDIO_WRITEPROTECT
acts on any range of its mm registered for write-protect, the uffd-wp
tracker's included (6.18 checks no owner) -- or a pagemap file, whose
PAGEMAP_SCAN with PM_SCAN_WP_MATCHING re-protects every VMA with async
write-protect, ours too (on memory nobody registered it does nothing).
Either takes the "written" marks of pages written since our last
collect: 16 of 16 such pages were stale in a committed image.  Only the
uffd-wp tracker is concerned; it refuses such a target (``auto`` takes
digest).  Not seen: a pagemap opened and closed between two collects, and
a userfaultfd made in the target and kept only by another process.

Everything read here is the target's: counts, addresses and lengths are
bounded before use (a buffer is at most 1 GiB, a ring has at most 16384,
the file is parsed line by line and never held whole).
"""

from __future__ import annotations

import errno
import os
import re
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from migrated.kernel import procfs
from migrated.runs import PAGE_SHIFT, PAGE_SIZE, PageRuns

_U64 = np.uint64

IO_URING_LINK = "anon_inode:[io_uring]"
# fds that let the target write-protect its own pages (module doc).
USERFAULTFD_LINK = "anon_inode:[userfaultfd]"
# A pagemap file, by the end of its path only: the fd's link is the path
# from our root, so a procfs mounted elsewhere (in a chroot, at
# /host/proc) reads "/srv/root/proc/PID/pagemap" -- with the "/proc/"
# prefix required, such a target got uffd-wp and 16 of 16 pages it wrote
# just before the freeze were stale in the image.
_PAGEMAP_LINK = re.compile(r"(?:.*/)?[0-9]+(?:/task/[0-9]+)?/pagemap")
# Device files whose fds pin user memory at addresses /proc does not show.
_UNLOCATABLE = (("/dev/infiniband/uverbs", "an RDMA memory registration (uverbs)"),
                ("/dev/vfio/", "VFIO DMA mappings"),
                ("/dev/iommu", "iommufd DMA mappings"))

# io_uring/rsrc.c: IORING_MAX_REG_BUFFERS, and a buffer is at most SZ_1G.
MAX_BUFFERS_PER_RING = 1 << 14
MAX_BUFFER_BYTES = 1 << 30
# Highest user address on x86_64 with 5-level paging.
USER_ADDR_LIMIT = 1 << 57
# Rings read per call, and fds listed: beyond these the target is refused
# rather than read without bound.
MAX_RINGS = 1024
MAX_FDS = 1 << 20
MAX_BUFFERS = 1 << 16           # over all rings
# The largest page io_uring accounts whole (a transparent huge page).
_HUGE = 2 << 20
# A busy ring's fdinfo omits the list: asked this many times, this far apart.
FDINFO_TRIES = 20
FDINFO_RETRY_S = 0.002
VMPIN_TRIES = 3

_BUF_LINE = re.compile(rb"\s*(\d+):\s+(?:0x([0-9a-fA-F]{1,16})/(\d{1,10})|<none>)\s*$")


@dataclass(frozen=True)
class Pins:
    """``runs``: pages pinned long-term that we located (io_uring fixed
    buffers), page-aligned outward.  ``problem``: why some pins cannot be
    located (None when there are none)."""
    runs: PageRuns
    problem: str | None = None
    vmpin_excess: bool = False      # the problem is more VmPin than listed
    # Why the target can write-protect its own pages (module doc), or None.
    self_protect: str | None = None


class _Busy(Exception):
    pass


def parse_user_bufs(lines: Iterable[bytes]) -> list[tuple[int, int]]:
    """(addr, len) of the registered buffers an io_uring fdinfo lists
    (``lines``: the file's lines, read lazily).  _Busy if the kernel
    printed the count without the list; ValueError on a count, address or
    length out of range."""
    out: list[tuple[int, int]] = []
    want = None
    for line in lines:      # never the whole file (UserFiles can be long)
        if want is None:
            if line.startswith(b"UserBufs:"):
                field = line.split(b":", 1)[1].strip()
                if not field.isdigit() or len(field) > 10:
                    raise ValueError(f"UserBufs count {field[:16]!r}")
                want = int(field)
                if want > MAX_BUFFERS_PER_RING:
                    raise ValueError(f"UserBufs count {want} above {MAX_BUFFERS_PER_RING}")
                if want == 0:
                    return out
            continue
        m = _BUF_LINE.match(line)
        if m is None:
            raise _Busy()           # the list was left out (ring busy)
        if m.group(2) is not None:
            addr, length = int(m.group(2), 16), int(m.group(3))
            if length > MAX_BUFFER_BYTES or addr + length > USER_ADDR_LIMIT:
                raise ValueError(f"buffer {addr:#x}/{length} out of range")
            if length:
                out.append((addr, length))
        want -= 1
        if want == 0:
            return out
    # No UserBufs line: 6.18 prints none of the ring's state when busy.
    raise _Busy()


def _ring_buffers(pid: int, fd: str) -> list[tuple[int, int]] | None:
    """parse_user_bufs of the fdinfo of ``pid``'s fd ``fd``; None if the fd
    was closed meanwhile."""
    try:
        f = open(procfs.proc_path(pid, f"fdinfo/{fd}"), "rb")
    except FileNotFoundError:
        return None
    with f:
        return parse_user_bufs(f)


def read_pins(pid: int) -> Pins:
    """The long-term pins of ``pid`` (module doc).  NoSuchProcess /
    AccessDenied as procfs says; a target whose pins cannot all be located
    gets ``problem`` set, never an exception.  A buffer registered between
    the fdinfo read and the VmPin read looks like a pin nobody lists: the
    whole read is tried again before saying so."""
    for _ in range(VMPIN_TRIES - 1):
        got = _read_pins(pid)
        if not got.vmpin_excess:
            return got
        time.sleep(FDINFO_RETRY_S)
    return _read_pins(pid)


def _fd_names(pid: int) -> list[str]:
    fd_dir = procfs.proc_path(pid, "fd")
    with procfs.translate(pid, f"listing {fd_dir}"):
        return os.listdir(fd_dir)


def _fd_links(pid: int, names: list[str]) -> Iterator[tuple[str, str]]:
    """(fd, link) for the fds ``names`` of ``pid``; one closed meanwhile is
    left out."""
    fd_dir = procfs.proc_path(pid, "fd")
    for fd in names:
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError as e:
            if e.errno == errno.ENOENT:
                continue                # closed meanwhile
            with procfs.translate(pid, f"reading {fd_dir}/{fd}"):
                raise
        yield fd, link


def _read_pins(pid: int) -> Pins:
    names = _fd_names(pid)
    if len(names) > MAX_FDS:
        return Pins(PageRuns.empty(), f"process {pid} has {len(names)} open files, more "
                                      f"than the {MAX_FDS} checked for pinned memory")
    rings: list[str] = []
    protect: str | None = None
    for fd, link in _fd_links(pid, names):
        if link == IO_URING_LINK:
            rings.append(fd)
            continue
        if protect is None and (link == USERFAULTFD_LINK or _PAGEMAP_LINK.fullmatch(link)):
            what = ("a userfaultfd (UFFDIO_WRITEPROTECT)" if link == USERFAULTFD_LINK
                    else f"{link} (PAGEMAP_SCAN)")
            protect = (f"process {pid} holds {what} as fd {fd}: it can write-protect its own "
                       "pages, which erases the marks of its writes that uffd-wp reads")
            continue
        for prefix, what in _UNLOCATABLE:
            if link.startswith(prefix):
                return Pins(PageRuns.empty(),
                            f"process {pid} holds {link} (fd {fd}): {what} can pin its "
                            "memory, where the kernel or a device writes without a page "
                            "fault, and /proc does not say where")
    if len(rings) > MAX_RINGS:
        return Pins(PageRuns.empty(), f"process {pid} has {len(rings)} io_uring fds, more "
                                      f"than the {MAX_RINGS} checked for fixed buffers")
    starts: list[int] = []
    ends: list[int] = []
    for fd in rings:
        for _ in range(FDINFO_TRIES):
            try:
                with procfs.translate(pid, f"reading fdinfo {fd}"):
                    bufs = _ring_buffers(pid, fd)
                break
            except _Busy:
                time.sleep(FDINFO_RETRY_S)
            except ValueError as e:
                return Pins(PageRuns.empty(), f"process {pid}: io_uring fd {fd}: fdinfo "
                                              f"unreadable ({e}): its fixed buffers cannot "
                                              "be located")
        else:
            return Pins(PageRuns.empty(),
                        f"process {pid}: io_uring fd {fd} stayed busy: the kernel did not "
                        f"list its registered buffers in {FDINFO_TRIES} tries")
        for addr, length in bufs or ():
            starts.append(addr & ~(PAGE_SIZE - 1))
            ends.append(addr + length)
        if len(starts) > MAX_BUFFERS:
            return Pins(PageRuns.empty(), f"process {pid} has more than {MAX_BUFFERS} "
                                          "io_uring fixed buffers, more than are checked")
    # Tripwire for pins no fd shows: the kernel counts long-term pins of
    # io_uring and RDMA in the mm's pinned_vm (VmPin).  io_uring counts a
    # buffer's huge pages whole, so what the located buffers can account
    # for is bounded by their ranges widened to huge-page boundaries; more
    # pinned than that is pinned by something else (a ring whose fd was
    # closed after IORING_REGISTER_RING_FDS, a memory registration).
    s = np.array(starts, _U64)
    e = np.array(ends, _U64)
    huge = _U64(_HUGE)
    accounted = int((((e + huge - _U64(1)) // huge - s // huge) * huge).sum()) // PAGE_SIZE
    with procfs.translate(pid, "reading VmPin"):
        vmpin = _vmpin_pages(pid)
    if vmpin is None:
        return Pins(PageRuns.empty(), f"process {pid}: VmPin of /proc/{pid}/status "
                                      "unreadable: its pinned memory cannot be checked")
    if vmpin > accounted:
        return Pins(PageRuns.empty(),
                    f"process {pid} has {vmpin * PAGE_SIZE >> 10} kB of memory pinned "
                    f"(VmPin), {accounted * PAGE_SIZE >> 10} kB of it at most in the io_uring "
                    "fixed buffers its fds list: the rest is pinned where /proc does not "
                    "say (an io_uring whose fd was closed, RDMA)", vmpin_excess=True)
    if not starts:
        return Pins(PageRuns.empty(), self_protect=protect)
    e = (e + _U64(PAGE_SIZE - 1)) >> _U64(PAGE_SHIFT) << _U64(PAGE_SHIFT)
    return Pins(PageRuns(s, (e - s) >> _U64(PAGE_SHIFT)), self_protect=protect)


# -- direct reads in flight --------------------------------------------------------
#
# A read(2) of an O_DIRECT file pins the destination buffer (a short pin,
# not in VmPin) and the device writes it whenever the request is served:
# on a slow or throttled disk that is rounds after the pin made the pages
# look written once (measured: a 16 MiB read throttled to 8 MiB/s, 3840 of
# 4096 pages committed stale by uffd-wp).  While the thread waits, its
# /proc/PID/task/TID/syscall shows the call and its arguments: uffd-wp
# counts such a buffer written at every collect that finds the read in
# flight, and at the next one.  x86_64 numbers (the uffd-wp tracker's
# architecture).
_READ_CALLS = frozenset({0, 17})             # read, pread64: (fd, buf, count)
_READV_CALLS = frozenset({19, 295, 327})     # readv, preadv, preadv2: (fd, iov, iovcnt)
O_DIRECT_FLAG = 0o40000                      # x86_64 <asm-generic/fcntl.h>
IOV_MAX = 1024                               # the kernel refuses more iovecs
# Threads looked at per call: beyond this many the rest are not (a
# process with more threads has its direct reads checked in part: ~11 us
# a thread, 0.7 s a collect at this bound).
MAX_THREADS = 1 << 16


def direct_reads_in_flight(pid: int) -> PageRuns:
    """The buffers (page-aligned outward) of the threads of ``pid`` now
    blocked in a read of an O_DIRECT file.  Everything read here comes from
    the target: numbers are parsed strictly and bounded, iovec arrays read
    with process_vm_readv at most IOV_MAX entries."""
    task_dir = procfs.proc_path(pid, "task")
    with procfs.translate(pid, f"listing {task_dir}"):
        tids = os.listdir(task_dir)
    starts: list[int] = []
    ends: list[int] = []
    for tid in tids[:MAX_THREADS]:
        try:
            with open(f"{task_dir}/{tid}/syscall", "rb") as f:
                words = f.read(512).split()
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ESRCH):
                continue                        # the thread ended
            with procfs.translate(pid, f"reading {task_dir}/{tid}/syscall"):
                raise
        try:
            nr = int(words[0]) if words and words[0] != b"running" else -1
            if nr not in _READ_CALLS and nr not in _READV_CALLS:
                continue
            fd, addr, count = (int(w, 16) for w in words[1:4])
        except (ValueError, IndexError):
            continue                            # not a read we can parse: none
        if not _is_direct(pid, tid, fd):
            continue
        if nr in _READ_CALLS:
            spans = [(addr, count)]
        else:
            spans = _iovecs(pid, addr, count)
        for a, n in spans:
            if n <= 0 or a >= USER_ADDR_LIMIT:
                continue
            starts.append(a & ~(PAGE_SIZE - 1))
            ends.append(min(a + n, USER_ADDR_LIMIT))
    if not starts:
        return PageRuns.empty()
    s = np.array(starts, _U64)
    e = (np.array(ends, _U64) + _U64(PAGE_SIZE - 1)) >> _U64(PAGE_SHIFT) << _U64(PAGE_SHIFT)
    return PageRuns(s, (e - s) >> _U64(PAGE_SHIFT))     # sorts and merges overlaps


def _is_direct(pid: int, tid: str, fd: int) -> bool:
    """Whether fd ``fd`` of thread ``tid`` of ``pid`` is open with O_DIRECT
    (fdinfo flags).  The thread's own fdinfo: a thread can have a file
    table of its own (unshare CLONE_FILES), and the process's then names
    another file or none by that number (a 16 MiB read lost whole)."""
    if fd < 0 or fd > MAX_FDS:
        return False
    try:
        with open(procfs.proc_path(pid, f"task/{tid}/fdinfo/{fd}"), "rb") as f:
            for line in f.read(4096).splitlines():
                if line.startswith(b"flags:"):
                    return bool(int(line.split()[1], 8) & O_DIRECT_FLAG)
    except (OSError, ValueError, IndexError):
        return False                            # closed meanwhile, or unreadable
    return False


def _iovecs(pid: int, addr: int, count: int) -> list[tuple[int, int]]:
    """The (base, length) pairs of an iovec array in ``pid``'s memory."""
    from migrated.kernel.reader import MemReader
    count = min(count, IOV_MAX)
    if count <= 0 or addr <= 0 or addr >= USER_ADDR_LIMIT:
        return []
    try:
        raw = MemReader(pid, buffer_pages=1).read_range(addr, 16 * count)
    except OSError:
        return []                               # unreadable: the read fails too
    v = np.frombuffer(raw, _U64).reshape(count, 2)
    return [(int(a), int(n)) for a, n in v.tolist()]


# -- asynchronous I/O ---------------------------------------------------------------
#
# Linux AIO and io_uring requests need no thread of the target: an O_DIRECT
# read submitted before the freeze is written by the device into pinned
# pages whenever it completes, SIGSTOP or not -- possibly after the final
# collect (measured: 173 of 16384 pages of a 64 MiB io_submit read landed
# after it).  Nothing in /proc counts such requests in flight (io_uring's
# fdinfo counts cannot tell a DMA from a pending timeout or poll), so the
# engine re-checks by content instead (source.py, SETTLE_*).  These say
# whether a target can have any.
AIO_RING_PATH = "/[aio] (deleted)"
IO_URING_MAP_PATH = "anon_inode:[io_uring]"


def async_io_in(layout: Iterable) -> str | None:
    """What in ``layout`` (mappings with ``path``) shows the target can
    have asynchronous I/O in flight, or None."""
    for m in layout:
        if m.path == AIO_RING_PATH:
            return "a Linux AIO context"
        if m.path == IO_URING_MAP_PATH:
            return "an io_uring"
    return None


def has_io_uring_fd(pid: int) -> bool:
    """Whether ``pid`` holds an io_uring fd (one may have no mapping:
    IORING_SETUP_NO_MMAP puts its rings in the process's own memory)."""
    names = _fd_names(pid)
    if any(link == IO_URING_LINK for _, link in _fd_links(pid, names[:MAX_FDS])):
        return True
    return len(names) > MAX_FDS      # not all checked: assume one


def _vmpin_pages(pid: int) -> int | None:
    """VmPin of /proc/PID/status in pages (0 if absent: a kernel thread;
    None if malformed)."""
    raw = procfs.read_status(pid).get("VmPin", "0 kB").split()
    if not raw or not raw[0].isdigit() or len(raw[0]) > 20:
        return None
    return int(raw[0]) * 1024 // PAGE_SIZE
