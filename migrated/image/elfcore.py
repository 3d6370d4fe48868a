"""Export an image as an ELF core file that readelf and gdb understand.

Layout of the file:

    ELF header | program headers (PT_NOTE, PT_LOAD...) | notes | pad to page
    | load 0 data | load 1 data | ...

One PT_LOAD per migratable mapping, p_filesz == p_memsz; pages the image
holds are copied in, everything else is left as a hole (reads as zeros, and
the file stays sparse).  Notes: NT_PRPSINFO (program name and arguments),
NT_PRSTATUS (one thread with zeroed registers, so debuggers have a thread
to show) and NT_FILE (the file-backed mappings).  The data is streamed
chunk by chunk from pages.img; nothing close to the image's size is held
in memory.
"""

from __future__ import annotations

import os
import platform
import struct

import numpy as np

from migrated.errors import ImageError
from migrated.runs import PAGE_SHIFT, PAGE_SIZE

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


def _nt_file(mappings: list[dict]) -> bytes:
    files = [m for m in mappings if m["path"].startswith("/")
             and m["kind"] in ("file", "shared-file")]
    out = [struct.pack("<QQ", len(files), PAGE_SIZE)]
    out += [struct.pack("<QQQ", int(m["start"], 16), int(m["end"], 16),
                        int(m["offset"], 16) >> PAGE_SHIFT) for m in files]
    out += [m["path"].encode(errors="replace") + b"\0" for m in files]
    return b"".join(out)


def _pflags(perms: str) -> int:
    return ((PF_R if perms[0] == "r" else 0) | (PF_W if perms[1] == "w" else 0)
            | (PF_X if perms[2] == "x" else 0))


def write_core(m: dict, pages_fd: int, path: str, *, overwrite: bool = False) -> dict:
    """Write the image described by manifest ``m`` (page data readable from
    ``pages_fd``) as an ELF core at ``path``."""
    meta = m.get("meta", {})
    arch = meta.get("arch") or platform.machine()
    if arch not in _MACHINES:
        raise ImageError(f"ELF core export supports {', '.join(_MACHINES)}; the "
                         f"image is from {arch!r}")
    machine, regs_bytes = _MACHINES[arch]
    loads = [mp for mp in m["mappings"] if mp.get("migrates")]
    if len(loads) > MAX_LOADS:
        raise ImageError(f"image {m['image_id']} has {len(loads)} mappings; ELF "
                         f"export handles at most {MAX_LOADS}")
    pid = int(meta.get("pid") or 0)
    notes = (_note(NT_PRSTATUS, _prstatus(pid, regs_bytes))
             + _note(NT_PRPSINFO, _prpsinfo(pid, meta.get("cmdline") or [],
                                            meta.get("exe") or ""))
             + _note(NT_FILE, _nt_file(m["mappings"])))
    phnum = 1 + len(loads)
    notes_off = _EHDR.size + phnum * _PHDR.size
    data_off = notes_off + len(notes)
    data_off += -data_off % PAGE_SIZE

    phdrs = [_PHDR.pack(PT_NOTE, 0, notes_off, 0, 0, len(notes), 0, 4)]
    starts, offs = [], []
    off = data_off
    for mp in loads:
        start, end = int(mp["start"], 16), int(mp["end"], 16)
        size = end - start
        phdrs.append(_PHDR.pack(PT_LOAD, _pflags(mp["perms"]), off, start, 0,
                                size, size, PAGE_SIZE))
        starts.append(start)
        offs.append(off)
        off += size
    total = off
    ident = b"\x7fELF" + bytes([2, 1, EV_CURRENT, 0]) + bytes(8)
    ehdr = _EHDR.pack(ident, ET_CORE, machine, EV_CURRENT, 0, _EHDR.size, 0, 0,
                      _EHDR.size, _PHDR.size, phnum, 0, 0, 0)

    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite
                                                         else os.O_EXCL)
    try:
        out = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ImageError(f"{path} already exists; choose another file or "
                         "pass --force to overwrite it") from None
    except OSError as exc:
        raise ImageError(f"cannot create core file {path}: {exc.strerror}") from None
    written = 0
    try:
        os.pwrite(out, ehdr + b"".join(phdrs) + notes, 0)
        # Pieces: every data run of every load, cut at chunk boundaries,
        # tagged with its load's core-file offset.
        ps_all, pn_all, dst_all = [], [], []
        for i, mp in enumerate(loads):
            runs = mf.runs_from_json(mp.get("data", []), "data")
            ps, pn = mf.cut_at_chunks(runs.starts, runs.counts)
            ps_all.append(ps)
            pn_all.append(pn)
            dst_all.append(offs[i] + (ps << PAGE_SHIFT) - starts[i])
        ps = np.concatenate(ps_all) if ps_all else np.empty(0, np.int64)
        pn = np.concatenate(pn_all) if pn_all else np.empty(0, np.int64)
        dst = np.concatenate(dst_all) if dst_all else np.empty(0, np.int64)
        slot_of = {int(c["vaddr"], 16) >> mf.CHUNK_SHIFT: int(c["slot"])
                   for c in m["chunks"]}
        chunk = ps // CHUNK_PAGES
        order = np.argsort(chunk, kind="stable")
        ps, pn, dst, chunk = ps[order], pn[order], dst[order], chunk[order]
        bounds = np.flatnonzero(np.diff(chunk)) + 1
        for lo, hi in zip(np.concatenate(([0], bounds)).tolist(),
                          np.concatenate((bounds, [chunk.size])).tolist()):
            if lo >= hi:
                continue
            c = int(chunk[lo])
            slot = slot_of.get(c)
            if slot is None:
                raise ImageError(f"image {m['image_id']}: chunk "
                                 f"{c << mf.CHUNK_SHIFT:#x} has data but no slot; "
                                 "the manifest is corrupt (run verify)")
            buf = os.pread(pages_fd, CHUNK_BYTES, slot * CHUNK_BYTES)
            buf += bytes(CHUNK_BYTES - len(buf))
            mv = memoryview(buf)
            for p, n, d in zip(ps[lo:hi].tolist(), pn[lo:hi].tolist(),
                               dst[lo:hi].tolist()):
                i = p % CHUNK_PAGES
                view = mv[i * PAGE_SIZE:(i + n) * PAGE_SIZE]
                while view:
                    k = os.pwrite(out, view, d)
                    view, d = view[k:], d + k
                written += n * PAGE_SIZE
        os.ftruncate(out, total)
        os.fsync(out)
    except OSError as exc:
        os.close(out)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise ImageError(f"writing core file {path} failed: {exc.strerror}") from None
    os.close(out)
    return {"path": path, "loads": len(loads), "size": total,
            "data_bytes": written}
