"""What this kernel can do for us (our `criu check`).

Nothing here is taken on faith from the kernel version or its config:
each feature is exercised on our own process (or a forked child) and
reported as it behaved.  ``probe()`` returns a plain dict (it is printed as
JSON by ``migratectl probe --json`` and sent over the control socket);
``select_tracker()`` turns a tracker option ("auto" or a name) into the
tracker to use, refusing a forced tracker this kernel cannot run.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import platform
import struct
import threading

from migrated.errors import KernelUnsupported, MigratedError

PAGE_SIZE = mmap.PAGESIZE

# -- tracker names -----------------------------------------------------------

SOFT_DIRTY = "soft-dirty"
DIGEST = "digest"
UFFD_WP = "uffd-wp"          # async userfaultfd write-protect (migrated/kernel/uffd.py)
AUTO = "auto"
# Best first: uffd-wp collects and re-protects in one ioctl with no freeze;
# soft-dirty needs a short freeze per round; digest hashes all memory.
TRACKERS = (UFFD_WP, SOFT_DIRTY, DIGEST)
KNOWN_TRACKERS = (SOFT_DIRTY, DIGEST, UFFD_WP)

# A probe that forks a child holds this from its first pipe until the
# child is reaped (probe_process_vm_readv, uffd._selftest).  A child gets a
# copy of every fd open when it is forked: two probes at once (concurrent
# `migratectl probe`, first migrations choosing a tracker) each handed its
# child the other's pipe, neither child ever saw its end of file, and both
# threads waited in waitpid for ever -- their children keeping the
# daemon's fds, its state-dir lock among them, past the daemon's death.
FORK_LOCK = threading.Lock()

# -- pagemap bits (Documentation/admin-guide/mm/pagemap.rst) ----------------

PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_PRESENT = 1 << 63

CLEAR_REFS_SOFT_DIRTY = 4

# Rounds of the soft-dirty self-test: a POWER9 kernel once passed the first
# round and failed the second, so one round is not proof.
SOFT_DIRTY_SELFTEST_ROUNDS = 2

# -- PAGEMAP_SCAN (include/uapi/linux/fs.h, 6.7+) ----------------------------

PAGEMAP_SCAN = 0xC0606610            # _IOWR('f', 16, struct pm_scan_arg)
PM_SCAN_ARG = struct.Struct("=12Q")  # struct pm_scan_arg: 12 x u64 = 96 bytes
PAGE_REGION = struct.Struct("=3Q")   # struct page_region: start, end, categories

# Category bits, in kernel order.  Each is probed by asking for it alone:
# a bit the kernel does not know is EINVAL.
SCAN_CATEGORIES = {
    "wpallowed": 1 << 0,
    "written": 1 << 1,
    "file": 1 << 2,
    "present": 1 << 3,
    "swapped": 1 << 4,
    "pfnzero": 1 << 5,
    "huge": 1 << 6,
    "soft_dirty": 1 << 7,   # 6.8+
    "guard": 1 << 8,        # ~6.16+
}

# -- userfaultfd (include/uapi/linux/userfaultfd.h) --------------------------

SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(platform.machine())
UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_API_ARG = struct.Struct("=3Q")     # api, features, ioctls
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15

SYS_PROCESS_VM_READV = {"x86_64": 310, "aarch64": 270}.get(platform.machine())

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _buffer_address(buf: mmap.mmap) -> int:
    """Virtual address of an mmap object's first byte."""
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view   # release the export so the mmap can be closed


