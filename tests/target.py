"""A controllable child process for tests: maps memory and writes known
patterns on command.

Run as ``python tests/target.py``; parent side: ``Target`` below (or the
``target`` fixture of tests/conftest.py).  Protocol: one command line on
stdin, one reply line on stdout, ``ok [VALUES...]`` or ``err MESSAGE``.
Region pages are numbered from 0 within the region; NAME is any word.

  map NAME NPAGES [private|shared|memfd|memfd-private|secret] [guard] -> ok ADDR
                                 (guard: a PROT_NONE page each side, no VMA
                                 merging; memfd-private: a memfd mapped
                                 MAP_PRIVATE, copy-on-write over its content;
                                 secret: memfd_secret(2), readable only by
                                 the target itself)
  mapfile NAME PATH NPAGES [private|shared]   -> ok ADDR  (PATH %-quoted;
                                                 the file is extended)
  sysv NAME NPAGES                            -> ok ADDR  (SysV shm)
  write NAME FIRST COUNT [SEED]   fill pages with page_pattern(addr, SEED)
  fill NAME FIRST COUNT BYTE      memset pages to BYTE
  touch NAME FIRST COUNT          read one byte per page (read fault)
  sha NAME FIRST COUNT            -> ok SHA256HEX of those pages
  unmap NAME [FIRST COUNT]        munmap all (forget NAME) or a part
                                  (unmapping the tail shrinks NAME)
  dontneed NAME FIRST COUNT       madvise(MADV_DONTNEED)
  advise NAME FIRST COUNT ADVICE  madvise: dontneed, remove (a hole in shared memory),
                                  free, cold, pageout, populate_read|write, collapse
  protect NAME FIRST COUNT PERMS  mprotect; PERMS like rw, r, none
  remap NAME NEWPAGES [move|dontunmap]  mremap(MAYMOVE[|FIXED elsewhere|DONTUNMAP]) -> ok ADDR
  label NAME LABEL                PR_SET_VMA_ANON_NAME -> [anon:LABEL]
  threads N                       start N sleeping threads -> ok TID...
  churn RATE                      a thread that starts RATE short threads/s
  spin NAME [PAGES_PER_S]         background writer over NAME (0 = flat out)
  stopspin NAME                   -> ok PAGES_WRITTEN
  comm NAME                       set comm (%-quoted; shows in stat)
  tids                            -> ok TID...
  dwait FIFO [main]               a thread in uninterruptible sleep (D) until
                                  someone opens the FIFO (%-quoted) for writing:
                                  posix_spawn's vfork waits while the child
                                  blocks opening it.  -> ok TID of a new thread;
                                  with "main" the command loop itself waits,
                                  after replying ok
  dread NAME PATH                 an O_DIRECT read of PATH (%-quoted) into NAME,
                                  in a thread (the kernel pins the pages first)
  djoin                           wait for it -> ok BYTES
  aread NAME PATH...              asynchronous O_DIRECT reads (Linux AIO,
                                  io_submit), one of each PATH (%-quoted) into
                                  NAME, queued in that order: no thread of the
                                  target waits; the device writes the pages
                                  whenever it gets to them
  areap                           wait for them (io_getevents) -> ok BYTES (all)
  uring NAME PATH [hidden]        an io_uring with region NAME registered as its
                                  fixed buffer (the kernel pins it for the ring's
                                  life), reading the file PATH (%-quoted); hidden:
                                  its fd registered with IORING_REGISTER_RING_FDS
                                  and closed (no io_uring fd in /proc/PID/fd;
                                  uread only: that registration is per thread)
  uread                           one IORING_OP_READ_FIXED of the file's first
                                  bytes into the whole buffer -> ok BYTES
  uloop                           a thread doing uread flat out, every word of the
                                  file set to a new count before each read (the new
                                  bytes land in the buffer only through the pin)
  ustop                           stop it -> ok READS
  openfd PATH                     open PATH (%-quoted) read-write, keep it -> ok FD
  uffdminor NAME                  the target's own userfaultfd: region NAME (memfd)
                                  registered in minor mode, a thread resolving each
                                  fault with UFFDIO_CONTINUE (as a lazy restore or
                                  a post-copy destination does) -> ok FD
  selfprotect NAME pagemap|uffd   write-protect region NAME itself, as a program
                                  tracking its own writes does: PAGEMAP_SCAN with
                                  PM_SCAN_WP_MATCHING on /proc/self/pagemap, or
                                  UFFDIO_WRITEPROTECT through a userfaultfd of its
                                  own (the fd is opened once and kept) -> ok
                                  RESULT (regions found, or the errno's name)
  exit [CODE]

The target never imports migrated: it is the process under test.
"""

from __future__ import annotations

import contextlib
import errno
import ctypes
import hashlib
import mmap
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

PAGE = os.sysconf("SC_PAGE_SIZE")

# -- the pattern both sides agree on ------------------------------------------


