"""Export an image as an ELF core file that readelf and gdb understand.

Layout of the file:

    ELF header | program headers (PT_NOTE, PT_LOAD...) | notes | pad to page
    | load 0 data | load 1 data | ...

Loads (protocol/IMAGE.md, "ELF core export"): one PT_LOAD per migratable
mapping.  Pages the image holds are copied in; zero pages and untouched
anonymous pages are holes (read as zeros, the file stays sparse).  A
private file mapping's pages the image does not hold were never copied by
the source (they were plain page-cache pages); they are read from the
named file on this node.  Where that file cannot supply them (missing,
deleted, unreadable, too short, or ``file_pages=False``) the core carries
no bytes for them -- the mapping's load is cut there and the byte-less part
gets p_filesz < p_memsz, as the kernel does, so gdb reads them through the
NT_FILE note instead of trusting zeros.

Notes: NT_PRPSINFO (program name and arguments), NT_PRSTATUS (one thread
with zeroed registers, so debuggers have a thread to show) and NT_FILE (the
file-backed mappings).

The core is written to a 0600 temporary file next to the target and
renamed into place only when complete, so an interrupted or failed export
leaves nothing under the requested name, and ``overwrite`` replaces the
target (or a symlink at it) instead of writing through it.  The manifest
digest is checked before anything is written and each chunk's digest as
its data is read: a corrupt image is never exported.  The data is streamed
chunk by chunk from pages.img; nothing close to the image's size is held in
memory.
"""

from __future__ import annotations

import calendar
import errno
import os
import platform
import secrets
import stat
import struct
import time

import numpy as np
import xxhash

from migrated.errors import ImageError, ImageNotFound
from migrated.runs import PAGE_SHIFT, PAGE_SIZE, PageRuns

from . import manifest as mf
from .manifest import CHUNK_BYTES, CHUNK_PAGES

ET_CORE = 4
EV_CURRENT = 1
PT_LOAD = 1
PT_NOTE = 4
PF_X, PF_W, PF_R = 1, 2, 4
NT_PRSTATUS = 1
NT_PRPSINFO = 3
NT_FILE = 0x46494C45

# e_machine per architecture (elf.h).  NT_PRSTATUS register sets differ by
# machine; both have a 64-bit LP64 prstatus.
_MACHINES = {"x86_64": (62, 27 * 8), "aarch64": (183, 34 * 8)}

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")     # 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")             # 56 bytes
_NHDR = struct.Struct("<III")
# struct elf_prpsinfo (LP64): state, sname, zomb, nice, flag, uid, gid,
# pid, ppid, pgrp, sid, fname[16], psargs[80]  -> 136 bytes
_PRPSINFO = struct.Struct("<bbbb4xQIIiiii16s80s")

# PN_XNUM: at 0xffff program headers ELF needs an extension section header;
# we refuse instead (a process with that many migratable mappings is rare).
MAX_LOADS = 0xFFFF - 2

# The temporary file's name keeps at most this much of the target's name,
# so prefix + random suffix stay under NAME_MAX (255).
_TEMP_NAME_KEEP = 200
# Random temporary names tried before giving up (a clash needs 48 equal bits).
_TEMP_NAME_TRIES = 16
_OUT_MODE = 0o600

# copy_file_range errors that mean "not between these two files": fall
# back to reading and writing through a buffer.
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                            errno.EOPNOTSUPP, errno.EBADF, errno.EPERM})


def _pad4(b: bytes) -> bytes:
    return b + bytes(-len(b) % 4)


def _note(ntype: int, desc: bytes, name: bytes = b"CORE\0") -> bytes:
    return _NHDR.pack(len(name), len(desc), ntype) + _pad4(name) + _pad4(desc)


def _prstatus(pid: int, regs_bytes: int) -> bytes:
    # struct elf_prstatus (LP64): siginfo (12), cursig (2) + pad,
    # sigpend, sighold (8 each), pid, ppid, pgrp, sid (4 each), four
    # timevals (16 each), the register set, fpvalid (4) + pad.
    head = struct.pack("<iiih2xQQiiii", 0, 0, 0, 0, 0, 0, pid, 0, pid, pid)
    return head + bytes(64) + bytes(regs_bytes) + struct.pack("<i4x", 0)


