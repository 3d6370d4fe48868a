"""ELF core export of an image built from a real child's memory, read back
with readelf and gdb."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from migrated.errors import ImageError
from migrated.kernel.maps import read_layout
from migrated.runs import PAGE_SIZE, PageRuns

from tests.target import Target

GDB = shutil.which("gdb")
READELF = shutil.which("readelf")

# Mappings larger than this are left out of the test image (they would only
# slow the test down; python's own mappings are far smaller).
MAX_TEST_MAPPING = 64 << 20


def snapshot(store, pid: int, meta: dict) -> tuple[str, list]:
    """Image of every readable migratable mapping of ``pid`` via
    /proc/PID/mem: zero pages recorded as zeros, others as data."""
    layout = read_layout(pid)
    w = store.begin(meta, 0)
    w.set_layout(layout)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    taken = []
    try:
        for m in layout:
            if not m.migrates or not m.readable or m.size > MAX_TEST_MAPPING:
                continue
            try:
                data = os.pread(fd, m.size, m.start)
            except OSError:
                continue
            if len(data) != m.size:
                continue
            nonzero = np.frombuffer(data, np.uint8).reshape(-1, PAGE_SIZE).any(axis=1)
            w.write_zeros(PageRuns.from_mask(m.start, ~nonzero))
            keep = PageRuns.from_mask(m.start, nonzero)
            pages = np.frombuffer(data, np.uint8).reshape(-1, PAGE_SIZE)[nonzero]
            w.write_pages(keep, pages.tobytes())
            taken.append(m)
    finally:
        os.close(fd)
    image_id, _ = w.commit({"timings": {"test": True}})
    return image_id, taken


def _gdb(core: str, *cmds: str) -> str:
    args = [GDB, "-nx", "-batch", "-c", core]
    for c in cmds:
        args += ["-ex", c]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


CHILD = r"""
import ctypes, sys
buf = ctypes.create_string_buffer(b"migrated says: %s", 256)
print(hex(ctypes.addressof(buf)), flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(not GDB or not READELF, reason="needs gdb and readelf")
def test_core_of_real_child_readable_by_gdb(store, tmp_path):
    marker = os.urandom(6).hex()
    child = subprocess.Popen([sys.executable, "-c", CHILD % marker],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        addr = int(child.stdout.readline(), 16)
        image_id, taken = snapshot(store, child.pid, {
            "pid": child.pid, "cmdline": [sys.executable, "-c", "child"],
            "exe": os.readlink(f"/proc/{child.pid}/exe")})
    finally:
        child.kill()
        child.wait(10)
        child.stdin.close()
        child.stdout.close()
    assert store.verify(image_id).ok
    core = str(tmp_path / "core")
    info = store.export_core(image_id, core)
    assert info["loads"] == sum(1 for m in store.show(image_id)["mappings"] if m["migrates"])

    out = _gdb(core, f"x/s {addr:#x}")
    assert f"migrated says: {marker}" in out, out

    hdr = subprocess.run([READELF, "-h", "-l", "-n", core], capture_output=True,
                         text=True, check=True).stdout
    assert "CORE (Core file)" in hdr
    loads = re.findall(r"^\s+LOAD\s+0x[0-9a-f]+\s+0x([0-9a-f]+)", hdr, re.M)
    assert len(loads) == info["loads"]
    assert {int(a, 16) for a in loads} >= {m.start for m in taken}
    assert "NT_FILE" in hdr and "NT_PRPSINFO" in hdr
    # gdb reads NT_FILE: the interpreter's file mappings are listed with
    # their offsets (readelf on some hosts cannot decode the 64-bit note).
    maps = _gdb(core, "info proc mappings")
    exe = os.path.realpath("/proc/self/exe")
    files = [m for m in taken if m.kind == "file" and m.path == exe]
    assert files and exe in maps, maps
    assert re.search(rf"{files[0].start:#x}\s+{files[0].end:#x}", maps), maps
    # The core is sparse-friendly: never more than the loads plus headers.
    assert os.path.getsize(core) == info["size"]

    with pytest.raises(ImageError, match="exists"):
        store.export_core(image_id, core)
    store.export_core(image_id, core, overwrite=True)


@pytest.mark.skipif(not GDB, reason="needs gdb")
def test_core_of_target_regions(store, tmp_path):
    """Private and shared anonymous regions, partly zero, via tests/target.py."""
    with Target() as t:
        a = t.map("priv", 40)
        s = t.map("shr", 8, "shared")
        t.write("priv", 0, 20, seed=3)      # pages 20..39 stay untouched
        t.write("shr", 0, 8, seed=4)
        image_id, _ = snapshot(store, t.pid, {"pid": t.pid, "cmdline": ["target"]})
        want_priv = t.expected("priv", 0, 20, 3)
        want_shr = t.expected("shr", 0, 8, 4)
    core = str(tmp_path / "core")
    store.export_core(image_id, core)
    assert store.read_memory(image_id, a, 20 * PAGE_SIZE) == want_priv
    assert store.read_memory(image_id, s, 8 * PAGE_SIZE) == want_shr
    page5 = a + 5 * PAGE_SIZE
    out = _gdb(core, f"x/2gx {page5:#x}", f"x/2gx {s + 7 * PAGE_SIZE:#x}",
               f"x/2gx {a + 30 * PAGE_SIZE:#x}")
    w5 = int.from_bytes(want_priv[5 * PAGE_SIZE + 8:5 * PAGE_SIZE + 16], "little")
    assert f"{page5:#018x}" in out and f"{w5:#018x}" in out, out
    ws = int.from_bytes(want_shr[7 * PAGE_SIZE:7 * PAGE_SIZE + 8], "little")
    assert f"{ws:#018x}" in out, out
    # An untouched page reads as zeros, not as an error.
    assert re.search(rf"{a + 30 * PAGE_SIZE:#x}:\s+0x0+\s+0x0+", out), out


@pytest.mark.skipif(not GDB, reason="needs gdb")
def test_a_deleted_file_mapped_privately_is_in_nt_file(store, tmp_path):
    """A deleted file mapped privately (a binary or library upgraded under
    the process) is migrated whole, as kind shared-anon; it is still a
    file-backed mapping, and the kernel's own cores name it in NT_FILE
    with its " (deleted)" suffix.  The export left it out (0 of 1: gdb's
    `info proc mappings` no longer showed an upgraded executable)."""
    path = tmp_path / "upgraded.so"
    path.write_bytes(b"\x5a" * (4 * PAGE_SIZE))
    with Target() as t:
        t.map_file("lib", str(path), 4)
        t.touch("lib", 0, 4)
        os.unlink(path)
        lo, hi = t.range("lib")
        image_id, taken = snapshot(store, t.pid, {"pid": t.pid, "cmdline": ["target"]})
    assert [m.kind for m in taken if m.start == lo] == ["shared-anon"]
    core = str(tmp_path / "core")
    store.export_core(image_id, core)
    maps = _gdb(core, "info proc mappings")
    assert re.search(rf"{lo:#x}\s+{hi:#x}\s+\S+\s+0x0\s+{re.escape(str(path))} \(deleted\)",
                     maps), maps
    assert f"{lo:#x}" in _gdb(core, f"x/xb {lo:#x}")
