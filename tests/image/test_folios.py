"""Page data lands in page-cache folios no larger than STORE_WRITE_BYTES.

Why it matters (store.py, STORE_WRITE_BYTES): a buffered write gets
folios as large as its length allows, and on a VM whose host takes back
the memory its guest frees, large folios come from exactly that memory
-- several times dearer to write into.  Read from the kernel itself:
each page's frame from /proc/self/pagemap, its compound-page flags from
/proc/kpageflags (root only).  On a kernel that never makes large folios
for the file system under the test's directory, this passes trivially;
on ours (6.18, ext4) whole 4 MiB batches made 2 MiB folios.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from migrated.image.manifest import PAGES_NAME
from migrated.image.store import STORE_WRITE_BYTES
from migrated.runs import PAGE_SIZE

from .conftest import mapping, write_pattern

KPF_COMPOUND_TAIL = 1 << 16
PFN_MASK = (1 << 55) - 1


def _largest_folio(path: str, nbytes: int) -> int:
    """Bytes of the largest folio holding the first ``nbytes`` of ``path``
    in the page cache (0: frames not visible to us)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        ino = os.stat(path).st_ino
        lo = None
        with open("/proc/self/maps") as f:
            for line in f:
                field = line.split()
                if len(field) >= 6 and int(field[4]) == ino and field[5] == path:
                    lo = int(field[0].split("-")[0], 16)
        assert lo is not None, "the mapping of the page file is not in /proc/self/maps"
        for off in range(0, nbytes, PAGE_SIZE):
            m[off]                                   # fault every page in
        with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
            pm.seek((lo // PAGE_SIZE) * 8)
            entries = struct.unpack(f"{nbytes // PAGE_SIZE}Q", pm.read(nbytes // PAGE_SIZE * 8))
            largest = run = 0
            for e in entries:
                pfn = e & PFN_MASK
                if not pfn:
                    return 0
                kf.seek(pfn * 8)
                (flags,) = struct.unpack("Q", kf.read(8))
                run = run + 1 if flags & KPF_COMPOUND_TAIL else 1
                largest = max(largest, run)
        return largest * PAGE_SIZE
    finally:
        m.close()


def test_a_whole_batch_is_stored_in_small_folios(store):
    if not os.access("/proc/kpageflags", os.R_OK):
        pytest.skip("/proc/kpageflags is readable by root only")
    base = 0x40000000                          # 2 MiB aligned: whole chunks
    w = store.begin({}, 0)
    try:
        w.set_layout([mapping(base, 1024)])
        write_pattern(w, base, 1024, 7)       # one 4 MiB batch, one write_pages
        largest = _largest_folio(os.path.join(w.path, PAGES_NAME), 1024 * PAGE_SIZE)
        if largest == 0:
            pytest.skip("page frame numbers are hidden from this process")
        assert largest <= STORE_WRITE_BYTES
    finally:
        w.abort()