def _prpsinfo(pid: int, cmdline: list[str], exe: str) -> bytes:
    fname = os.path.basename(exe or (cmdline[0] if cmdline else "")) or "?"
    psargs = " ".join(cmdline)
    return _PRPSINFO.pack(ord("T"), ord("T"), 0, 0, 0, 0, 0, pid, 0, pid, pid,
                          fname.encode(errors="replace")[:15],
                          psargs.encode(errors="replace")[:79])


# A private mapping of a memfd or a deleted file is migrated whole, as
# shared-anon (maps.py), yet it is file-backed: the kernel's cores name it
# in NT_FILE (an upgraded binary as "/usr/bin/x (deleted)"), and so do ours.
def _in_nt_file(m: dict) -> bool:
    if not m["path"].startswith("/"):
        return False
    return m["kind"] in ("file", "shared-file") or (m["kind"] == "shared-anon"
                                                    and m["perms"][3:] == "p")


def _nt_file(mappings: list[dict]) -> bytes:
    files = [m for m in mappings if _in_nt_file(m)]
    out = [struct.pack("<QQ", len(files), PAGE_SIZE)]
    out += [struct.pack("<QQQ", int(m["start"], 16), int(m["end"], 16),
                        int(m["offset"], 16) >> PAGE_SHIFT) for m in files]
    out += [m["path"].encode(errors="replace") + b"\0" for m in files]
    return b"".join(out)


def _pflags(perms: str) -> int:
    return ((PF_R if perms[0] == "r" else 0) | (PF_W if perms[1] == "w" else 0)
            | (PF_X if perms[2] == "x" else 0))


def _verify_hint(image_id: str) -> str:
    return (f"the image is corrupt; nothing was exported -- run `migratectl images "
            f"verify {image_id}` for details")


# -- the files behind private file mappings ---------------------------------

class _MappedFiles:
    """Files named by file mappings, opened read-only at most once each.
    Only regular files are opened (never a FIFO or a device, whose open or
    read could block or have effects), and only those every user may read:
    the paths come from the source node, and the exporter is usually root
    -- a peer naming /etc/shadow as a mapping must not get its bytes into a
    core an operator hands on (binaries and libraries are world-readable).
    A path whose file is gone, is not such a file or cannot be opened by
    the exporting user gives None (gdb then reads it through NT_FILE)."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[int, int, float] | None] = {}

    def get(self, mp: dict) -> tuple[int, int, float] | None:
        """(fd, size, mtime) of the mapping's file, or None."""
        path = mp.get("path") or ""
        if mp.get("deleted") or not path.startswith("/") or "\0" in path:
            return None
        if path not in self._open:
            self._open[path] = self._try_open(path)
        return self._open[path]

    @staticmethod
    def _try_open(path: str) -> tuple[int, int, float] | None:
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return None
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & stat.S_IROTH:
            os.close(fd)           # (not for everyone, or replaced between stat and open)
            return None
        return fd, st.st_size, st.st_mtime

    def close(self) -> None:
        for v in self._open.values():
            if v is not None:
                os.close(v[0])
        self._open.clear()


def _copy_from_file(src: int, dst: int, length: int, src_off: int, dst_off: int,
                    buf: memoryview) -> int:
    """Copy up to ``length`` bytes of file ``src`` at ``src_off`` into the
    core at ``dst_off`` (copy_file_range, else through ``buf``); stops at
    the file's end.  Returns the bytes copied."""
    done, in_kernel = 0, True
    while done < length:
        if in_kernel:
            try:
                k = os.copy_file_range(src, dst, length - done, src_off + done,
                                       dst_off + done)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                k = 0
            if k > 0:
                done += k
                continue
            # 0: the end of the file, or a filesystem that copies nothing
            # (procfs-like); a plain read tells which.
            in_kernel = False
        view = buf[:min(len(buf), length - done)]
        k = os.preadv(src, [view], src_off + done)
        if k <= 0:
            break
        _pwrite_all(dst, view[:k], dst_off + done)
        done += k
    return done


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        k = os.pwrite(fd, view, offset)
        if k <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view, offset = view[k:], offset + k


# -- where each page of each mapping goes -----------------------------------

