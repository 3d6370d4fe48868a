"""Review findings on the image store's bounds and on its one promise
that matters most -- an image is complete and verified, or not visible:

* a write-back error a background flush hears of is never lost (Linux
  reports one once per open file description; the commit's fsync may not
  hear of it again), and the image is not published;
* zero and dropped runs cost the writer per chunk it holds, never per
  page named, and an image describes a bounded number of chunks;
* a queued layout never piles up behind slow writes."""

from __future__ import annotations

import errno
import os
import threading
import time
import tracemalloc

import numpy as np
import pytest

from migrated.errors import ImageError, QuotaExceeded
from migrated.image import ImageStore
from migrated.image import store as store_mod
from migrated.image.pipeline import PipelinedWriter
from migrated.runs import PAGE_SIZE, PageRuns

from .conftest import mapping, runs, write_pattern

META = {"pid": 1, "cmdline": ["x"], "exe": "/bin/x", "source_node": "a",
        "migration_id": "m-bounds"}
BASE = 0x7f0000000000
CHUNK = store_mod.CHUNK_PAGES * PAGE_SIZE
# One anonymous mapping over (nearly) the whole user address space, as a
# hostile source may declare.
HUGE = 1 << 44          # pages


def _partial_dirs(store: ImageStore) -> list[str]:
    return os.listdir(store.partial_dir)


# -- 1. background flush errors ------------------------------------------------

def _eio_in_flusher(monkeypatch) -> threading.Event:
    """The flusher's fdatasync fails with EIO (a lost write-back), once;
    every other fdatasync/fsync is the real one."""
    hit = threading.Event()
    real = os.fdatasync

    def fdatasync(fd):
        if threading.current_thread().name == "migrated-flush" and not hit.is_set():
            hit.set()
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return hit


def test_flush_error_fails_the_commit_and_nothing_is_published(store, monkeypatch):
    hit = _eio_in_flusher(monkeypatch)
    w = store.begin(META)
    w.set_layout([mapping(BASE, 1024)])
    write_pattern(w, BASE, 1024, 1)
    w.flush_async()
    assert hit.wait(10)
    time.sleep(0.1)           # the flusher handles the error
    with pytest.raises(ImageError, match="writing page data back to disk failed"):
        w.commit({})
    assert w.state == "failed"
    assert store.list() == []
    w.abort()
    assert _partial_dirs(store) == []


def test_flush_error_surfaces_at_the_next_checkpoint(store, monkeypatch):
    hit = _eio_in_flusher(monkeypatch)
    with store.begin(META) as w:
        w.set_layout([mapping(BASE, 1024)])
        write_pattern(w, BASE, 512, 1)
        w.flush_async()
        assert hit.wait(10)
        deadline = time.monotonic() + 10
        with pytest.raises(ImageError, match="m-bounds"):
            while time.monotonic() < deadline:   # until the flusher recorded it
                w.checkpoint()
                time.sleep(0.02)
    assert store.list() == [] and _partial_dirs(store) == []


def test_flusher_has_its_own_open_file_description(store):
    """A dup shares the description, and with it the record of which
    write-back errors were already reported: the flusher would consume
    the error the commit's fsync must see."""
    w = store.begin(META)
    try:
        w.set_layout([mapping(BASE, 16)])
        write_pattern(w, BASE, 16, 1)
        w.flush_async()
        fl = w._flusher
        os.lseek(w._fd, 12345, os.SEEK_SET)
        assert os.lseek(fl._fd, 0, os.SEEK_CUR) != 12345
        assert os.path.samestat(os.fstat(fl._fd), os.fstat(w._fd))
    finally:
        w.abort()


# -- 2. zero pages: bounded chunks, no per-page work ---------------------------

