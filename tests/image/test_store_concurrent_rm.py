"""An image removed by another process (`migratectl images rm` has a store
of its own) while this store lists, shows or withdraws it.

The removal is made by a second ImageStore on the same directory -- real
renames and deletions -- at the exact step where a concurrent `rm` can
land, by running it from inside the first store's own step."""

from __future__ import annotations

import os

import pytest

from migrated.errors import ImageNotFound
from migrated.image import ImageStore

from .conftest import mapping, write_pattern

M = 0x10000000


def _image(store: ImageStore, mid: str = "m1", node: str = "src", peer: str = "cert") -> str:
    w = store.begin({"pid": 7, "migration_id": mid, "source_node": node,
                     "source_peer": peer}, 0)
    w.set_layout([mapping(M, 4)])
    write_pattern(w, M, 4, 1)
    return w.commit()[0]


@pytest.fixture
def stores(tmp_path):
    state = str(tmp_path / "state")
    return ImageStore(state, min_free_bytes=0), ImageStore(state, min_free_bytes=0,
                                                           create=False)


def _rm_after(monkeypatch, store, method: str, other: ImageStore, victim: str) -> None:
    """Make ``other`` remove ``victim`` right after ``store.<method>`` ran."""
    real = getattr(store, method)

    def then_rm(*args, **kwargs):
        got = real(*args, **kwargs)
        if os.path.isdir(os.path.join(other.images_dir, victim)):
            other.remove(victim)
        return got
    monkeypatch.setattr(store, method, then_rm)


def test_list_leaves_out_an_image_removed_after_the_directory_was_read(stores, monkeypatch):
    store, other = stores
    keep, gone = _image(store, "m1"), _image(store, "m2")
    _rm_after(monkeypatch, store, "_image_ids", other, gone)
    rows = store.list()
    assert [r["image_id"] for r in rows] == [keep]
    assert "error" not in rows[0]


def test_list_leaves_out_an_image_removed_while_its_manifest_is_opened(stores, monkeypatch):
    store, other = stores
    keep, gone = _image(store, "m1"), _image(store, "m2")
    _rm_after(monkeypatch, store, "_existing", other, gone)   # between check and open
    rows = store.list()
    assert [r["image_id"] for r in rows] == [keep]


def test_show_of_an_image_removed_meanwhile_is_not_found(stores, monkeypatch):
    store, other = stores
    gone = _image(store)
    _rm_after(monkeypatch, store, "_existing", other, gone)
    with pytest.raises(ImageNotFound):
        store.show(gone)


def test_withdraw_racing_an_rm_answers_absent(stores, monkeypatch):
    # The rm lands after withdraw checked who owns the image and after its
    # remove() found it, right before the rename: the image is gone either
    # way, so the source hears "absent" -- not an OSError from the rename.
    store, other = stores
    image_id = _image(store)
    real_existing = store._existing
    checks = []

    def existing(iid):
        path = real_existing(iid)
        checks.append(iid)
        if len(checks) == 2:                  # remove()'s own check: rm lands now
            other.remove(iid)
        return path
    monkeypatch.setattr(store, "_existing", existing)
    assert store.withdraw_migration("m1", image_id, source_node="src",
                                    source_peer="cert") == "absent"
    assert len(checks) == 2 and store.list() == []


def test_remove_of_an_image_removed_meanwhile_is_not_found(stores, monkeypatch):
    store, other = stores
    image_id = _image(store)
    _rm_after(monkeypatch, store, "_existing", other, image_id)
    with pytest.raises(ImageNotFound):
        store.remove(image_id)


def test_remove_clears_a_stale_trash_directory(stores):
    # A removal that crashed mid-delete leaves partial/<id>.removing; a
    # later rm of an image of that id must still work.
    store, _ = stores
    image_id = _image(store)
    stale = os.path.join(store.partial_dir, f"{image_id}.removing")
    os.makedirs(os.path.join(stale, "leftover"))
    store.remove(image_id)
    assert store.list() == [] and not os.path.exists(stale)


def test_verify_of_an_image_removed_while_it_runs_is_not_found(stores, monkeypatch):
    # Not "FAILED: pages.img is missing": the image is simply gone.
    store, other = stores
    image_id = _image(store)
    _rm_after(monkeypatch, store, "show", other, image_id)
    with pytest.raises(ImageNotFound):
        store.verify(image_id)
