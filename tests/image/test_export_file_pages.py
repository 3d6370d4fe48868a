"""ELF core export of private file mappings: pages the image does not hold
(the source never sends plain page-cache pages) come from the file on this
node, and where the file cannot supply them the core carries no bytes for
them (p_filesz < p_memsz) so gdb falls back to NT_FILE instead of trusting
zeros.  protocol/IMAGE.md, "ELF core export"."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys

import pytest

from migrated.engine.source import SendOptions
from migrated.image.elfcore import export_image
from migrated.kernel.maps import read_layout
from migrated.runs import PAGE_SIZE
from tests.engine.harness import migrate
from tests.engine.procs import reap

from .conftest import mapping, runs, write_pattern

GDB = shutil.which("gdb")
P = PAGE_SIZE

# The child maps FILE (5 pages + FILE_TAIL bytes) twice, privately:
#   ro: read-only, offset 2 pages, up to the file's end (4 pages, the
#       last one holds the file's 100-byte tail), one page read, none
#       written;
#   rw: writable, offset 1 page, 3 pages long, its middle page written
#       (copy on write: the only file page the source sends).
FILE_TAIL = 100
CHILD = r"""
import mmap, os, sys
path, marker = sys.argv[1], sys.argv[2]
P = mmap.PAGESIZE
with open(path, "wb") as f:
    for i in range(5):
        f.write(f"FILEPAGE-{i}-{marker}".encode().ljust(P, b"."))
    f.write(f"TAIL-{marker}".encode().ljust(%d, b"+"))
fd = os.open(path, os.O_RDONLY)
ro = mmap.mmap(fd, 3 * P + %d, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ, offset=2 * P)
ro[0]                                   # in the page cache, never written
fd2 = os.open(path, os.O_RDONLY)
rw = mmap.mmap(fd2, 3 * P, flags=mmap.MAP_PRIVATE,
               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=P)
