"""The buffers chunk digests are read into: one small pool shared by every
thread that digests, with warm buffers reserved off the freeze so that a
commit's short-lived digest threads never fault a fresh one in."""

from __future__ import annotations

import os
import threading

import numpy as np

from migrated.image import manifest as mf
from migrated.image import store as store_mod
from migrated.runs import PAGE_SIZE, PageRuns

P = PAGE_SIZE


def test_digest_buffers_are_shared_between_threads(tmp_path):
    """A thread that starts digesting gets a buffer another thread warmed:
    the commit's short-lived helpers must not fault in fresh 2 MiB buffers
    inside the freeze."""
    path = tmp_path / "pages"
    path.write_bytes(np.arange(mf.CHUNK_BYTES // 8, dtype=np.uint64).tobytes())
    fd = os.open(path, os.O_RDONLY)
    mask = np.ones(mf.CHUNK_PAGES, bool)
    pool = store_mod._CHUNK_BUFFERS
    digests = []
    try:
        store_mod._chunk_digest(fd, 0, mask)          # one buffer warmed, and kept
        made = pool.made
        for _ in range(3):
            t = threading.Thread(target=lambda: digests.append(store_mod._chunk_digest(fd, 0, mask)))
            t.start()
            t.join()
    finally:
        os.close(fd)
    assert len(set(digests)) == 1
    assert pool.made == made, "a thread made a buffer of its own"


def _present_pages(buf) -> int:
    """Pages of ``buf`` mapped in this process (/proc/self/pagemap bit 63)."""
    addr = np.frombuffer(buf, np.uint8).ctypes.data
    n = len(buf) // P
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // P * 8)
        entries = np.frombuffer(f.read(n * 8), np.uint64)
    return int(np.count_nonzero(entries >> np.uint64(63)))


def test_reserved_digest_buffers_are_distinct_and_faulted_in(monkeypatch):
    pool = store_mod._ChunkBuffers(keep=4)
    monkeypatch.setattr(store_mod, "_CHUNK_BUFFERS", pool)
    pool.reserve(3)
    assert pool.made == 3
    bufs = [pool.take() for _ in range(3)]
    assert len({np.frombuffer(b, np.uint8).ctypes.data for b in bufs}) == 3
    assert [_present_pages(b) for b in bufs] == [mf.CHUNK_PAGES] * 3
    for b in bufs:
        pool.give_back(b)
    pool.reserve(2)                  # enough idle already
    assert pool.made == 3


def test_a_commit_after_checkpoints_makes_no_digest_buffer(tmp_path, monkeypatch):
    """The checkpoint thread reserves warm buffers for every digest thread
    of the commit: none is made (and faulted in) inside the freeze."""
    from migrated.image import ImageStore
    from tests.target import expected
    monkeypatch.setattr(store_mod, "_CHUNK_BUFFERS", store_mod._ChunkBuffers(keep=4))
    store = ImageStore(str(tmp_path / "state"), min_free_bytes=0)
    base, n = 0x10000000, 8 * mf.CHUNK_PAGES
    w = store.begin({"pid": 7}, 0)
    w.set_layout([{"start": base, "end": base + n * P, "perms": "rw-p", "kind": "anon"}])
    w.write_pages(PageRuns.from_range(base, base + n * P), expected(base, n, 1))
    w.checkpoint()
    assert w.wait_checkpoints(30)
    for c in range(0, n, mf.CHUNK_PAGES):          # one page of every chunk changes
        at = base + (c + 3) * P
        w.write_pages(PageRuns.from_range(at, at + P), expected(at, 1, 2))
    made = store_mod._CHUNK_BUFFERS.made
    image_id, _ = w.commit()
    assert w.commit_stats["chunks_digested"] == 8
    assert store_mod._CHUNK_BUFFERS.made == made
    assert store.verify(image_id).ok