class _Plan:
    """Program headers and where page bytes land in the core file.

    ``vaddr``/``memsz``/``filesz``/``offset``/``flags`` are per PT_LOAD,
    sorted by address; ``fills`` lists (vaddr, pages, file fd, file offset,
    file size, path) runs to read from mapped files; ``unbacked`` names the files
    whose pages got no bytes, ``changed`` those modified since the
    migration began (their bytes may not be what the process had)."""

    def __init__(self) -> None:
        self.vaddr: list[int] = []
        self.memsz: list[int] = []
        self.filesz: list[int] = []
        self.flags: list[int] = []
        self.offset: np.ndarray = np.empty(0, np.int64)
        self.fills: list[tuple[int, int, int, int, int, str]] = []
        self.unbacked: dict[str, int] = {}
        self.changed: set[str] = set()

    def add(self, start: int, end: int, flags: int, nobytes: PageRuns) -> None:
        """Loads of one mapping [start, end) whose pages in ``nobytes`` have
        no bytes in the core: one load per run of pages with bytes, each
        reaching over the byte-less run after it (p_filesz < p_memsz), and
        a p_filesz = 0 load for a byte-less run at the mapping's start."""
        if not nobytes:
            vs, ve, fe = [start], [end], [end]
        else:
            s = nobytes.starts.astype(np.int64).tolist()
            e = nobytes.ends().astype(np.int64).tolist()
            vs, ve, fe = [start] + e, e + [end], s + [end]
            if vs[-1] == end:                 # byte-less up to the end
                vs, ve, fe = vs[:-1], ve[:-1], fe[:-1]
        self.vaddr += vs
        self.memsz += [b - a for a, b in zip(vs, ve)]
        self.filesz += [b - a for a, b in zip(vs, fe)]
        self.flags += [flags] * len(vs)

    def place(self, data_off: int) -> int:
        """Give each load its file offset; returns the core's size."""
        fs = np.array(self.filesz, np.int64)
        self.offset = data_off + np.concatenate(([0], np.cumsum(fs)[:-1])) if fs.size \
            else np.empty(0, np.int64)
        return data_off + int(fs.sum())

    def core_offsets(self, addr: np.ndarray, nbytes: np.ndarray, what: str) -> np.ndarray:
        """Core file offsets of byte ranges [addr, addr + nbytes), each of
        which must lie in the bytes of one load."""
        va = np.array(self.vaddr, np.int64)
        k = np.searchsorted(va, addr, side="right") - 1
        fs = np.array(self.filesz, np.int64)
        ok = (k >= 0) & (addr + nbytes <= va[np.maximum(k, 0)] + fs[np.maximum(k, 0)])
        if not ok.all():
            bad = int(addr[np.flatnonzero(~ok)[0]])
            raise ImageError(f"{what} at {bad:#x} lies outside the mappings' "
                             "loads; the manifest is inconsistent")
        return self.offset[k] + (addr - va[k])


def _began(m: dict) -> float | None:
    """When the migration began (``began_at``, UTC to the millisecond),
    rounded up to the next millisecond; None if absent or malformed."""
    try:
        at = m["began_at"]
        t = time.strptime(at[:19], "%Y-%m-%dT%H:%M:%S")
        ms = int(at[20:23]) if at[19:20] == "." else 0
    except (KeyError, TypeError, ValueError):
        return None
    return calendar.timegm(t) + (ms + 1) / 1000


def _plan_loads(m: dict, loads: list[dict], files: _MappedFiles | None) -> _Plan:
    plan = _Plan()
    began = _began(m)
    for mp in loads:
        start, end = int(mp["start"], 16), int(mp["end"], 16)
        nobytes = PageRuns.empty()
        if mp["kind"] == "file":
            held = mf.runs_from_json(mp.get("data", []), "data").union(
                mf.runs_from_json(mp.get("zero", []), "zero"))
            unheld = PageRuns.from_range(start, end).subtract(held)
            if unheld:
                src = files.get(mp) if files is not None else None
                fill = PageRuns.empty()
                if src is not None:
                    # Pages past the file's end cannot be read (SIGBUS in
                    # the process): they get no bytes; the last partial
                    # page is the file's tail then zeros, as mapped.
                    fd, size, mtime = src
                    have = max(0, size - int(mp["offset"], 16))
                    top = min(end, start + ((have + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)))
                    fill = unheld.clip(start, top)
                    file0 = int(mp["offset"], 16) - start
                    for a, n in fill.pairs():
                        plan.fills.append((a, n, fd, file0 + a, size, mp["path"]))
                    if fill and began is not None and mtime > began:
                        plan.changed.add(mp["path"])
                nobytes = unheld.subtract(fill)
                if nobytes:
                    plan.unbacked[mp["path"]] = (plan.unbacked.get(mp["path"], 0)
                                                 + nobytes.total_bytes())
        plan.add(start, end, _pflags(mp["perms"]), nobytes)
    if len(plan.vaddr) > MAX_LOADS:
        raise ImageError(f"image {m['image_id']} needs {len(plan.vaddr)} loads; ELF "
                         f"export handles at most {MAX_LOADS}")
    return plan