def page_fill_byte(addr: int, seed: int) -> int:
    """Fill byte of the page at ``addr`` written with ``seed``: never 0, so
    a written page is never mistaken for a zero page."""
    return ((addr // PAGE) * 7 + seed * 31) % 251 + 1


def page_pattern(addr: int, seed: int) -> bytes:
    """Content of one page written with ``seed``: the page address as 8
    little-endian bytes (catches misplaced pages), then the fill byte."""
    return addr.to_bytes(8, "little") + bytes([page_fill_byte(addr, seed)]) * (PAGE - 8)


def expected(addr: int, npages: int, seed: int) -> bytes:
    """Content of ``npages`` pages from ``addr`` written with ``seed``."""
    import numpy as np
    pages = np.empty((npages, PAGE), np.uint8)
    idx = (addr // PAGE) + np.arange(npages, dtype=np.uint64)
    pages[:] = (((idx * 7 + seed * 31) % 251) + 1).astype(np.uint8)[:, None]
    addrs = (np.uint64(addr) + np.arange(npages, dtype=np.uint64) * np.uint64(PAGE))
    pages[:, :8] = addrs.astype("<u8").view(np.uint8).reshape(npages, 8)
    return pages.tobytes()


# -- child side -----------------------------------------------------------------

_PROT = {"none": 0, "r": 1, "w": 2, "rw": 3, "rx": 5, "rwx": 7}
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4
_ADVICE = {"dontneed": 4, "free": 8, "remove": 9, "cold": 20, "pageout": 21,
           "populate_read": 22, "populate_write": 23, "collapse": 25}
PR_SET_PDEATHSIG = 1
PR_SET_VMA, PR_SET_VMA_ANON_NAME = 0x53564D41, 0
MFD_CLOEXEC = 1
SYS_MEMFD_SECRET = 447
# userfaultfd (include/uapi/linux/userfaultfd.h), for the target's own use.
SYS_USERFAULTFD = 323
UFFDIO_API, UFFDIO_REGISTER, UFFDIO_CONTINUE = 0xC018AA3F, 0xC020AA00, 0xC020AA07
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
# userfaultfd and PAGEMAP_SCAN (include/uapi/linux/userfaultfd.h, fs.h),
# for the target's own use.
SYS_USERFAULTFD = 323
UFFDIO_API, UFFDIO_WRITEPROTECT = 0xC018AA3F, 0xC018AA06
UFFDIO_WRITEPROTECT_MODE_WP = 1
PAGEMAP_SCAN, PM_SCAN_WP_MATCHING, PAGE_IS_WRITTEN = 0xC0606610, 1, 1 << 1
IPC_PRIVATE, IPC_CREAT, IPC_RMID = 0, 0o1000, 0


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                            ctypes.c_int, ctypes.c_void_p]
    for name in ("munmap", "madvise", "mprotect"):
        f = getattr(libc, name)
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int][: 3 if name != "munmap" else 2]
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong, ctypes.c_ulong]
    return libc


# -- io_uring (include/uapi/linux/io_uring.h), raw system calls ---------------------

SYS_IO_SETUP, SYS_IO_DESTROY, SYS_IO_GETEVENTS, SYS_IO_SUBMIT = 206, 207, 208, 209
CLONE_FILES = 0x400          # <linux/sched.h>: unshare(2) a file table of its own
SYS_IO_URING_SETUP, SYS_IO_URING_ENTER, SYS_IO_URING_REGISTER = 425, 426, 427
IORING_OFF_SQ_RING, IORING_OFF_CQ_RING, IORING_OFF_SQES = 0, 0x8000000, 0x10000000
IORING_REGISTER_BUFFERS = 0
IORING_REGISTER_RING_FDS = 20
IORING_OP_READ_FIXED = 4
IORING_ENTER_GETEVENTS = 1
IORING_ENTER_REGISTERED_RING = 1 << 4


