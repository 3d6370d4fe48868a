"""`verify` checks every rule protocol/IMAGE.md states, not only digests.

The image digest is unkeyed: whoever rewrites a manifest can seal it
again.  Each case here rewrites a real image's manifest (or its directory)
into something IMAGE.md rules out, re-seals it so the digest matches, and
expects verify to fail with a message naming the violation."""

from __future__ import annotations

import copy
import json
import os

import pytest

from migrated.errors import ImageError
from migrated.image import manifest as mf
from migrated.image.manifest import CHUNK_BYTES
from migrated.runs import PAGE_SIZE

from .conftest import mapping, runs, write_pattern
from tests.target import expected

P = PAGE_SIZE
A = 0x7F0000000000          # anon, 1500 pages: three chunks
F = 0x7F1000000000          # private file mapping, 16 pages


@pytest.fixture
def image(store):
    w = store.begin({"pid": 4242, "cmdline": ["app", "--x"], "exe": "/usr/bin/app"}, 0)
    w.set_layout([mapping(A, 1500), mapping(F, 16, "file", "r--p", "/usr/lib/libfoo.so",
                                             0x3000)])
    write_pattern(w, A, 1200, 1)
    w.write_zeros(runs(A + 1200 * P, 100))
    write_pattern(w, F + 2 * P, 3, 2)
    image_id, _ = w.commit({"timings": {"t": 1.5}})
    path = os.path.join(store.images_dir, image_id)
    with open(os.path.join(path, mf.MANIFEST_NAME), "rb") as f:
        original = json.loads(f.read())
    return store, image_id, path, original


def _reseal(path: str, m: dict) -> None:
    m = dict(m)
    m.pop("digest", None)
    _, blob = mf.seal_manifest(m)
    with open(os.path.join(path, mf.MANIFEST_NAME), "wb") as f:
        f.write(blob)


def _drop_chunk(m):
    m["chunks"] = m["chunks"][1:]


def _extra_chunk(m):
    m["chunks"].append({"vaddr": f"{A + 64 * CHUNK_BYTES:#x}", "slot": 9, "pages": 1,
                        "digest": "0" * 32})


def _not_migrating(m):
    m["mappings"][0]["migrates"] = False


def _wrong_totals(m):
    m["totals"]["data_pages"] = 1
    m["totals"]["data_bytes"] = P


def _overlap(m):
    m["mappings"][1]["start"] = m["mappings"][0]["start"]


def _data_and_zero(m):
    m["mappings"][0]["zero"] = m["mappings"][0]["data"]


def _run_outside(m):
    m["mappings"][1]["data"] = [[f"{F + 14 * P:#x}", 3]]


def _runs_unsorted(m):
    m["mappings"][0]["data"] = [[f"{A + 600 * P:#x}", 600], [f"{A:#x}", 600]]


def _shared_slot(m):
    m["chunks"][1]["slot"] = m["chunks"][0]["slot"]


def _chunk_pages(m):
    m["chunks"][0]["pages"] -= 1


def _chunk_order(m):
    m["chunks"].reverse()


def _runs_on_skip(m):
    m["mappings"].append({**m["mappings"][1], "start": "0x7f2000000000",
                          "end": "0x7f2000001000", "kind": "skip", "migrates": False})


def _extra_key(m):
    m["note"] = "added later"


def _chunk_extra_key(m):
    m["chunks"][0]["note"] = 1


CASES = [
    (_drop_chunk, "has no chunk record"),
    (_extra_chunk, "holds no data pages"),
    (_not_migrating, "says migrates: false"),
    (_wrong_totals, "totals.data_pages is 1"),
    (_overlap, "overlap"),
    (_data_and_zero, "both as data and as zero"),
    (_run_outside, "lies outside its mapping"),
    (_runs_unsorted, "out of address order"),
    (_shared_slot, "share slot"),
    (_chunk_pages, "its data runs hold 512"),
    (_chunk_order, "out of address order"),
    (_runs_on_skip, "does not migrate but has data and zero runs"),
    (_extra_key, "keys IMAGE.md does not define"),
    (_chunk_extra_key, "has keys other than"),
]