cow = f"COW-{marker}".encode()
rw[P + 100:P + 100 + len(cow)] = cow
print("ready", flush=True)
sys.stdin.read()
""" % (FILE_TAIL, FILE_TAIL)


def _gdb(core: str, *exprs: str) -> str:
    args = [GDB, "-nx", "-batch", "-c", core]
    for e in exprs:
        args += ["-ex", e]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def _loads(core: str) -> list[tuple[int, int, int, int]]:
    """(vaddr, offset, filesz, memsz) of every PT_LOAD, read from the file."""
    with open(core, "rb") as f:
        head = f.read(64)
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    out = []
    for i in range(phnum):
        ptype, _, off, va, _, fs, ms, _ = struct.unpack_from("<IIQQQQQQ", table, i * 56)
        if ptype == 1:
            out.append((va, off, fs, ms))
    return out


def _in(loads, start: int, end: int) -> list[tuple[int, int, int]]:
    """(vaddr, filesz, memsz) of the loads covering [start, end)."""
    return [(va, fs, ms) for va, _, fs, ms in loads if start <= va < end]


@pytest.fixture
def migrated_child(store, tmp_path):
    """A child with the two file mappings, migrated into ``store`` by the
    real engine; yields (image_id, file path, marker, ro start, rw start)."""
    marker = os.urandom(5).hex()
    path = str(tmp_path / "mapped.bin")
    child = subprocess.Popen([sys.executable, "-c", CHILD, path, marker],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        mine = [m for m in read_layout(child.pid) if m.path == path]
        ro = next(m for m in mine if m.offset == 2 * P and m.perms.startswith("r--"))
        rw = next(m for m in mine if m.offset == P and m.perms.startswith("rw"))
        out = migrate(child.pid, store, SendOptions(then="resume"))
        assert out.source["status"] == "completed", out.source.get("error")
        image_id = out.source["image_id"]
    finally:
        child.stdin.close()
        reap(child)
    yield image_id, path, marker, ro.start, rw.start


@pytest.mark.skipif(not GDB, reason="needs gdb")
def test_untouched_file_pages_of_a_real_migration(store, tmp_path, migrated_child):
    image_id, path, marker, ro, rw = migrated_child
    m = store.show(image_id)
    by_start = {int(mp["start"], 16): mp for mp in m["mappings"]}
    assert by_start[ro]["kind"] == "file" and by_start[ro]["data"] == []
    assert len(by_start[rw]["data"]) == 1        # only the written page went

    core = str(tmp_path / "core")
    info = export_image(store, image_id, core)
    out = _gdb(core, f"x/s {ro:#x}", f"x/s {ro + 2 * P:#x}", f"x/s {ro + 3 * P:#x}",
               f"x/s {rw:#x}", f"x/s {rw + P + 100:#x}", f"x/s {rw + 2 * P:#x}",
               f"x/2gx {ro + 3 * P + FILE_TAIL:#x}")
    for want in (f"FILEPAGE-2-{marker}", f"FILEPAGE-4-{marker}", f"TAIL-{marker}",
                 f"FILEPAGE-1-{marker}", f"COW-{marker}", f"FILEPAGE-3-{marker}"):
        assert want in out, (want, out)
    # Past the file's end the mapped page reads as zeros.
    assert re.search(rf"{ro + 3 * P + FILE_TAIL:#x}:\s+0x0+\s+0x0+", out), out
    assert info["unbacked_files"] == [] and info["file_bytes"] > 0
    # One load per mapping, all bytes present.
    loads = _loads(core)
    assert _in(loads, ro, ro + 4 * P) == [(ro, 4 * P, 4 * P)]
    assert _in(loads, rw, rw + 3 * P) == [(rw, 3 * P, 3 * P)]
    assert info["loads"] == sum(1 for mp in m["mappings"] if mp["migrates"])


@pytest.mark.skipif(not GDB, reason="needs gdb")
def test_file_gone_leaves_pages_to_nt_file(store, tmp_path, migrated_child):
    image_id, path, marker, ro, rw = migrated_child
    away = path + ".away"
    os.rename(path, away)
    core = str(tmp_path / "core")
    info = export_image(store, image_id, core)
    loads = _loads(core)
    # ro: nothing held, no file: one load with no bytes.
    assert _in(loads, ro, ro + 4 * P) == [(ro, 0, 4 * P)]
    # rw: [page 0: no bytes] [page 1: held | page 2: no bytes].
    assert _in(loads, rw, rw + 3 * P) == [(rw, 0, P), (rw + P, P, 2 * P)]
    assert f"COW-{marker}" in _gdb(core, f"x/s {rw + P + 100:#x}")
    assert info["unbacked_files"] == [path]
    assert info["unbacked_bytes"] == 4 * P + 2 * P
    # The file back where NT_FILE says: gdb reads the byte-less pages from it.
    os.rename(away, path)
    out = _gdb(core, f"x/s {ro:#x}", f"x/s {rw:#x}", f"x/s {rw + 2 * P:#x}",
               f"x/s {rw + P + 100:#x}")
    for want in (f"FILEPAGE-2-{marker}", f"FILEPAGE-1-{marker}",
                 f"FILEPAGE-3-{marker}", f"COW-{marker}"):
        assert want in out, (want, out)
    # file_pages=False leaves them to NT_FILE although the file is here.
    core2 = str(tmp_path / "core2")
    info2 = export_image(store, image_id, core2, file_pages=False)
    assert path in info2["unbacked_files"]
    assert _in(_loads(core2), rw, rw + 3 * P) == [(rw, 0, P), (rw + P, P, 2 * P)]


def test_held_and_zero_pages_win_over_the_file(store, tmp_path):
    """Pages the image holds (data or zero) are never replaced by the
    file's bytes; pages past the file's end get none."""
    path = str(tmp_path / "lib.so")
    with open(path, "wb") as f:
        f.write(b"".join(f"F{i}".encode().ljust(P, b"f") for i in range(6)))
    base = 0x30000000
    w = store.begin({"pid": 7}, 0)
    # 10 pages at file offset 1 page: pages 0..4 have file bytes (file
    # pages 1..5), 5..9 lie past the file's end.
    w.set_layout([mapping(base, 10, "file", "r--p", path, offset=P)])
    data = write_pattern(w, base + P, 1, seed=9)        # page 1: held data
    w.write_zeros(runs(base + 2 * P, 1))                # page 2: held zeros
    image_id, _ = w.commit()
    core = str(tmp_path / "core")
    info = export_image(store, image_id, core)
    loads = _loads(core)
    assert [(va, fs, ms) for va, _, fs, ms in loads] == [(base, 5 * P, 10 * P)]
    assert info["unbacked_bytes"] == 5 * P and info["file_bytes"] == 3 * P
    off = loads[0][1]
    with open(core, "rb") as f:
        f.seek(off)
        got = f.read(5 * P)
    assert got[:P] == b"F1".ljust(P, b"f")
    assert got[P:2 * P] == data
    assert got[2 * P:3 * P] == bytes(P)
    assert got[3 * P:5 * P] == b"F4".ljust(P, b"f") + b"F5".ljust(P, b"f")
    # A file modified after the migration began is named in the summary.
    assert info["changed_files"] == []
    later = os.stat(path).st_mtime + 3600
    os.utime(path, (later, later))
    info = export_image(store, image_id, str(tmp_path / "core2"))
    assert info["changed_files"] == [path]


def test_a_file_not_every_user_may_read_is_not_copied(store, tmp_path, migrated_child):
    # The paths come from the source node and the exporter is usually
    # root: a peer naming a private file (/etc/shadow) as a mapping must
    # not get its bytes into the core.
    image_id, path, marker, ro, rw = migrated_child
    os.chmod(path, 0o640)
    core = str(tmp_path / "core")
    info = export_image(store, image_id, core)
    assert info["unbacked_files"] == [path]
    assert _in(_loads(core), ro, ro + 4 * P) == [(ro, 0, 4 * P)]   # no bytes from it