class _Uring:
    """The smallest io_uring: submit one SQE, wait for its CQE.  Rings
    mapped with libc's mmap (Python's mmap keeps a dup of the fd)."""

    def __init__(self, libc, entries):
        import struct
        self.libc = libc
        self.struct = struct
        libc.syscall.restype = ctypes.c_long
        params = ctypes.create_string_buffer(120)      # struct io_uring_params
        fd = libc.syscall(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_uint(entries), params)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_uring_setup: {os.strerror(e)}")
        self.fd = fd
        self.enter_fd, self.enter_flags = fd, IORING_ENTER_GETEVENTS
        p = params.raw
        sq_entries, cq_entries = struct.unpack_from("=II", p, 0)
        # struct io_sqring_offsets at 40, io_cqring_offsets at 80
        self.sq = dict(zip(("head", "tail", "mask", "entries", "flags", "dropped", "array"),
                           struct.unpack_from("=7I", p, 40)))
        self.cq = dict(zip(("head", "tail", "mask", "entries", "overflow", "cqes"),
                           struct.unpack_from("=6I", p, 80)))
        self.sq_ring = self._map(self.sq["array"] + sq_entries * 4, IORING_OFF_SQ_RING)
        self.cq_ring = self._map(self.cq["cqes"] + cq_entries * 16, IORING_OFF_CQ_RING)
        self.sqes = self._map(sq_entries * 64, IORING_OFF_SQES)

    def _map(self, size, offset):
        addr = self.libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED,
                              self.fd, offset)
        if addr in (None, ctypes.c_void_p(-1).value):
            e = ctypes.get_errno()
            raise OSError(e, f"mmap of the io_uring: {os.strerror(e)}")
        return (ctypes.c_char * size).from_address(addr)

    def _sys(self, nr, *args):
        rc = self.libc.syscall(ctypes.c_long(nr), *args)
        if rc < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_uring syscall {nr}: {os.strerror(e)}")
        return rc

    def register_buffer(self, addr, length):
        iov = (ctypes.c_uint64 * 2)(addr, length)
        self._sys(SYS_IO_URING_REGISTER, ctypes.c_int(self.fd),
                  ctypes.c_uint(IORING_REGISTER_BUFFERS), iov, ctypes.c_uint(1))
        self._buf_addr = addr

    def hide(self):
        """Register the ring fd with the task (IORING_REGISTER_RING_FDS) and
        close it: the ring keeps working, with no fd in /proc/PID/fd."""
        upd = (ctypes.c_uint32 * 4)(0xFFFFFFFF, 0, self.fd, 0)  # offset=-1 (any), data=fd
        self._sys(SYS_IO_URING_REGISTER, ctypes.c_int(self.fd),
                  ctypes.c_uint(IORING_REGISTER_RING_FDS), upd, ctypes.c_uint(1))
        os.close(self.fd)
        self.enter_fd = upd[0]
        self.enter_flags = IORING_ENTER_GETEVENTS | IORING_ENTER_REGISTERED_RING

    def read_fixed(self, fd, length):
        st = self.struct
        tail = st.unpack_from("=I", self.sq_ring, self.sq["tail"])[0]
        mask = st.unpack_from("=I", self.sq_ring, self.sq["mask"])[0]
        i = tail & mask
        sqe = bytearray(64)
        # opcode, flags, ioprio, fd, off, addr, len, rw_flags, user_data, buf_index
        st.pack_into("=BBHiQQIIQH", sqe, 0, IORING_OP_READ_FIXED, 0, 0, fd, 0,
                     self._buf_addr, length, 0, 7, 0)
        self.sqes[i * 64:(i + 1) * 64] = bytes(sqe)
        st.pack_into("=I", self.sq_ring, self.sq["array"] + i * 4, i)
        st.pack_into("=I", self.sq_ring, self.sq["tail"], (tail + 1) & 0xFFFFFFFF)
        self._sys(SYS_IO_URING_ENTER, ctypes.c_int(self.enter_fd), ctypes.c_uint(1),
                  ctypes.c_uint(1), ctypes.c_uint(self.enter_flags), None,
                  ctypes.c_size_t(0))
        head = st.unpack_from("=I", self.cq_ring, self.cq["head"])[0]
        cmask = st.unpack_from("=I", self.cq_ring, self.cq["mask"])[0]
        off = self.cq["cqes"] + (head & cmask) * 16
        _, res, _ = st.unpack_from("=QiI", self.cq_ring, off)
        st.pack_into("=I", self.cq_ring, self.cq["head"], (head + 1) & 0xFFFFFFFF)
        if res < 0:
            raise OSError(-res, f"READ_FIXED: {os.strerror(-res)}")
        return res


