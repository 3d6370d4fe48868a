"""Page data goes into blocks allocated for it before the write (one
fallocate per stretch), not through the filesystem's delayed allocation --
read back with FIEMAP before anything is flushed."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

import pytest

from migrated.image.manifest import PAGES_NAME
from migrated.runs import PAGE_SIZE

from .conftest import mapping, write_pattern

FS_IOC_FIEMAP = 0xC020660B
EXTENT_DELALLOC = 0x4
EXTENT_UNWRITTEN = 0x800
_HEAD = struct.Struct("=QQIIII")
_EXTENT = struct.Struct("=QQQQQIIII")


def _extents(path: str, max_extents: int = 64) -> list[tuple[int, int, int]]:
    """(logical offset, length, flags) of the file's extents, unflushed."""
    buf = bytearray(_HEAD.pack(0, 2**64 - 1, 0, 0, max_extents, 0) + bytes(_EXTENT.size * max_extents))
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            pytest.skip(f"no FIEMAP on this filesystem: {exc}")
        raise
    finally:
        os.close(fd)
    mapped = _HEAD.unpack_from(buf)[3]
    out = []
    for i in range(mapped):
        fe = _EXTENT.unpack_from(buf, _HEAD.size + i * _EXTENT.size)
        out.append((fe[0], fe[2], fe[5]))
    return out


def test_page_data_is_written_into_allocated_blocks(store):
    base, n = 0x10000000, 256
    w = store.begin({"pid": 7}, n * PAGE_SIZE)
    w.set_layout([mapping(base, n)])
    write_pattern(w, base, n, 1)
    extents = _extents(os.path.join(w.path, PAGES_NAME))
    assert extents, "the page data has no blocks at all"
    assert sum(length for _, length, _ in extents) >= n * PAGE_SIZE
    assert not [e for e in extents if e[2] & EXTENT_DELALLOC], \
        f"delayed allocation: {[(hex(a), b, hex(f)) for a, b, f in extents]}"
    w.abort()


def test_a_filesystem_without_fallocate_still_stores(store, monkeypatch):
    from migrated.image import store as store_mod

    def refuse(fd, stretches):
        return False                     # what _allocate answers on EOPNOTSUPP
    monkeypatch.setattr(store_mod, "_allocate", refuse)
    base, n = 0x10000000, 64
    w = store.begin({"pid": 7}, n * PAGE_SIZE)
    w.set_layout([mapping(base, n)])
    data = write_pattern(w, base, n, 3)
    assert not w._can_allocate
    image_id, _ = w.commit()
    assert store.read_memory(image_id, base, n * PAGE_SIZE) == data
