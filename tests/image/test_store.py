"""ImageStore / ImageWriter: round trips across layout changes, partials,
verification, quota, disk full and hostile input."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from migrated.errors import ImageError, ImageNotFound, QuotaExceeded
from migrated.image import (DiskFull, ImageStore, LayoutViolation, IMAGE_ID_RE)
from migrated.image.manifest import CHUNK_BYTES, PAGES_NAME, MANIFEST_NAME
from migrated.runs import PAGE_SHIFT, PAGE_SIZE, PageRuns

from .conftest import MiB, mapping, runs, write_pattern
from tests.target import expected

P = PAGE_SIZE
M1 = 0x10000000                # 64 pages, shrinks then moves
M2 = 0x20000000                # 1024 pages (two chunks), grows to 1500
M3 = 0x30000000                # private file mapping, vanishes
M5 = 0x40000000 - 8 * P        # appears later, straddles a chunk boundary
M6 = 0x50000000                # where M1 moves to
SKIP = 0x60000000


def _pages(r) -> set[int]:
    return {int(a) for a in PageRuns.from_pairs(r).page_addresses()} if r else set()


def _build_three_rounds(store: ImageStore):
    """Three rounds with mappings appearing, vanishing, growing, shrinking and
    moving.  Returns (writer, model) with model = {page addr: bytes | 0}."""
    w = store.begin({"pid": 4242, "cmdline": ["app", "--x"], "exe": "/usr/bin/app",
                     "source_node": "src-a", "migration_id": "mig-1"}, 0)
    model: dict[int, bytes | int] = {}

    def put(start, n, seed):
        data = write_pattern(w, start, n, seed)
        for i in range(n):
            model[start + i * P] = data[i * P:(i + 1) * P]

    def zeros(start, n):
        w.write_zeros(runs(start, n))
        for i in range(n):
            model[start + i * P] = 0

    def forget(start, n):
        for i in range(n):
            model.pop(start + i * P, None)

    # round 0
    w.set_layout([mapping(M1, 64), mapping(M2, 1024),
                  mapping(M3, 4, "file", "r--p", "/usr/lib/libx.so", 0x2000),
                  mapping(SKIP, 16, "skip", "---p")])
    put(M1, 64, 1)
    put(M2, 700, 1)
    zeros(M2 + 700 * P, 100)
    put(M3, 4, 1)
    # round 1: M1 shrinks, M2 grows, M3 vanishes, M5 appears
    w.set_layout([mapping(M1, 32), mapping(M2, 1500), mapping(M5, 16),
                  mapping(SKIP, 16, "skip", "---p")])
    forget(M1 + 32 * P, 32)
    forget(M3, 4)
    put(M2 + 100 * P, 100, 2)
    put(M2 + 1000 * P, 500, 2)
    put(M5, 16, 3)
    w.drop(runs(M2 + 10 * P, 10))
    forget(M2 + 10 * P, 10)
    # round 2: M1 moves to M6; some data pages become zero pages
    w.set_layout([mapping(M2, 1500), mapping(M5, 16), mapping(M6, 32, perms="r--p"),
                  mapping(SKIP, 16, "skip", "---p")])
    forget(M1, 32)
    put(M6, 32, 4)
    zeros(M2 + 150 * P, 10)
    return w, model


def test_round_trip_with_layout_changes(store):
    w, model = _build_three_rounds(store)
    totals = w.totals()
    data_pages = sum(1 for v in model.values() if v != 0)
    zero_pages = sum(1 for v in model.values() if v == 0)
    assert totals["data_pages"] == data_pages
    assert totals["zero_pages"] == zero_pages
    # Dropped and zeroed pages had their blocks punched out.
    assert totals["allocated_bytes"] == data_pages * P

    image_id, digest = w.commit({"timings": {"total_ms": 12.5}})
    assert IMAGE_ID_RE.fullmatch(image_id)
    assert len(digest) == 32

    m = store.show(image_id)
    assert m["digest"] == digest
    assert m["meta"]["pid"] == 4242 and m["meta"]["timings"] == {"total_ms": 12.5}
    starts = [int(mp["start"], 16) for mp in m["mappings"]]
    assert starts == [M2, M5, M6, SKIP]
    got_data, got_zero = set(), set()
    for mp in m["mappings"]:
        if not mp["migrates"]:
            assert "data" not in mp
            continue
        got_data |= _pages([(int(a, 16), n) for a, n in mp["data"]])
        got_zero |= _pages([(int(a, 16), n) for a, n in mp["zero"]])
    assert got_data == {a for a, v in model.items() if v != 0}
    assert got_zero == {a for a, v in model.items() if v == 0}
    assert m["totals"]["data_pages"] == data_pages

    # Contents, page by page against the model, through read_memory.
    for base, n in [(M2, 1500), (M5, 16), (M6, 32)]:
        mem = store.read_memory(image_id, base, n * P)
        for i in range(n):
            v = model.get(base + i * P, 0)
            want = bytes(P) if v == 0 else v
            assert mem[i * P:(i + 1) * P] == want, f"page {base + i * P:#x}"
    # Unaligned read inside a page.
    assert store.read_memory(image_id, M5 + 3, 5) == model[M5][3:8]

    assert [r["image_id"] for r in store.list()] == [image_id]
    row = store.list()[0]
    assert row["pid"] == 4242 and row["data_pages"] == data_pages
    res = store.verify(image_id)
    assert res.ok and res.manifest_ok and res.bad_chunks == 0
    assert res.chunks_checked == len(m["chunks"]) and res.bytes_checked == data_pages * P
    assert not os.listdir(store.partial_dir)


def test_partial_never_listed_and_cleanup(store):
    w = store.begin({"pid": 1}, 0)
    w.set_layout([mapping(M1, 8)])
    write_pattern(w, M1, 8, 1)
    assert store.list() == []
    with pytest.raises(ImageNotFound):
        store.show(w.image_id)
    # Even a manifest inside a partial dir does not make it an image.
    with open(os.path.join(w.path, MANIFEST_NAME), "w") as f:
        f.write("{}")
    assert store.list() == []
    # A stray non-image name in images/ is ignored too.
    os.mkdir(os.path.join(store.images_dir, "not-an-id"))
    assert store.list() == []
    assert store.cleanup_partials() == 1
    assert os.listdir(store.partial_dir) == []
    # The writer's files are gone; abort stays safe and idempotent.
    w.abort()
    w.abort()


def test_abort_removes_partial_and_blocks_writes(store):
    w = store.begin({}, 0)
    w.set_layout([mapping(M1, 8)])
    write_pattern(w, M1, 8, 1)
    w.abort()
    assert not os.path.exists(w.path)
    with pytest.raises(ImageError, match="aborted"):
        write_pattern(w, M1, 1, 1)
    with pytest.raises(ImageError):
        w.commit()
    # Context manager aborts on error.
    with pytest.raises(RuntimeError):
        with store.begin({}, 0) as w2:
            raise RuntimeError("boom")
    assert not os.path.exists(w2.path)
    assert store.used_bytes() == 0


def _flip_bit(path: str, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def _committed(store, n_chunks_pages=1500):
    w = store.begin({"pid": 4242, "cmdline": ["app"]}, 0)
    w.set_layout([mapping(M2, n_chunks_pages)])
    write_pattern(w, M2, n_chunks_pages, 7)
    return w.commit()[0]


def test_verify_catches_one_flipped_bit_in_pages(store):
    image_id = _committed(store)
    m = store.show(image_id)
    assert len(m["chunks"]) == 3
    second = sorted(m["chunks"], key=lambda c: int(c["vaddr"], 16))[1]
    pages = os.path.join(store.images_dir, image_id, PAGES_NAME)
    _flip_bit(pages, second["slot"] * CHUNK_BYTES + 17 * P + 1234, bit=5)
    res = store.verify(image_id)
    assert not res.ok and res.manifest_ok
    assert res.bad_chunks == 1
    assert res.first_bad["vaddr"] == second["vaddr"]
    assert second["vaddr"] in res.error
    assert res.chunks_checked == 3     # every chunk was still checked


def test_verify_catches_flipped_bits_in_manifest(store):
    image_id = _committed(store, 600)
    man = os.path.join(store.images_dir, image_id, MANIFEST_NAME)
    original = open(man, "rb").read()
    # A flip that keeps the JSON valid: pid 4242 -> 4243.
    at = original.index(b'"pid": 4242') + len(b'"pid": 424')
    _flip_bit(man, at, 0)
    assert store.show(image_id)["meta"]["pid"] == 4243
    res = store.verify(image_id)
    assert not res.ok and not res.manifest_ok and "manifest digest" in res.error
    # Any single bit anywhere: never verifies.
    rng = random.Random(5)
    for _ in range(40):
        with open(man, "wb") as f:
            f.write(original)
        _flip_bit(man, rng.randrange(len(original)), rng.randrange(8))
        res = store.verify(image_id)
        assert not res.ok, res
    with open(man, "wb") as f:
        f.write(original)
    assert store.verify(image_id).ok


def test_quota_up_front_and_while_writing(tmp_path):
    store = ImageStore(str(tmp_path), quota_bytes=1 * MiB, min_free_bytes=0)
    with pytest.raises(QuotaExceeded, match="quota"):
        store.begin({}, 2 * MiB)
    assert os.listdir(store.partial_dir) == []

    w = store.begin({}, 0)
    w.set_layout([mapping(M2, 1024)])
    write_pattern(w, M2, 200, 1)
    write_pattern(w, M2, 200, 2)          # rewrites cost nothing more
    with pytest.raises(QuotaExceeded, match="quota"):
        write_pattern(w, M2 + 200 * P, 100, 1)
    with pytest.raises(ImageError):       # the writer is finished
        write_pattern(w, M2, 1, 1)
    w.abort()
    assert os.listdir(store.partial_dir) == []
    assert store.used_bytes() == 0

    # The store still serves; committed images count against the quota.
    w = store.begin({}, 0)
    w.set_layout([mapping(M2, 1024)])
    write_pattern(w, M2, 100, 1)
    image_id = w.commit()[0]
    assert store.verify(image_id).ok
    assert store.used_bytes() >= 100 * P
    with pytest.raises(QuotaExceeded):
        store.begin({}, 700 * 1024)
    # Reservations of open writers count too.
    w1 = store.begin({}, 350 * 1024)
    with pytest.raises(QuotaExceeded):
        store.begin({}, 350 * 1024)
    w1.abort()
    store.remove(image_id)
    assert store.used_bytes() == 0
    store.begin({}, 900 * 1024).abort()


def test_free_space_checked_before_any_data(tiny_tmpfs):
    store = ImageStore(tiny_tmpfs)            # default 64 MiB reserve
    with pytest.raises(DiskFull, match="free space"):
        store.begin({"pid": 1}, 0)
    store = ImageStore(tiny_tmpfs, min_free_bytes=0)
    with pytest.raises(DiskFull, match="free space"):
        store.begin({"pid": 1}, 8 * MiB)
    assert os.listdir(store.partial_dir) == []


def test_disk_full_is_clean(tiny_tmpfs):
    store = ImageStore(tiny_tmpfs, min_free_bytes=0)
    w = store.begin({"pid": 1}, 0)              # the source understated it
    w.set_layout([mapping(M2, 1024)])
    with pytest.raises(DiskFull, match="disk full") as ei:
        write_pattern(w, M2, 1024, 1)           # 4 MiB into 2 MiB
    assert isinstance(ei.value, QuotaExceeded)
    assert w.image_id in str(ei.value)
    w.abort()
    w.abort()
    assert os.listdir(store.partial_dir) == []
    assert store.list() == []
    # Still usable afterwards.
    w = store.begin({"pid": 2}, 0)
    w.set_layout([mapping(M2, 1024)])
    write_pattern(w, M2, 64, 3)
    image_id = w.commit()[0]
    assert store.verify(image_id).ok
    assert store.read_memory(image_id, M2, 64 * P) == expected(M2, 64, 3)


def test_nothing_from_the_network_becomes_a_path(store):
    w = store.begin({"image_id": "../../etc", "exe": "../../../etc/passwd",
                     "migration_id": "../x"}, 0)
    assert IMAGE_ID_RE.fullmatch(w.image_id)
    assert os.path.dirname(w.path) == store.partial_dir
    w.set_layout([mapping(M1, 1, "file", "r--p", "/../../etc/shadow")])
    write_pattern(w, M1, 1, 1)
    image_id = w.commit()[0]
    assert os.listdir(store.images_dir) == [image_id]
    for bad in ["../images", "..", "/etc", "", "x" * 300, "20250101-000000.000-abc",
                image_id + "/../" + image_id, None, 5]:
        with pytest.raises(ImageError, match="invalid image id"):
            store.show(bad)
        with pytest.raises(ImageError, match="invalid image id"):
            store.remove(bad)
    with pytest.raises(ImageNotFound):
        store.show("20250101-000000.000-0123456789")


def test_ids_are_unique_and_sortable(store):
    ids = []
    for _ in range(5):
        w = store.begin({}, 0)
        w.set_layout([])
        ids.append(w.commit()[0])
    assert len(set(ids)) == 5 and ids == sorted(ids)
    assert [r["image_id"] for r in store.list()] == ids


@pytest.mark.parametrize("bad", [
    [mapping(M1, 8), mapping(M1 + 4 * P, 8)],                     # overlap
    [{"start": M1 + 1, "end": M1 + P, "perms": "rw-p", "kind": "anon"}],
    [{"start": M1, "end": M1, "perms": "rw-p", "kind": "anon"}],
    [mapping(M1, 1, kind="evil")],
    [mapping(M1, 1, perms="rwxq")],
    [mapping(1 << 60, 1)],                                         # above user space
    [mapping(M1, 1, path="a\0b")],
    [mapping(M1, 1, path="x" * 5000)],
    [{"start": "zz", "end": M1, "perms": "rw-p", "kind": "anon"}],
    "not a list of mappings",
])
def test_hostile_layouts_rejected(store, bad):
    w = store.begin({}, 0)
    with pytest.raises(ImageError):
        w.set_layout(bad)
    w.abort()


def test_pages_outside_layout_rejected(store):
    w = store.begin({}, 0)
    with pytest.raises(LayoutViolation, match="before any memory layout"):
        write_pattern(w, M1, 1, 1)
    w.set_layout([mapping(M1, 8), mapping(M2, 8, "shared-file", "rw-s", "/data")])
    with pytest.raises(LayoutViolation, match="outside"):
        write_pattern(w, M1 + 4 * P, 8, 1)        # runs past the end
    with pytest.raises(LayoutViolation):
        write_pattern(w, M2, 1, 1)                 # not a migratable mapping
    with pytest.raises(LayoutViolation):
        w.write_zeros(runs(M2, 1))
    with pytest.raises(ImageError, match="bytes of page data"):
        w.write_pages(runs(M1, 2), bytes(P))
    write_pattern(w, M1, 8, 1)                     # still fine afterwards
    assert w.commit()[0]


def test_bad_meta_rejected(store):
    for meta in [{"pid": "1"}, {"cmdline": "a b"}, {"x": float("nan")},
                 {"x": object()}, {"blob": "x" * (256 * 1024)}, [1, 2]]:   # MAX_META_BYTES
        with pytest.raises(ImageError):
            store.begin(meta, 0)
    with pytest.raises(ImageError):
        store.begin({}, -1)
    assert os.listdir(store.partial_dir) == []


def test_remove(store):
    image_id = _committed(store, 16)
    store.remove(image_id)
    assert store.list() == []
    assert os.listdir(store.images_dir) == [] and os.listdir(store.partial_dir) == []
    with pytest.raises(ImageNotFound):
        store.remove(image_id)


def test_chunk_crossing_runs_and_many_small_runs(store):
    # Every other page across three chunks, plus one run crossing chunks.
    base = M2
    w = store.begin({}, 0)
    w.set_layout([mapping(base, 2048)])
    mask = np.zeros(2048, bool)
    mask[::2] = True
    r = PageRuns.from_mask(base, mask)
    data = b"".join(expected(int(a), 1, 9) for a in r.page_addresses())
    w.write_pages(r, data)
    write_pattern(w, base + 510 * P, 5, 8)     # crosses chunk 0 -> 1
    image_id = w.commit()[0]
    assert store.verify(image_id).ok
    mem = store.read_memory(image_id, base, 2048 * P)
    for i in (0, 2, 4, 600, 2046):
        assert mem[i * P:(i + 1) * P] == expected(base + i * P, 1, 9)
    for i in (1, 3, 601, 2047):
        assert mem[i * P:(i + 1) * P] == bytes(P)
    for i in range(510, 515):
        assert mem[i * P:(i + 1) * P] == expected(base + i * P, 1, 8)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_batches_land_where_a_model_says(store, seed):
    """Batches of scattered runs, many crossing chunk boundaries, written to
    chunks in random order (so slots are not adjacent in the file), some
    with more stretches than the writer updates by slices, then rewritten,
    zeroed and dropped in part: memory read back equals a page model, and
    the blocks the writer accounts for are the pages that hold data."""
    rng = random.Random(seed)
    npages = 6 * 512
    base = M2
    w = store.begin({}, 0)
    w.set_layout([mapping(base, npages)])
    model: dict[int, bytes | int] = {}
    for rnd in range(12):
        mask = np.zeros(npages, bool)
        for _ in range(rng.choice([1, 3, 40])):
            a = rng.randrange(npages)
            mask[a:a + rng.randrange(1, 700)] = True
        r = PageRuns.from_mask(base, mask)
        if rnd % 4 == 3:
            w.write_zeros(r)
            for a in r.page_addresses().tolist():
                model[a] = 0
            continue
        data = b"".join(expected(int(a), 1, rnd) for a in r.page_addresses())
        w.write_pages(r, data)
        for i, a in enumerate(r.page_addresses().tolist()):
            model[a] = data[i * P:(i + 1) * P]
    gone = PageRuns.from_range(base + 1000 * P, base + 1100 * P)
    w.drop(gone)
    for a in gone.page_addresses().tolist():
        model.pop(a, None)
    data_pages = sum(1 for v in model.values() if v != 0)
    assert w.totals()["data_pages"] == data_pages
    image_id = w.commit()[0]
    assert store.verify(image_id).ok
    mem = store.read_memory(image_id, base, npages * P)
    for i in range(npages):
        want = model.get(base + i * P, 0)
        assert mem[i * P:(i + 1) * P] == (bytes(P) if want == 0 else want), f"page {i}"


def test_manifest_is_plain_json_and_sealed(store):
    image_id = _committed(store, 8)
    with open(os.path.join(store.images_dir, image_id, MANIFEST_NAME)) as f:
        m = json.load(f)
    assert m["format"] == "migrated-image" and m["version"] == 1
    assert m["image_id"] == image_id and m["page_size"] == P
    assert m["chunks"][0]["pages"] == 8


def test_commit_failing_after_rename_leaves_no_image(store, monkeypatch):
    import errno
    from migrated.image import store as store_mod
    real = store_mod._fsync_dir

    def failing(path):
        if path == store.images_dir:
            raise OSError(errno.EIO, "injected I/O error", path)
        real(path)

    w = store.begin({}, 0)
    w.set_layout([mapping(M1, 4)])
    write_pattern(w, M1, 4, 1)
    monkeypatch.setattr(store_mod, "_fsync_dir", failing)
    with pytest.raises(ImageError, match="committing failed"):
        w.commit()
    monkeypatch.setattr(store_mod, "_fsync_dir", real)
    w.abort()
    assert store.list() == [] and os.listdir(store.images_dir) == []
    assert os.listdir(store.partial_dir) == []
    assert store.used_bytes() == 0


def test_one_run_is_placed_like_many(store):
    """A batch of one run is placed by a short path (Python ints per chunk):
    it must give the same stretches and slots as the general path, also
    where chunks got their slots out of address order (so a run's chunks
    are not neighbours in the file) and where a run starts or ends inside
    a chunk."""
    from migrated.image.manifest import CHUNK_PAGES
    w = store.begin({"pid": 1}, 0)
    base = 0x7f0000000000
    w.set_layout([mapping(base, 64 * CHUNK_PAGES)])
    # Slots out of order: chunk 9 first, then 3, then the rest as they come.
    write_pattern(w, base + 9 * CHUNK_BYTES, 1, 1)
    write_pattern(w, base + 3 * CHUNK_BYTES + 5 * P, 2, 1)
    rng = random.Random(7)
    for _ in range(300):
        first = rng.randrange(0, 60 * CHUNK_PAGES)
        count = rng.choice([1, 7, CHUNK_PAGES - 1, CHUNK_PAGES, 1024, rng.randrange(1, 1500)])
        r = runs(base + first * P, count)
        pn = (base >> PAGE_SHIFT) + first
        if rng.random() < 0.5:          # either may meet the new chunks first
            fast, slow = w._segments_of_run(pn, count), w._segments_of_runs(r)
        else:
            slow, fast = w._segments_of_runs(r), w._segments_of_run(pn, count)
        for a, b in zip(fast, slow):
            assert a.dtype == b.dtype and a.tolist() == b.tolist(), (first, count, fast, slow)
    w.abort()