class _Child:
    def __init__(self):
        self.libc = _libc()
        self.regions: dict[str, list[int]] = {}   # name -> [addr, npages]
        self.keep: list = []                       # objects kept alive
        self.spinners: dict[str, tuple[threading.Event, list[int], threading.Thread]] = {}
        self.stop_all = threading.Event()

    def _check(self, rc, what):
        if rc in (-1, None) or rc == ctypes.c_void_p(-1).value:
            e = ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")
        return rc

    def _region(self, name, first=0, count=None):
        addr, n = self.regions[name]
        first = int(first)
        count = n - first if count is None else int(count)
        if first < 0 or count < 0 or first + count > n:
            raise ValueError(f"pages {first}+{count} outside {name} ({n} pages)")
        return addr + first * PAGE, count

    def _mmap(self, size, prot, flags, fd=-1):
        return self._check(self.libc.mmap(None, size, prot, flags, fd, 0), "mmap")

    # commands -------------------------------------------------------------------

    def cmd_map(self, name, npages, kind="private", guard=None):
        n = int(npages)
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        if guard == "guard":
            # PROT_NONE pages on both sides keep the kernel from merging the
            # region with a neighbour of equal flags (exact VMA boundaries).
            if kind != "private":
                raise ValueError("guard only for private anonymous regions")
            base = self._mmap((n + 2) * PAGE, rw, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._check(self.libc.mprotect(base, PAGE, 0), "mprotect")
            self._check(self.libc.mprotect(base + (n + 1) * PAGE, PAGE, 0), "mprotect")
            self.regions[name] = [base + PAGE, n]
            return f"{base + PAGE:#x}"
        if kind == "private":
            addr = self._mmap(n * PAGE, rw, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        elif kind == "shared":
            addr = self._mmap(n * PAGE, rw, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        elif kind in ("memfd", "memfd-private"):
            fd = os.memfd_create(name, MFD_CLOEXEC)
            os.ftruncate(fd, n * PAGE)
            flags = mmap.MAP_SHARED if kind == "memfd" else mmap.MAP_PRIVATE
            addr = self._mmap(n * PAGE, rw, flags, fd)
            os.close(fd)
        elif kind == "secret":
            self.libc.syscall.restype = ctypes.c_long
            fd = self.libc.syscall(ctypes.c_long(SYS_MEMFD_SECRET), ctypes.c_uint(0))
            if fd < 0:
                e = ctypes.get_errno()
                raise OSError(e, f"memfd_secret: {os.strerror(e)}")
            os.ftruncate(fd, n * PAGE)
            addr = self._mmap(n * PAGE, rw, mmap.MAP_SHARED, fd)
            os.close(fd)
        else:
            raise ValueError(f"unknown map kind {kind}")
        self.regions[name] = [addr, n]
        return f"{addr:#x}"

    def cmd_mapfile(self, name, path, npages, kind="private"):
        n = int(npages)
        path = urllib.parse.unquote(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < n * PAGE:
                os.ftruncate(fd, n * PAGE)
            flags = mmap.MAP_SHARED if kind == "shared" else mmap.MAP_PRIVATE
            addr = self._mmap(n * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd)
        finally:
            os.close(fd)
        self.regions[name] = [addr, n]
        return f"{addr:#x}"

    def cmd_sysv(self, name, npages):
        n = int(npages)
        shmid = self._check(self.libc.shmget(IPC_PRIVATE, n * PAGE, IPC_CREAT | 0o600), "shmget")
        addr = self._check(self.libc.shmat(shmid, None, 0), "shmat")
        self.libc.shmctl(shmid, IPC_RMID, None)  # destroyed once detached
        self.regions[name] = [addr, n]
        return f"{addr:#x}"

    def cmd_write(self, name, first, count, seed="1"):
        import numpy as np
        addr, count = self._region(name, first, count)
        if count:
            buf = (ctypes.c_uint8 * (count * PAGE)).from_address(addr)
            dst = np.frombuffer(buf, np.uint8)
            dst[:] = np.frombuffer(expected(addr, count, int(seed)), np.uint8)
        return ""

    def cmd_fill(self, name, first, count, byte):
        addr, count = self._region(name, first, count)
        ctypes.memset(addr, int(byte), count * PAGE)
        return ""

    def cmd_touch(self, name, first, count):
        addr, count = self._region(name, first, count)
        s = 0
        for i in range(count):
            s += ctypes.c_uint8.from_address(addr + i * PAGE).value
        return str(s)

    def cmd_sha(self, name, first, count):
        addr, count = self._region(name, first, count)
        return hashlib.sha256(ctypes.string_at(addr, count * PAGE)).hexdigest()

    def cmd_unmap(self, name, first=None, count=None):
        if first is None:
            addr, n = self.regions.pop(name)
            self._check(self.libc.munmap(addr, n * PAGE), "munmap")
        else:
            addr, count = self._region(name, first, count)
            self._check(self.libc.munmap(addr, count * PAGE), "munmap")
            if int(first) + count == self.regions[name][1]:
                self.regions[name][1] = int(first)  # the tail went: shrink
        return ""

    def cmd_dontneed(self, name, first, count):
        return self.cmd_advise(name, first, count, "dontneed")

    def cmd_advise(self, name, first, count, advice):
        addr, count = self._region(name, first, count)
        self._check(self.libc.madvise(addr, count * PAGE, _ADVICE[advice]), "madvise")
        return ""

    def cmd_protect(self, name, first, count, perms):
        addr, count = self._region(name, first, count)
        self._check(self.libc.mprotect(addr, count * PAGE, _PROT[perms]), "mprotect")
        return ""

    def cmd_remap(self, name, newpages, move=None):
        addr, n = self.regions[name]
        new = int(newpages)
        if move == "move":
            # Reserve a fresh range, then move the mapping onto it.
            dest = self._mmap(new * PAGE, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            res = self.libc.mremap(addr, n * PAGE, new * PAGE,
                                   MREMAP_MAYMOVE | MREMAP_FIXED, dest)
        elif move == "dontunmap":
            # The pages move to a new range; the old one stays mapped, empty.
            res = self.libc.mremap(addr, n * PAGE, new * PAGE,
                                   MREMAP_MAYMOVE | MREMAP_DONTUNMAP, None)
        else:
            res = self.libc.mremap(addr, n * PAGE, new * PAGE, MREMAP_MAYMOVE, None)
        res = self._check(res, "mremap")
        self.regions[name] = [res, new]
        return f"{res:#x}"

    def cmd_label(self, name, label):
        addr, n = self.regions[name]
        lab = ctypes.create_string_buffer(label.encode())
        self.keep.append(lab)
        rc = self.libc.prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, addr, n * PAGE,
                             ctypes.addressof(lab))
        self._check(rc, "prctl(PR_SET_VMA_ANON_NAME)")
        return ""

    def cmd_threads(self, n):
        tids = []
        ready = threading.Semaphore(0)

        def sleeper():
            tids.append(threading.get_native_id())
            ready.release()
            while not self.stop_all.wait(0.05):
                pass

        for _ in range(int(n)):
            threading.Thread(target=sleeper, daemon=True).start()
        for _ in range(int(n)):
            ready.acquire()
        return " ".join(map(str, sorted(tids)))

    def cmd_churn(self, rate):
        period = 1.0 / float(rate)

        def churner():
            while not self.stop_all.is_set():
                t = threading.Thread(target=time.sleep, args=(period * 2,), daemon=True)
                t.start()
                time.sleep(period)

        threading.Thread(target=churner, daemon=True).start()
        return ""

    def cmd_spin(self, name, rate="0"):
        addr, n = self.regions[name]
        stop, count = threading.Event(), [0]
        rate = float(rate)

        def spinner():
            i = 0
            while not stop.is_set():
                ctypes.c_uint8.from_address(addr + (i % n) * PAGE + 8).value = i & 0xFF
                i += 1
                count[0] = i
                if rate:
                    time.sleep(1.0 / rate)

        t = threading.Thread(target=spinner, daemon=True)
        self.spinners[name] = (stop, count, t)
        t.start()
        return ""

    def cmd_stopspin(self, name):
        stop, count, t = self.spinners.pop(name)
        stop.set()
        t.join()
        return str(count[0])

    def cmd_uffdminor(self, name):
        import fcntl
        import struct
        addr, n = self.regions[name]
        self.libc.syscall.restype = ctypes.c_long
        fd = self.libc.syscall(ctypes.c_long(SYS_USERFAULTFD),
                               ctypes.c_int(os.O_CLOEXEC | os.O_NONBLOCK))
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"userfaultfd: {os.strerror(e)}")
        fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("=3Q", 0xAA, UFFD_FEATURE_MINOR_SHMEM,
                                                          0)), True)
        fcntl.ioctl(fd, UFFDIO_REGISTER, bytearray(struct.pack(
            "=4Q", addr, n * PAGE, UFFDIO_REGISTER_MODE_MINOR, 0)), True)

        def handler():
            while True:
                select.select([fd], [], [])
                try:
                    msg = os.read(fd, 32)             # struct uffd_msg
                except BlockingIOError:
                    continue
                page = struct.unpack_from("=Q", msg, 16)[0] & ~(PAGE - 1)
                with contextlib.suppress(OSError):  # mapped meanwhile: EEXIST
                    fcntl.ioctl(fd, UFFDIO_CONTINUE,
                                bytearray(struct.pack("=4Q", page, PAGE, 0, 0)), True)

        threading.Thread(target=handler, daemon=True).start()
        return str(fd)
    def cmd_selfprotect(self, name, how):
        import errno
        import fcntl
        import struct
        addr, n = self.regions[name]
        fds = self.__dict__.setdefault("_selfprotect_fds", {})
        if how == "pagemap":
            fd = fds.get(how) or fds.setdefault(how, os.open("/proc/self/pagemap", os.O_RDONLY))
            vec = ctypes.create_string_buffer(24 * 64)
            # struct pm_scan_arg: size, flags, start, end, walk_end, vec,
            # vec_len, max_pages, category_inverted, _mask, _anyof_mask, return_mask
            arg = bytearray(struct.pack("=12Q", 96, PM_SCAN_WP_MATCHING, addr, addr + n * PAGE,
                                        0, ctypes.addressof(vec), 64, 0, 0,
                                        PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN))
            return str(fcntl.ioctl(fd, PAGEMAP_SCAN, arg, True))
        if how != "uffd":
            raise ValueError(f"selfprotect: unknown way {how!r}")
        fd = fds.get(how)
        if fd is None:
            self.libc.syscall.restype = ctypes.c_long
            fd = self.libc.syscall(ctypes.c_long(SYS_USERFAULTFD),
                                   ctypes.c_int(os.O_CLOEXEC | os.O_NONBLOCK | 1))
            if fd < 0:
                e = ctypes.get_errno()
                raise OSError(e, f"userfaultfd: {os.strerror(e)}")
            fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("=3Q", 0xAA, 0, 0)), True)
            fds[how] = fd
        try:
            fcntl.ioctl(fd, UFFDIO_WRITEPROTECT, bytearray(struct.pack(
                "=3Q", addr, n * PAGE, UFFDIO_WRITEPROTECT_MODE_WP)), True)
        except OSError as e:        # ENOENT: not registered for write-protect
            return errno.errorcode.get(e.errno, str(e.errno))
        return "0"

    def cmd_openfd(self, path):
        fd = os.open(urllib.parse.unquote(path), os.O_RDWR)
        return str(fd)

    def cmd_comm(self, name):
        # %-quoted so a test can use spaces and parentheses.
        PR_SET_NAME = 15
        buf = ctypes.create_string_buffer(urllib.parse.unquote(name).encode()[:15])
        self._check(self.libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0), "prctl")
        return ""

    def cmd_tids(self):
        return " ".join(sorted(os.listdir("/proc/self/task"), key=int))

    def cmd_dwait(self, fifo, where=""):
        path = urllib.parse.unquote(fifo)

        def wait_in_kernel():
            # The child opens the FIFO before exec; until then the parent
            # thread sleeps in the kernel's vfork wait (state D).  Through
            # ctypes, which lets go of the GIL (os.posix_spawn keeps it, so
            # no other thread of ours would run meanwhile).
            libc = self.libc
            actions = ctypes.create_string_buffer(512)   # posix_spawn_file_actions_t
            libc.posix_spawn_file_actions_init(actions)
            libc.posix_spawn_file_actions_addopen(actions, 3, path.encode(), os.O_RDONLY, 0)
            child = ctypes.c_int()
            argv = (ctypes.c_char_p * 2)(b"true", None)
            envp = (ctypes.c_char_p * 1)(None)
            rc = libc.posix_spawn(ctypes.byref(child), b"/bin/true", actions, None, argv, envp)
            libc.posix_spawn_file_actions_destroy(actions)
            if rc == 0:
                os.waitpid(child.value, 0)

        if where == "main":
            sys.stdout.write("ok\n")
            sys.stdout.flush()
            wait_in_kernel()
            return None
        tid = []
        started = threading.Event()

        def runner():
            tid.append(threading.get_native_id())
            started.set()
            wait_in_kernel()

        threading.Thread(target=runner, daemon=True).start()
        started.wait()
        return str(tid[0])

    def cmd_dread(self, name, path, files=""):
        """Start an O_DIRECT read of the file at PATH (%-quoted) into region
        NAME in a thread: the kernel pins the pages, then the disk writes
        them.  djoin waits for it and replies the byte count.  FILES "own":
        the thread reads from a file table of its own (unshare CLONE_FILES),
        not the process's."""
        addr, n = self.regions[name]
        fname = urllib.parse.unquote(path)
        out = []

        def read():
            if files == "own" and self.libc.unshare(ctypes.c_int(CLONE_FILES)) != 0:
                out.append(-ctypes.get_errno())
                return
            fd = os.open(fname, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            try:
                out.append(self.libc.pread(fd, ctypes.c_void_p(addr),
                                           ctypes.c_size_t(n * PAGE), ctypes.c_long(0)))
            finally:
                os.close(fd)

        t = threading.Thread(target=read, daemon=True)
        t.start()
        self._dread = (t, out)
        return ""

    def cmd_djoin(self):
        t, out = self._dread
        t.join()
        return str(out[0] if out else -1)

    # Linux AIO by raw system calls (linux/aio_abi.h): one context, one read.
    def cmd_aread(self, name, *paths):
        import struct
        addr, n = self.regions[name]
        libc = self.libc
        libc.syscall.restype = ctypes.c_long
        ctx = ctypes.c_ulong(0)
        if libc.syscall(ctypes.c_long(SYS_IO_SETUP), ctypes.c_uint(len(paths)),
                        ctypes.byref(ctx)) < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_setup: {os.strerror(e)}")
        fds = [os.open(urllib.parse.unquote(p), os.O_RDONLY | getattr(os, "O_DIRECT", 0))
               for p in paths]
        # struct iocb: data, key, rw_flags, opcode (PREAD 0), reqprio, fildes,
        # buf, nbytes, offset, reserved2, flags, resfd -- 64 bytes
        iocbs = [ctypes.create_string_buffer(struct.pack("=QIIHhIQQqQII", i, 0, 0, 0, 0, fd,
                                                         addr, n * PAGE, 0, 0, 0, 0))
                 for i, fd in enumerate(fds)]
        ptrs = (ctypes.c_void_p * len(iocbs))(*(ctypes.addressof(b) for b in iocbs))
        if libc.syscall(ctypes.c_long(SYS_IO_SUBMIT), ctx, ctypes.c_long(len(iocbs)),
                        ptrs) != len(iocbs):
            e = ctypes.get_errno()
            raise OSError(e, f"io_submit: {os.strerror(e)}")
        self._aio = (ctx, fds, iocbs)
        return ""

    def cmd_areap(self):
        import struct
        ctx, fds, iocbs = self._aio
        events = ctypes.create_string_buffer(32 * len(iocbs))     # struct io_event each
        got = 0
        while got < len(iocbs):
            n = self.libc.syscall(ctypes.c_long(SYS_IO_GETEVENTS), ctx, ctypes.c_long(1),
                                  ctypes.c_long(len(iocbs) - got),
                                  ctypes.byref(events, 32 * got), None)
            if n < 0:
                e = ctypes.get_errno()
                if e == errno.EINTR:
                    continue
                raise OSError(e, f"io_getevents: {os.strerror(e)}")
            got += n
        self.libc.syscall(ctypes.c_long(SYS_IO_DESTROY), ctx)
        for fd in fds:
            os.close(fd)
        return str(sum(struct.unpack_from("=QQqq", events.raw, 32 * i)[2]
                       for i in range(len(iocbs))))

    # io_uring by raw system calls (no liburing): one ring, one fixed buffer.
    def cmd_uring(self, name, path, hidden=None):
        addr, n = self.regions[name]
        self._uring = _Uring(self.libc, 4)
        self._uring.register_buffer(addr, n * PAGE)
        if hidden == "hidden":
            self._uring.hide()
        self._ufd = os.open(urllib.parse.unquote(path), os.O_RDWR)
        self._ulen = n * PAGE
        return ""

    def cmd_uread(self):
        return str(self._uring.read_fixed(self._ufd, self._ulen))

    def cmd_uloop(self):
        stop = threading.Event()
        count = [0]

        def loop():
            while not stop.is_set():
                count[0] += 1
                os.pwrite(self._ufd, count[0].to_bytes(8, "little") * (self._ulen // 8), 0)
                got = self._uring.read_fixed(self._ufd, self._ulen)
                if got != self._ulen:
                    raise OSError(f"READ_FIXED read {got} of {self._ulen} bytes")

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        self._uloop = (stop, count, t)
        return ""

    def cmd_ustop(self):
        stop, count, t = self._uloop
        stop.set()
        t.join()
        return str(count[0])

    def cmd_exit(self, code="0"):
        sys.stdout.flush()
        os._exit(int(code))

    def run(self):
        # Die with the parent: a crashed test run must not leave targets.
        self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        out = sys.stdout
        out.write(f"ready {os.getpid()}\n")
        out.flush()
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            fn = getattr(self, "cmd_" + words[0], None)
            try:
                if fn is None:
                    raise ValueError(f"unknown command {words[0]!r}")
                if words[0] == "exit":
                    out.write("ok\n")
                    out.flush()
                reply = fn(*words[1:])
                if reply is None:
                    continue        # the command replied itself
                out.write(f"ok {reply}".rstrip() + "\n")
            except Exception as e:  # report, keep serving
                out.write(f"err {type(e).__name__}: {e}".replace("\n", " ") + "\n")
            out.flush()


# -- parent side ---------------------------------------------------------------

class TargetError(RuntimeError):
    pass


# How long the parent waits for one reply: generous for a loaded CI box,
# short enough that a stopped or hung child fails the test quickly.
REPLY_TIMEOUT_S = 20.0


class Target:
    """Parent-side handle on a target child.

    >>> with Target() as t:
    ...     a = t.map("buf", 16)          # address
    ...     t.write("buf", 0, 16, seed=3)
    ...     t.expected("buf", 0, 16, 3)   # the bytes the child now holds
    """

    def __init__(self, python: str = sys.executable):
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, bufsize=0, close_fds=True,
            # numpy's BLAS would start helper threads: keep the thread list
            # to the ones tests ask for.
            env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
        self.pid = self.proc.pid
        self.regions: dict[str, tuple[int, int]] = {}
        self._rbuf = b""
        try:
            first = self._readline()
            if not first.startswith("ready "):
                raise TargetError(f"target did not start: {first!r}")
        except BaseException:
            self.close()
            raise

    # -- plumbing ----------------------------------------------------------

    def _readline(self, timeout: float = REPLY_TIMEOUT_S) -> str:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._rbuf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TargetError(f"target {self.pid}: no reply within {timeout}s "
                                  "(stopped or hung?)")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise TargetError(f"target {self.pid} exited "
                                      f"(status {self.proc.poll()})")
                self._rbuf += chunk
        line, _, self._rbuf = self._rbuf.partition(b"\n")
        return line.decode()

    def cmd(self, *words, timeout: float = REPLY_TIMEOUT_S) -> str:
        """Send one command; return the reply after "ok" (TargetError on err)."""
        self.proc.stdin.write((" ".join(str(w) for w in words) + "\n").encode())
        reply = self._readline(timeout)
        if reply.startswith("err"):
            raise TargetError(f"target {self.pid}: {' '.join(map(str, words))}: {reply[4:]}")
        return reply[3:]

    # -- commands -------------------------------------------------------------

    def map(self, name: str, npages: int, kind: str = "private", guard: bool = False) -> int:
        addr = int(self.cmd("map", name, npages, kind, *(["guard"] if guard else [])), 16)
        self.regions[name] = (addr, npages)
        return addr

    def map_file(self, name: str, path: str, npages: int, kind: str = "private") -> int:
        # The protocol splits on whitespace: the path travels %-quoted.
        addr = int(self.cmd("mapfile", name, urllib.parse.quote(path), npages, kind), 16)
        self.regions[name] = (addr, npages)
        return addr

    def sysv(self, name: str, npages: int) -> int:
        addr = int(self.cmd("sysv", name, npages), 16)
        self.regions[name] = (addr, npages)
        return addr

    def write(self, name: str, first: int = 0, count: int | None = None, seed: int = 1) -> None:
        self.cmd("write", name, first, self._count(name, first, count), seed)

    def fill(self, name: str, first: int, count: int, byte: int) -> None:
        self.cmd("fill", name, first, count, byte)

    def touch(self, name: str, first: int = 0, count: int | None = None) -> None:
        self.cmd("touch", name, first, self._count(name, first, count))

    def sha(self, name: str, first: int = 0, count: int | None = None) -> str:
        return self.cmd("sha", name, first, self._count(name, first, count))

    def unmap(self, name: str, first: int | None = None, count: int | None = None) -> None:
        if first is None:
            self.cmd("unmap", name)
            del self.regions[name]
        else:
            self.cmd("unmap", name, first, count)
            addr, n = self.regions[name]
            if first + count == n:
                self.regions[name] = (addr, first)  # the tail went: shrink

    def dontneed(self, name: str, first: int, count: int) -> None:
        self.cmd("dontneed", name, first, count)

    def advise(self, name: str, first: int, count: int, advice: str) -> None:
        self.cmd("advise", name, first, count, advice)

    def protect(self, name: str, first: int, count: int, perms: str) -> None:
        self.cmd("protect", name, first, count, perms)

    def remap(self, name: str, newpages: int, move: bool | str = False) -> int:
        """mremap; ``move`` True: to a fresh range, "dontunmap": with
        MREMAP_DONTUNMAP (same size; the old range stays, empty)."""
        how = "move" if move is True else (move or None)
        addr = int(self.cmd("remap", name, newpages, *([how] if how else [])), 16)
        self.regions[name] = (addr, newpages)
        return addr

    def label(self, name: str, label: str) -> None:
        self.cmd("label", name, label)

    def threads(self, n: int) -> list[int]:
        return [int(t) for t in self.cmd("threads", n).split()]

    def churn(self, rate: float) -> None:
        self.cmd("churn", rate)

    def spin(self, name: str, pages_per_s: float = 0) -> None:
        self.cmd("spin", name, pages_per_s)

    def stop_spin(self, name: str) -> int:
        return int(self.cmd("stopspin", name))

    def comm(self, name: str) -> None:
        """Set the main thread's comm (15 bytes max; any characters)."""
        self.cmd("comm", urllib.parse.quote(name))

    def dwait(self, fifo: str, main: bool = False) -> int | None:
        """A thread of the target in uninterruptible sleep until ``fifo`` is
        opened for writing (target doc); its TID, or None for the main
        thread (which then answers no command until released)."""
        self._fifos = [*getattr(self, "_fifos", ()), fifo]
        reply = self.cmd("dwait", urllib.parse.quote(fifo), *(["main"] if main else []))
        return None if main else int(reply)

    def tids(self) -> list[int]:
        return [int(t) for t in self.cmd("tids").split()]

    # -- helpers ------------------------------------------------------------------

    def _count(self, name, first, count):
        return self.regions[name][1] - first if count is None else count

    def addr(self, name: str, page: int = 0) -> int:
        return self.regions[name][0] + page * PAGE

    def range(self, name: str, first: int = 0, count: int | None = None) -> tuple[int, int]:
        """(start, end) addresses of pages of a region."""
        a = self.addr(name, first)
        return a, a + self._count(name, first, count) * PAGE

    def expected(self, name: str, first: int = 0, count: int | None = None,
                 seed: int = 1) -> bytes:
        return expected(self.addr(name, first), self._count(name, first, count), seed)

    # -- lifetime -----------------------------------------------------------------

    def exit(self, code: int = 0) -> int:
        """Ask the child to exit; returns its exit status."""
        self.proc.stdin.write(f"exit {code}\n".encode())
        with _suppress():
            self._readline(5)
        return self.proc.wait(10)

    def _fifo_reader_may_come(self) -> bool:
        """Whether a dwait child of ours may still open its FIFO: the target
        still has a child process."""
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{tid}/children") as f:
                    if f.read().split():
                        return True
        except OSError:
            return False
        return False

    def close(self) -> None:
        """Kill and reap the child (works even if it is stopped).  A dwait
        FIFO is opened first: the spawned child blocked on it is a process
        of its own (with every signal blocked until its exec) and would
        outlive us otherwise."""
        for fifo in getattr(self, "_fifos", ()):
            # (ENXIO: its child has not reached the open yet -- or is gone)
            for _ in range(200):
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                    break
                except OSError:
                    if not self._fifo_reader_may_come():
                        break
                    time.sleep(0.005)
        if self.proc.poll() is None:
            with _suppress():
                os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            with _suppress():
                f.close()

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        return et is not None and issubclass(et, Exception)


if __name__ == "__main__":
    _Child().run()