# -- the output file ----------------------------------------------------------

def _check_target(path: str, state_dir: str | None) -> None:
    """Refuse a core file inside the daemon's state directory: with
    --force it could replace an image's own files (pages.img, manifest)."""
    if not state_dir:
        return
    try:
        st = os.stat(state_dir)
    except OSError:
        return
    guard = (st.st_dev, st.st_ino)
    real_state = os.path.realpath(state_dir)
    d = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if d == real_state or d.startswith(real_state.rstrip("/") + "/"):
        inside = True
    else:
        inside = False
        probe = d
        while True:          # bind mounts of it show the same dev/inode
            try:
                s = os.stat(probe)
            except OSError:
                break
            if (s.st_dev, s.st_ino) == guard:
                inside = True
                break
            up = os.path.dirname(probe)
            if up == probe:
                break
            probe = up
    if inside:
        raise ImageError(f"refusing to write a core file at {path}: it is inside the "
                         f"state directory {state_dir}, where it could replace an "
                         "image's files; choose a path outside it")


def _state_dir_of(pages_fd: int) -> str | None:
    """The state directory, from where the page file lives
    (STATE/images/<ID>/pages.img), for callers that do not say."""
    try:
        where = os.readlink(f"/proc/self/fd/{pages_fd}")
    except OSError:
        return None
    image_dir = os.path.dirname(where)
    images = os.path.dirname(image_dir)
    if os.path.basename(images) not in ("images", "partial"):
        return None
    return os.path.dirname(images)


def _create_temp(path: str) -> tuple[int, str]:
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    if not base:
        raise ImageError(f"core file {path!r} names a directory; give a file name")
    for _ in range(_TEMP_NAME_TRIES):
        tmp = os.path.join(directory, f".{base[:_TEMP_NAME_KEEP]}."
                                      f"{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, _OUT_MODE)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ImageError(f"cannot create core file {path}: "
                             f"{exc.strerror or exc}") from None
        return fd, tmp
    raise ImageError(f"cannot create a temporary file next to {path}")


