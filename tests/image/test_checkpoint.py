"""ImageWriter.checkpoint(): background chunk digests and flushes between
rounds, so commit only digests what changed since.  Whatever the
interleaving of checkpoints and writes, a committed image must verify and
hold exactly the last bytes written."""

from __future__ import annotations

import json
import os
import random
import threading

import numpy as np

from migrated.image.manifest import CHUNK_PAGES, MANIFEST_NAME
from migrated.runs import PAGE_SIZE, PageRuns

from tests.target import expected

from .conftest import mapping, runs, write_pattern

P = PAGE_SIZE
BASE = 0x10000000
NPAGES = 4 * CHUNK_PAGES          # four chunks


def _writer(store):
    w = store.begin({"pid": 7}, 0)
    w.set_layout([mapping(BASE, NPAGES)])
    return w


def _chunk_of(page: int) -> int:
    return page // CHUNK_PAGES


def _check_image(store, image_id: str, model: dict[int, bytes]) -> None:
    res = store.verify(image_id)
    assert res.ok, res.error
    mem = store.read_memory(image_id, BASE, NPAGES * P)
    for page in range(NPAGES):
        want = model.get(page, bytes(P))
        assert mem[page * P:(page + 1) * P] == want, f"page {page}"


def test_commit_after_a_settled_checkpoint_digests_nothing(store):
    w = _writer(store)
    write_pattern(w, BASE, NPAGES, 1)
    w.checkpoint()
    assert w.wait_checkpoints(30)
    image_id, _ = w.commit()
    st = w.commit_stats
    assert st["chunks"] == 4 and st["chunks_digested"] == 0
    assert st["checkpoints"] == 1 and st["checkpoint_chunks"] == 4
    assert store.verify(image_id).ok


def test_chunk_digests_equal_those_of_a_plain_commit(store):
    def build(with_checkpoints: bool) -> list[dict]:
        w = _writer(store)
        write_pattern(w, BASE, NPAGES, 1)
        if with_checkpoints:
            w.checkpoint()
            w.wait_checkpoints(30)
        write_pattern(w, BASE + 100 * P, 50, 2)        # chunk 0 changes
        w.drop(runs(BASE + 3 * CHUNK_PAGES * P, 10))   # chunk 3 loses pages
        w.write_zeros(runs(BASE + 2 * CHUNK_PAGES * P + 7 * P, 3))   # and chunk 2
        image_id, _ = w.commit()
        if with_checkpoints:
            # Only the three changed chunks were read again.
            assert w.commit_stats["chunks_digested"] == 3
        with open(os.path.join(store.images_dir, image_id, MANIFEST_NAME)) as f:
            return json.load(f)["chunks"]

    assert build(True) == build(False)


def test_changes_after_the_snapshot_are_never_trusted(store):
    # Checkpoints queued while writes keep coming, never waited for: the
    # worker may digest a chunk while it is being rewritten.  Commit must
    # notice every chunk changed after its snapshot.
    rng = random.Random(11)
    for trial in range(4):
        w = _writer(store)
        model: dict[int, bytes] = {}
        for step in range(40):
            first = rng.randrange(NPAGES)
            n = rng.randint(1, min(300, NPAGES - first))
            kind = rng.random()
            if kind < 0.7:
                data = write_pattern(w, BASE + first * P, n, trial * 100 + step)
                for i in range(n):
                    model[first + i] = data[i * P:(i + 1) * P]
            elif kind < 0.85:
                w.drop(runs(BASE + first * P, n))
                for i in range(n):
                    model.pop(first + i, None)
            else:
                w.write_zeros(runs(BASE + first * P, n))
                for i in range(n):
                    model.pop(first + i, None)
            if rng.random() < 0.4:
                w.checkpoint(settled_only=rng.random() < 0.5)
        image_id, _ = w.commit()
        _check_image(store, image_id, model)


def test_settled_only_leaves_the_chunks_of_the_last_write(store):
    w = _writer(store)
    write_pattern(w, BASE, 2 * CHUNK_PAGES, 1)                 # chunks 0, 1
    write_pattern(w, BASE + 2 * CHUNK_PAGES * P + 5 * P, 10, 2)   # chunk 2
    w.checkpoint(settled_only=True)
    assert w.wait_checkpoints(30)
    w.commit()
    st = w.commit_stats
    assert st["checkpoint_chunks"] == 2 and st["chunks_digested"] == 1