def _pagemap_entry(fd: int, addr: int) -> int:
    raw = os.pread(fd, 8, (addr // PAGE_SIZE) * 8)
    if len(raw) != 8:
        raise OSError(errno.EIO, "short pagemap read")
    return int.from_bytes(raw, "little")


# -- soft-dirty ----------------------------------------------------------------

def probe_soft_dirty() -> tuple[bool, str]:
    """Self-test: write, clear, expect bit 55 clear, write, expect it set.

    Writing 4 to clear_refs succeeds silently on kernels built without
    CONFIG_MEM_SOFT_DIRTY, so only the bit's behaviour proves support.
    """
    buf = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        addr = _buffer_address(buf)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            buf[0] = 1
            for rnd in range(1, SOFT_DIRTY_SELFTEST_ROUNDS + 1):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write(str(CLEAR_REFS_SOFT_DIRTY))
                if _pagemap_entry(fd, addr) & PM_SOFT_DIRTY:
                    return False, (f"round {rnd}: bit 55 still set after clear_refs 4 "
                                   "(clearing does not work)")
                buf[0] = (buf[0] + 1) & 0xFF
                if not _pagemap_entry(fd, addr) & PM_SOFT_DIRTY:
                    return False, (f"round {rnd}: a write did not set bit 55 "
                                   "(kernel built without CONFIG_MEM_SOFT_DIRTY?)")
        finally:
            os.close(fd)
    except OSError as e:
        return False, f"self-test failed: {e}"
    finally:
        buf.close()
    return True, "self-test passed"


# -- pagemap permissions ---------------------------------------------------------

def probe_pagemap() -> dict:
    """Permission state of /proc/self/pagemap, as CRIU's kerndat sees it:
    "full" (PFNs visible), "flags-only" (PFNs read as 0 without
    CAP_SYS_ADMIN) or "disabled" (cannot be read at all)."""
    buf = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf[0] = 1
        addr = _buffer_address(buf)
        try:
            fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            try:
                entry = _pagemap_entry(fd, addr)
            finally:
                os.close(fd)
        except OSError as e:
            return {"state": "disabled", "pfn": False, "reason": str(e)}
    finally:
        buf.close()
    if not entry & PM_PRESENT:
        return {"state": "disabled", "pfn": False,
                "reason": "a page just written reads as not present"}
    pfn = bool(entry & PM_PFN_MASK)
    return {"state": "full" if pfn else "flags-only", "pfn": pfn}


# -- PAGEMAP_SCAN ---------------------------------------------------------------

def _scan_once(fd: int, start: int, end: int, mask: int, vec: ctypes.Array) -> int:
    arg = bytearray(PM_SCAN_ARG.pack(
        PM_SCAN_ARG.size, 0, start, end, 0, ctypes.addressof(vec), len(vec),
        0, 0, mask, 0, mask))
    return fcntl.ioctl(fd, PAGEMAP_SCAN, arg, True)


def probe_pagemap_scan() -> tuple[bool, list[str], str]:
    """(available, category names the kernel accepts, reason)."""
    buf = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    vec = (ctypes.c_uint64 * (PAGE_REGION.size // 8 * 4))()
    try:
        buf[0] = 1
        addr = _buffer_address(buf)
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                n = _scan_once(fd, addr, addr + PAGE_SIZE, SCAN_CATEGORIES["present"],
                               vec)
            except OSError as e:
                if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    return False, [], "kernel has no PAGEMAP_SCAN ioctl (6.7+)"
                return False, [], f"PAGEMAP_SCAN failed: {e}"
            if n != 1 or vec[0] != addr:
                return False, [], "PAGEMAP_SCAN did not report a page just written"
            cats = []
            for name, bit in SCAN_CATEGORIES.items():
                try:
                    _scan_once(fd, addr, addr + PAGE_SIZE, bit, vec)
                except OSError as e:
                    if e.errno == errno.EINVAL:
                        continue
                    raise
                cats.append(name)
        finally:
            os.close(fd)
    except OSError as e:
        return False, [], f"PAGEMAP_SCAN probe failed: {e}"
    finally:
        buf.close()
    return True, cats, "ok"


# -- userfaultfd async write-protect ---------------------------------------------

def _userfaultfd() -> int:
    if SYS_USERFAULTFD is None:
        raise OSError(errno.ENOSYS, f"no userfaultfd syscall number for {platform.machine()}")
    fd = _libc.syscall(ctypes.c_long(SYS_USERFAULTFD),
                       ctypes.c_long(UFFD_USER_MODE_ONLY | os.O_CLOEXEC))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def _uffd_api(features: int) -> tuple[int, int]:
    """Handshake on a fresh userfaultfd; returns (features, ioctls)."""
    fd = _userfaultfd()
    try:
        arg = bytearray(UFFDIO_API_ARG.pack(UFFD_API, features, 0))
        fcntl.ioctl(fd, UFFDIO_API, arg, True)
        _, feats, ioctls = UFFDIO_API_ARG.unpack(arg)
        return feats, ioctls
    finally:
        os.close(fd)


def probe_uffd_wp_async() -> tuple[bool, str, int | None]:
    """(supported, reason, features the kernel offers or None)."""
    try:
        offered, _ = _uffd_api(0)
    except OSError as e:
        why = {errno.ENOSYS: "kernel built without CONFIG_USERFAULTFD",
               errno.EPERM: "userfaultfd not permitted (vm.unprivileged_userfaultfd, "
                            "seccomp or missing CAP_SYS_PTRACE)"}.get(e.errno, str(e))
        return False, why, None
    wanted = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
    missing = wanted & ~offered
    if missing:
        names = [n for n, b in (("WP_ASYNC", UFFD_FEATURE_WP_ASYNC),
                                ("WP_UNPOPULATED", UFFD_FEATURE_WP_UNPOPULATED))
                 if missing & b]
        return False, (f"kernel does not offer {'/'.join(names)} "
                       "(needs 6.7+ with CONFIG_PTE_MARKER_UFFD_WP)"), offered
    try:
        _uffd_api(wanted)
    except OSError as e:
        return False, f"UFFDIO_API with WP_ASYNC|WP_UNPOPULATED refused: {e}", offered
    return True, "UFFDIO_API accepted WP_ASYNC|WP_UNPOPULATED", offered


# -- process_vm_readv --------------------------------------------------------------

def _process_vm_readv(pid: int, local_addr: int, remote_addr: int, length: int) -> int:
    if SYS_PROCESS_VM_READV is None:
        raise OSError(errno.ENOSYS, f"no process_vm_readv syscall number for "
                                    f"{platform.machine()}")
    liov = _IoVec(local_addr, length)
    riov = _IoVec(remote_addr, length)
    # syscall() is variadic: pass every argument as a full 64-bit value, or
    # the upper halves of the registers are garbage (flags != 0: EINVAL).
    n = _libc.syscall(ctypes.c_long(SYS_PROCESS_VM_READV), ctypes.c_long(pid),
                      ctypes.byref(liov), ctypes.c_ulong(1), ctypes.byref(riov),
                      ctypes.c_ulong(1), ctypes.c_ulong(0))
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return n


def probe_process_vm_readv() -> tuple[bool, str]:
    """Read a marker page from a forked child (a different mm, like a real
    target) and compare."""
    with FORK_LOCK:
        return _probe_process_vm_readv()


def _probe_process_vm_readv() -> tuple[bool, str]:
    marker = os.urandom(64)
    src = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    dst = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    r, w = os.pipe()
    pid = -1
    try:
        src[:len(marker)] = marker
        src_addr, dst_addr = _buffer_address(src), _buffer_address(dst)
        pid = os.fork()
        if pid == 0:  # child: hold the page until the parent is done
            try:
                os.close(w)
                os.read(r, 1)
            finally:
                os._exit(0)
        os.close(r)
        r = -1
        src[:len(marker)] = bytes(len(marker))  # parent's copy differs now
        try:
            n = _process_vm_readv(pid, dst_addr, src_addr, PAGE_SIZE)
        except OSError as e:
            return False, f"process_vm_readv on a child: {e}"
        if n != PAGE_SIZE or dst[:len(marker)] != marker:
            return False, "process_vm_readv returned wrong data"
        return True, "read a child's page"
    finally:
        if r >= 0:
            os.close(r)
        os.close(w)      # child's read returns EOF: it exits
        if pid > 0:
            os.waitpid(pid, 0)
        src.close()
        dst.close()


def _ptrace_scope() -> int | None:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


# -- the whole picture ----------------------------------------------------------------

def probe() -> dict:
    """Probe everything; never raises for a missing feature (it is reported)."""
    sd, sd_reason = probe_soft_dirty()
    scan, cats, scan_reason = probe_pagemap_scan()
    wp, wp_reason, uffd_features = probe_uffd_wp_async()
    pvr, pvr_reason = probe_process_vm_readv()
    pm = probe_pagemap()
    result = {
        "kernel": platform.release(),
        "arch": platform.machine(),
        "page_size": PAGE_SIZE,
        "uid": os.geteuid(),
        "soft_dirty": sd,
        "soft_dirty_reason": sd_reason,
        "pagemap": pm["state"],
        "pagemap_pfn": pm["pfn"],
        "pagemap_scan": scan,
        "pagemap_scan_categories": cats,
        "pagemap_scan_soft_dirty": scan and "soft_dirty" in cats,
        "pagemap_scan_reason": scan_reason,
        "uffd_wp_async": wp,
        "uffd_wp_async_reason": wp_reason,
        "uffd_features": None if uffd_features is None else hex(uffd_features),
        "process_vm_readv": pvr,
        "process_vm_readv_reason": pvr_reason,
        "ptrace_scope": _ptrace_scope(),
    }
    from migrated.kernel.uffd import uffd_wp_tracker_available  # lazy: uffd imports probe
    result["uffd_wp_tracker"], result["uffd_wp_tracker_reason"] = uffd_wp_tracker_available()
    result["trackers_available"] = available_trackers(result)
    result["tracker"] = select_tracker(AUTO, result)
    return result


@functools.lru_cache(maxsize=1)
def _cached() -> dict:
    return probe()


def cached_probe() -> dict:
    """probe() once per process: kernel features do not change while we run."""
    return dict(_cached())


def available_trackers(result: dict) -> list[str]:
    out = []
    if result.get("uffd_wp_tracker"):
        out.append(UFFD_WP)
    if result.get("soft_dirty") and result.get("pagemap") != "disabled":
        out.append(SOFT_DIRTY)
    out.append(DIGEST)   # needs nothing beyond reading memory
    return out


def select_tracker(name: str, result: dict | None = None) -> str:
    """The tracker to use for option ``name`` ("auto" or a tracker name).

    "auto" takes the best tracker this kernel runs (uffd-wp when async
    write-protect works, else soft-dirty when its self-test passed, else
    digest).  A forced tracker the kernel cannot run
    raises KernelUnsupported saying why and what to use instead.
    """
    name = (name or AUTO).strip().lower()
    if name not in KNOWN_TRACKERS + (AUTO,):
        raise MigratedError(f"unknown tracker {name!r}: choose one of "
                            f"{', '.join((AUTO,) + KNOWN_TRACKERS)}")
    if result is None:
        result = cached_probe()
    avail = result.get("trackers_available") or available_trackers(result)
    if name == AUTO:
        return avail[0]
    if name in avail:
        return name
    if name == SOFT_DIRTY:
        why = result.get("soft_dirty_reason") or "soft-dirty self-test failed"
        if result.get("pagemap") == "disabled":
            why = "/proc/PID/pagemap cannot be read"
        raise KernelUnsupported(
            f"tracker soft-dirty is not supported on kernel {result.get('kernel')}: "
            f"{why}; use --tracker digest or auto")
    if name == UFFD_WP:
        why = (result.get("uffd_wp_tracker_reason") or result.get("uffd_wp_async_reason")
               or "async userfaultfd write-protect unavailable")
        raise KernelUnsupported(
            f"tracker uffd-wp is not supported on kernel {result.get('kernel')}: {why}; "
            "use --tracker digest or auto")
    raise KernelUnsupported(f"tracker {name} is not available on this kernel")