def _huge_layout(w) -> None:
    w.set_layout([mapping(PAGE_SIZE, (1 << 56) // PAGE_SIZE - 1)])


def _peak_during(fn) -> int:
    """Peak bytes traced (numpy's included) while ``fn`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_zeros_beyond_the_chunk_bound_are_refused_before_allocating(tmp_path):
    store = ImageStore(str(tmp_path / "state"), min_free_bytes=0, max_image_chunks=1024)
    w = store.begin(META)
    _huge_layout(w)
    write_pattern(w, 1 << 40, 1, 1)
    # 2^22 pages = 8192 chunks: one 32-byte run, no quota spent.
    with pytest.raises(QuotaExceeded, match=r"m-bounds.*8192 chunks.*more than the 1024"):
        w.write_zeros(PageRuns.from_pairs([(1 << 44, 1 << 22)]))
    assert w.state == "failed" and w.slots == 1
    w.abort()
    assert _partial_dirs(store) == []


def test_zeros_of_user_space_refused_at_once(store):
    w = store.begin(META)
    _huge_layout(w)
    t0 = time.monotonic()
    with pytest.raises(QuotaExceeded, match="more than the"):
        w.write_zeros(PageRuns.from_pairs([(PAGE_SIZE, (1 << 44) - 1)]))
    assert time.monotonic() - t0 < 1.0
    w.abort()


def test_many_one_page_zero_runs_count_their_chunks(tmp_path):
    store = ImageStore(str(tmp_path / "state"), min_free_bytes=0, max_image_chunks=4096)
    w = store.begin(META)
    _huge_layout(w)
    starts = (1 << 40) + np.arange(65536, dtype=np.uint64) * np.uint64(CHUNK)
    with pytest.raises(QuotaExceeded, match="65536 chunks"):
        w.write_zeros(PageRuns(starts, np.ones(65536, np.uint64), normalized=True))
    assert w.slots == 0
    w.abort()


def test_zeros_work_per_chunk_not_per_page(store):
    """A zeros message over chunks already held builds no per-page arrays:
    2^20 pages (2048 chunks) once more costs the masks of those chunks
    (~1 MiB), not one 8-byte entry per page (8 MiB each)."""
    w = store.begin(META)
    _huge_layout(w)
    zeros = PageRuns.from_pairs([(1 << 40, 1 << 20)])
    w.write_zeros(zeros)
    assert w.slots == 2048
    peak = _peak_during(lambda: w.write_zeros(zeros))
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB"
    w.abort()


def _pages_of(pairs) -> set[int]:
    out: set[int] = set()
    for a, n in pairs:
        out.update(range(int(a, 16) if isinstance(a, str) else a,
                         (int(a, 16) if isinstance(a, str) else a) + n * PAGE_SIZE,
                         PAGE_SIZE))
    return out


def test_zeros_drops_and_layout_changes_match_a_page_model(store):
    """Runs crossing chunk edges, many runs in one chunk, pages turning
    from data to zero and back, drops and a shrinking layout: the image
    says exactly what a page-by-page model says, and its data verifies."""
    rng = np.random.default_rng(7)
    npages = 8 * 512
    w = store.begin(META)
    w.set_layout([mapping(BASE, npages)])
    data: set[int] = set()
    zero: set[int] = set()

    def random_runs(k: int) -> PageRuns:
        firsts = np.sort(rng.choice(npages, k, replace=False))
        lens = rng.integers(1, 700, k)
        return PageRuns.from_pairs([(BASE + int(f) * PAGE_SIZE, int(min(n, npages - f)))
                                    for f, n in zip(firsts, lens)])
    for step in range(12):
        r = random_runs(6)
        pages = {int(a) for a in r.page_addresses()}
        if step % 3 == 0:
            for a, n in r.pairs():
                write_pattern(w, a, n, step)
            data |= pages
            zero -= pages
        elif step % 3 == 1:
            w.write_zeros(r)
            zero |= pages
            data -= pages
        else:
            w.drop(r)
            data -= pages
            zero -= pages
    keep = npages - 700
    w.set_layout([mapping(BASE, keep)])
    inside = set(range(BASE, BASE + keep * PAGE_SIZE, PAGE_SIZE))
    data &= inside
    zero &= inside
    image_id, _ = w.commit({})
    m = store.show(image_id)
    (mp,) = m["mappings"]
    assert _pages_of(mp["data"]) == data
    assert _pages_of(mp["zero"]) == zero
    assert store.verify(image_id).ok


# -- 3. dropped runs: per chunk held, never per page named ---------------------

def test_drop_of_a_huge_run_costs_per_chunk_held(store):
    w = store.begin(META)
    _huge_layout(w)
    a, b = (1 << 44) + 5 * PAGE_SIZE, (1 << 45)
    write_pattern(w, a, 3, 1)
    write_pattern(w, b, 2, 1)
    # 2^22 pages (16 GiB) over the first data: per page that was 32 MiB a
    # temporary; per chunk held it is a few entries.
    peak = _peak_during(lambda: w.drop(PageRuns.from_pairs([(1 << 44, 1 << 22)])))
    assert peak < 1 << 20, f"{peak / 2**20:.1f} MiB"
    image_id, _ = w.commit({})
    (mp,) = store.show(image_id)["mappings"]
    assert _pages_of(mp["data"]) == _pages_of([(b, 2)])
    assert store.verify(image_id).ok


def test_layout_shrinking_off_user_space_costs_per_chunk_held(store):
    w = store.begin(META)
    _huge_layout(w)
    write_pattern(w, 1 << 40, 4, 1)
    w.write_zeros(PageRuns.from_pairs([((1 << 40) + 4 * PAGE_SIZE, 4)]))
    peak = _peak_during(lambda: w.set_layout([mapping(1 << 40, 2)]))
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB"
    image_id, _ = w.commit({})
    (mp,) = store.show(image_id)["mappings"]
    assert _pages_of(mp["data"]) == _pages_of([(1 << 40, 2)])
    assert mp["zero"] == []


# -- 4. layouts are never queued ----------------------------------------------

class _SlowWriter:
    """Stands for an ImageWriter whose write is stuck on a slow disk."""

    image_id = "slow"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[tuple[str, str]] = []

    def write_zeros(self, runs) -> None:
        self.release.wait(10)
        self.calls.append(("write_zeros", threading.current_thread().name))

    def set_layout(self, mappings) -> None:
        n = sum(1 for _ in mappings)     # consumes the caller's iterable
        self.calls.append((f"set_layout {n}", threading.current_thread().name))

    def abort(self) -> None:
        pass


def test_a_layout_waits_for_queued_writes_instead_of_queueing_a_copy():
    inner = _SlowWriter()
    pw = PipelinedWriter(inner)
    try:
        pw.write_zeros(runs(BASE, 1))            # the worker is stuck in it
        done = threading.Event()

        def layout() -> None:
            pw.set_layout(mapping(BASE + i * 2 * PAGE_SIZE, 1) for i in range(1000))
            done.set()
        t = threading.Thread(target=layout, name="receiver")
        t.start()
        # Queued, it would return at once holding a list of the records.
        assert not done.wait(0.3), "set_layout returned with the layout queued"
        inner.release.set()
        assert done.wait(10)
        t.join()
        assert [c for c, _ in inner.calls] == ["write_zeros", "set_layout 1000"]
        assert inner.calls[1][1] == "receiver"   # applied in the caller's thread
        assert pw._q.qsize() == 0
    finally:
        inner.release.set()
        pw.close()