def test_layout_change_after_a_checkpoint_is_seen(store):
    w = _writer(store)
    data = write_pattern(w, BASE, NPAGES, 1)
    w.checkpoint()
    assert w.wait_checkpoints(30)
    # The mapping shrinks to its first 700 pages: chunk 1 loses its tail,
    # chunks 2 and 3 vanish.
    w.set_layout([mapping(BASE, 700)])
    image_id, _ = w.commit()
    assert w.commit_stats["chunks"] == 2 and w.commit_stats["chunks_digested"] == 1
    res = store.verify(image_id)
    assert res.ok, res.error
    assert store.read_memory(image_id, BASE, 700 * P) == data[:700 * P]


def test_abort_with_checkpoints_running_leaves_nothing(store):
    before = set(os.listdir("/proc/self/fd"))
    w = _writer(store)
    for seed in range(4):
        write_pattern(w, BASE, NPAGES, seed)
        w.checkpoint()
    w.abort()
    assert os.listdir(store.partial_dir) == []
    # The helper threads end and close their descriptors on their own.
    for t in threading.enumerate():
        if t.name in ("migrated-checkpoint", "migrated-flush"):
            t.join(10)
            assert not t.is_alive()
    assert set(os.listdir("/proc/self/fd")) <= before | {str(i) for i in range(3)}


def test_flush_async_then_commit(store):
    w = _writer(store)
    model = {}
    for k in range(4):
        data = write_pattern(w, BASE + k * CHUNK_PAGES * P, CHUNK_PAGES, k + 1)
        for i in range(CHUNK_PAGES):
            model[k * CHUNK_PAGES + i] = data[i * P:(i + 1) * P]
        w.flush_async()
    image_id, _ = w.commit()
    _check_image(store, image_id, model)


def test_sparse_chunks_digest_like_their_concatenation(store):
    # Every third page of a chunk: the streaming digest over runs must
    # equal verify's view of the same pages.
    w = _writer(store)
    pages = np.arange(0, CHUNK_PAGES, 3)
    r = PageRuns(BASE + pages.astype(np.uint64) * np.uint64(P),
                 np.ones(pages.size, np.uint64))
    w.write_pages(r, os.urandom(pages.size * P))
    w.checkpoint()
    assert w.wait_checkpoints(30)
    image_id, _ = w.commit()
    assert w.commit_stats["chunks_digested"] == 0
    assert store.verify(image_id).ok


def test_manifest_file_is_json_with_one_record_per_line(store):
    w = _writer(store)
    write_pattern(w, BASE, NPAGES, 1)
    image_id, _ = w.commit()
    with open(os.path.join(store.images_dir, image_id, MANIFEST_NAME), "rb") as f:
        blob = f.read()
    m = json.loads(blob)
    assert list(m) == sorted(m)
    lines = blob.decode().splitlines()
    chunk_lines = [ln for ln in lines if ln.startswith('  {"digest"')]
    assert len(chunk_lines) == len(m["chunks"]) == 4
    assert store.show(image_id)["digest"] == m["digest"]


def test_a_digest_from_an_older_checkpoint_is_not_trusted(store, monkeypatch):
    # Chunk 2 is digested by checkpoint 1, rewritten, snapshotted again by
    # checkpoint 2 -- which commit cancels before it reaches chunk 2.  The
    # digest left from checkpoint 1 no longer describes the chunk: commit
    # must digest it again (a stale one would fail verification).
    import time

    from migrated.image import store as store_mod
    real = store_mod._chunk_digest
    armed = threading.Event()

    def slow_in_worker(fd, slot, mask):
        if armed.is_set() and threading.current_thread().name == "migrated-checkpoint":
            armed.clear()
            time.sleep(0.5)          # commit starts meanwhile and cancels the rest
        return real(fd, slot, mask)

    monkeypatch.setattr(store_mod, "_chunk_digest", slow_in_worker)
    w = _writer(store)
    write_pattern(w, BASE, NPAGES, 1)
    w.checkpoint()
    assert w.wait_checkpoints(30)
    model = {}
    for chunk in (0, 2):
        start = chunk * CHUNK_PAGES
        data = write_pattern(w, BASE + start * P, CHUNK_PAGES, 5)
        model.update({start + i: data[i * P:(i + 1) * P] for i in range(CHUNK_PAGES)})
    armed.set()
    w.checkpoint()                    # job 2: chunks 0 and 2, in that order
    time.sleep(0.1)                   # the worker is inside chunk 0 now
    image_id, _ = w.commit()
    assert w.commit_stats["chunks_digested"] >= 1
    data1 = expected(BASE, NPAGES, 1)
    for page in range(NPAGES):
        model.setdefault(page, data1[page * P:(page + 1) * P])
    _check_image(store, image_id, model)