def _put_in_place(tmp: str, path: str, overwrite: bool) -> None:
    """Move the finished core to ``path``: rename(2) when overwriting (it
    replaces a file or symlink at ``path``, never writes through it); a
    hard link otherwise, which fails if anything is at ``path`` by then."""
    if overwrite:
        os.rename(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ImageError(f"{path} already exists; choose another file or "
                         "pass --force to overwrite it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        # A filesystem without hard links: check, then rename.
        if os.path.lexists(path):
            raise ImageError(f"{path} already exists; choose another file or "
                             "pass --force to overwrite it") from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- export -----------------------------------------------------------------

def export_image(store, image_id: str, path: str, *, overwrite: bool = False,
                 file_pages: bool = True) -> dict:
    """Export complete image ``image_id`` of ``store`` (an ImageStore) as an
    ELF core at ``path``.  The manifest and the page file are opened
    through the image's directory, so an image removed meanwhile is either
    exported whole or reported as gone."""
    image_id = mf.check_image_id(image_id)
    where = os.path.join(store.images_dir, image_id)
    try:
        dfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ImageNotFound(f"no image {image_id} in {store.images_dir} "
                            "(see `migratectl images list`)") from None
    pages_fd = -1
    try:
        try:
            mfd = os.open(mf.MANIFEST_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                          dir_fd=dfd)
            try:
                with os.fdopen(mfd, "rb", closefd=False) as f:
                    blob = f.read()
            finally:
                os.close(mfd)
            m = mf.decode_manifest(blob, image_id)
            pages_fd = os.open(mf.PAGES_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                               dir_fd=dfd)
        except FileNotFoundError:
            raise ImageNotFound(f"image {image_id} not found (removed?)") from None
        _check_digest(m)
        _check_structure(m)
        return _export(m, pages_fd, path, overwrite=overwrite,
                       state_dir=store.state_dir, file_pages=file_pages)
    finally:
        if pages_fd >= 0:
            os.close(pages_fd)
        os.close(dfd)


def _check_structure(m: dict) -> None:
    """Refuse a manifest that contradicts IMAGE.md (the core would miss or
    misplace memory), with the store's own checker where this tree has it."""
    problems_of = getattr(mf, "structure_problems", None)
    if problems_of is None:
        return
    problems, _ = problems_of(m)
    if problems:
        image_id = m.get("image_id", "?")
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ImageError(f"image {image_id} is inconsistent, not exporting it: "
                         f"{problems[0]}{more}; {_verify_hint(image_id)}")


def write_core(m: dict, pages_fd: int, path: str, *, overwrite: bool = False,
               state_dir: str | None = None, file_pages: bool = True) -> dict:
    """Write the image described by manifest ``m`` (page data readable from
    ``pages_fd``) as an ELF core at ``path``.  ``state_dir`` (found from
    the page file's location when not given) is refused as a destination;
    ``file_pages=False`` leaves pages of file mappings the image does not
    hold to NT_FILE instead of reading them from the files."""
    _check_digest(m)
    return _export(m, pages_fd, path, overwrite=overwrite, state_dir=state_dir,
                   file_pages=file_pages)


def _check_digest(m: dict) -> None:
    """The manifest digest seals every run and chunk digest: check it
    before anything else is trusted."""
    image_id = m.get("image_id", "?")
    want, got = m.get("digest"), mf.image_digest(m)
    if want != got:
        raise ImageError(f"image {image_id}: manifest digest mismatch (recorded "
                         f"{want}, computed {got}); {_verify_hint(image_id)}")


def _export(m: dict, pages_fd: int, path: str, *, overwrite: bool,
            state_dir: str | None, file_pages: bool) -> dict:
    meta = m.get("meta", {})
    arch = meta.get("arch") or platform.machine()
    if arch not in _MACHINES:
        raise ImageError(f"ELF core export supports {', '.join(_MACHINES)}; the "
                         f"image is from {arch!r}")
    machine, regs_bytes = _MACHINES[arch]
    _check_target(path, state_dir if state_dir is not None else _state_dir_of(pages_fd))
    if not overwrite and os.path.lexists(path):
        raise ImageError(f"{path} already exists; choose another file or "
                         "pass --force to overwrite it")
    loads = sorted((mp for mp in m["mappings"] if mp.get("migrates")),
                   key=lambda mp: int(mp["start"], 16))
    files = _MappedFiles() if file_pages else None
    try:
        plan = _plan_loads(m, loads, files)
        return _write(m, loads, plan, pages_fd, path, overwrite, machine, regs_bytes)
    finally:
        if files is not None:
            files.close()


def _headers(m: dict, plan: _Plan, machine: int, regs_bytes: int) -> tuple[bytes, int]:
    meta = m.get("meta", {})
    pid = int(meta.get("pid") or 0)
    notes = (_note(NT_PRSTATUS, _prstatus(pid, regs_bytes))
             + _note(NT_PRPSINFO, _prpsinfo(pid, meta.get("cmdline") or [],
                                            meta.get("exe") or ""))
             + _note(NT_FILE, _nt_file(m["mappings"])))
    phnum = 1 + len(plan.vaddr)
    notes_off = _EHDR.size + phnum * _PHDR.size
    data_off = notes_off + len(notes)
    data_off += -data_off % PAGE_SIZE
    total = plan.place(data_off)
    phdrs = [_PHDR.pack(PT_NOTE, 0, notes_off, 0, 0, len(notes), 0, 4)]
    phdrs += [_PHDR.pack(PT_LOAD, fl, off, va, 0, fs, ms, PAGE_SIZE)
              for fl, off, va, fs, ms in zip(plan.flags, plan.offset.tolist(),
                                             plan.vaddr, plan.filesz, plan.memsz)]
    ident = b"\x7fELF" + bytes([2, 1, EV_CURRENT, 0]) + bytes(8)
    ehdr = _EHDR.pack(ident, ET_CORE, machine, EV_CURRENT, 0, _EHDR.size, 0, 0,
                      _EHDR.size, _PHDR.size, phnum, 0, 0, 0)
    return ehdr + b"".join(phdrs) + notes, total


def _write(m: dict, loads: list[dict], plan: _Plan, pages_fd: int, path: str,
           overwrite: bool, machine: int, regs_bytes: int) -> dict:
    head, total = _headers(m, plan, machine, regs_bytes)
    out, tmp = _create_temp(path)
    placed = False
    try:
        os.fchmod(out, _OUT_MODE)             # whatever the umask
        _pwrite_all(out, memoryview(head), 0)
        buf = memoryview(bytearray(CHUNK_BYTES))
        file_bytes = _copy_file_pages(plan, out, buf)
        written = _copy_image_pages(m, loads, plan, pages_fd, out, buf)
        os.ftruncate(out, total)
        os.fsync(out)
        _put_in_place(tmp, path, overwrite)
        placed = True
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        raise ImageError(f"writing core file {path} failed: "
                         f"{exc.strerror or exc}") from None
    finally:
        os.close(out)
        if not placed:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return {"path": path, "loads": len(plan.vaddr), "size": total,
            "data_bytes": written, "file_bytes": file_bytes,
            "unbacked_bytes": sum(plan.unbacked.values()),
            "unbacked_files": sorted(plan.unbacked),
            "changed_files": sorted(plan.changed)}


def _copy_file_pages(plan: _Plan, out: int, buf: memoryview) -> int:
    """Pages of file mappings the image does not hold, from the files."""
    if not plan.fills:
        return 0
    addr = np.array([f[0] for f in plan.fills], np.int64)
    nbytes = np.array([f[1] for f in plan.fills], np.int64) << PAGE_SHIFT
    dst = plan.core_offsets(addr, nbytes, "file pages").tolist()
    copied = 0
    for (a, n, fd, foff, size, path), d in zip(plan.fills, dst):
        length = max(0, min(n << PAGE_SHIFT, size - foff))
        try:
            copied += _copy_from_file(fd, out, length, foff, d, buf)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise                   # the core's side: reported as such
            raise ImageError(f"reading {path} for the mapping at {a:#x} failed: "
                             f"{exc.strerror or exc}; pass --no-file-pages to leave "
                             "such pages to the NT_FILE note") from None
    return copied


def _copy_image_pages(m: dict, loads: list[dict], plan: _Plan, pages_fd: int,
                      out: int, buf: memoryview) -> int:
    """The image's data pages, chunk by chunk, each chunk checked against
    its digest before any of it is written."""
    image_id = m.get("image_id", "?")
    # Each mapping's runs as they are, in address order: not coalesced
    # across two adjacent mappings, whose pages lie in different loads.
    runs = [mf.runs_from_json(mp.get("data", []), "data") for mp in loads]
    starts = np.concatenate([r.starts for r in runs] + [np.empty(0, np.uint64)])
    counts = np.concatenate([r.counts for r in runs] + [np.empty(0, np.uint64)])
    ps, pn = mf.cut_at_chunks(starts, counts)
    if ps.size == 0:
        return 0
    dst = plan.core_offsets(ps << PAGE_SHIFT, pn << PAGE_SHIFT, "page data")
    chunk = ps // CHUNK_PAGES
    records = {int(c["vaddr"], 16) >> mf.CHUNK_SHIFT: c for c in m["chunks"]}
    bounds = np.flatnonzero(np.diff(chunk)) + 1
    written = 0
    for lo, hi in zip([0] + bounds.tolist(), bounds.tolist() + [chunk.size]):
        c = int(chunk[lo])
        rec = records.get(c)
        if rec is None:
            raise ImageError(f"image {image_id}: chunk {c << mf.CHUNK_SHIFT:#x} has "
                             f"data but no slot; {_verify_hint(image_id)}")
        first = ps[lo:hi] - c * CHUNK_PAGES          # page index in the chunk
        count = pn[lo:hi]
        a, b = int(first[0]), int(first[-1] + count[-1])
        span = buf[a * PAGE_SIZE:b * PAGE_SIZE]
        got, base = 0, int(rec["slot"]) * CHUNK_BYTES + a * PAGE_SIZE
        while got < len(span):
            k = os.preadv(pages_fd, [span[got:]], base + got)
            if k <= 0:                               # sparse tail: zeros
                span[got:] = bytes(len(span) - got)
                break
            got += k
        h = xxhash.xxh3_128()
        for f, n in zip(first.tolist(), count.tolist()):
            h.update(buf[f * PAGE_SIZE:(f + n) * PAGE_SIZE])
        npages = int(count.sum())
        if h.hexdigest() != rec.get("digest") or npages != rec.get("pages"):
            raise ImageError(f"image {image_id}: page data of chunk "
                             f"{rec['vaddr']} (slot {rec['slot']}) does not match "
                             f"its digest; {_verify_hint(image_id)}")
        for f, n, d in zip(first.tolist(), count.tolist(), dst[lo:hi].tolist()):
            _pwrite_all(out, buf[f * PAGE_SIZE:(f + n) * PAGE_SIZE], d)
        written += npages * PAGE_SIZE
    return written