@pytest.mark.parametrize("edit,expect", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_a_resealed_manifest_that_breaks_image_md_fails_verify(image, edit, expect):
    store, image_id, path, original = image
    assert store.verify(image_id).ok
    m = copy.deepcopy(original)
    edit(m)
    _reseal(path, m)
    res = store.verify(image_id)
    assert res.manifest_ok                       # the digest alone says nothing
    assert not res.ok
    assert expect in res.error, res.error
    assert any(expect in p for p in res.problems)


def test_a_typed_meta_key_of_the_wrong_type_fails_verify(image):
    store, image_id, path, original = image
    m = copy.deepcopy(original)
    m["meta"]["pid"] = "4242"
    _reseal(path, m)
    res = store.verify(image_id)
    assert not res.ok and "'pid' must be an integer" in res.error


def test_every_violation_is_reported_not_only_the_first(image):
    store, image_id, path, original = image
    m = copy.deepcopy(original)
    _drop_chunk(m)
    _not_migrating(m)
    _extra_key(m)
    _reseal(path, m)
    res = store.verify(image_id)
    text = res.error
    for expect in ("has no chunk record", "says migrates: false",
                   "keys IMAGE.md does not define", "totals.chunks"):
        assert expect in text, text


def test_an_extra_file_in_the_image_directory_fails_verify(image):
    store, image_id, path, _ = image
    with open(os.path.join(path, "stray"), "wb") as f:
        f.write(b"x")
    res = store.verify(image_id)
    assert not res.ok and "'stray'" in res.error and "does not list" in res.error


def test_a_symlinked_page_file_fails_verify(image, tmp_path):
    store, image_id, path, _ = image
    pages = os.path.join(path, mf.PAGES_NAME)
    os.rename(pages, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", pages)
    res = store.verify(image_id)
    assert not res.ok and "pages.img is not a regular file" in res.error


def test_garbage_appended_to_the_page_file_fails_verify(image):
    store, image_id, path, _ = image
    with open(os.path.join(path, mf.PAGES_NAME), "ab") as f:
        f.write(os.urandom(4 << 20))
    res = store.verify(image_id)
    assert not res.ok and "past the end of its last chunk slot" in res.error
    assert res.bad_chunks == 0                 # the chunks themselves are intact


def test_holes_past_the_last_slot_are_tolerated(image):
    # Images committed before the writer cut its page file may end in
    # slots that lost their data: punched holes, no bytes.
    store, image_id, path, original = image
    pages = os.path.join(path, mf.PAGES_NAME)
    end = (max(c["slot"] for c in original["chunks"]) + 1) * CHUNK_BYTES
    os.truncate(pages, end + 3 * CHUNK_BYTES)
    assert store.verify(image_id).ok


def test_commit_cuts_slots_that_lost_their_data(store):
    # Chunk slots 0..2 get data, then the mapping of slot 2 goes away: the
    # page file must not keep its bytes past the last chunk record's slot.
    w = store.begin({}, 0)
    w.set_layout([mapping(A, 1024), mapping(F, 512)])
    write_pattern(w, A, 1024, 1)
    write_pattern(w, F, 512, 2)
    w.set_layout([mapping(A, 1024)])
    image_id, _ = w.commit()
    path = os.path.join(store.images_dir, image_id, mf.PAGES_NAME)
    assert os.path.getsize(path) <= 2 * CHUNK_BYTES
    assert store.verify(image_id).ok
    assert store.read_memory(image_id, A, 1024 * P) == expected(A, 1024, 1)


def test_zero_only_last_slot_is_cut_too(store):
    w = store.begin({}, 0)
    w.set_layout([mapping(A, 1024)])
    write_pattern(w, A, 512, 1)
    write_pattern(w, A + 512 * P, 4, 3)          # slot 1 gets data...
    w.write_zeros(runs(A + 512 * P, 4))          # ...which then turns zero
    image_id, _ = w.commit()
    assert os.path.getsize(os.path.join(store.images_dir, image_id, mf.PAGES_NAME)) \
        <= CHUNK_BYTES
    res = store.verify(image_id)
    assert res.ok, res.error
    assert store.show(image_id)["totals"]["zero_pages"] == 4


def test_export_refuses_an_inconsistent_image(image, tmp_path):
    store, image_id, path, original = image
    m = copy.deepcopy(original)
    _not_migrating(m)                            # the core would lose that memory
    _reseal(path, m)
    core = tmp_path / "core"
    with pytest.raises(ImageError, match="inconsistent"):
        store.export_core(image_id, str(core))
    assert not core.exists()
