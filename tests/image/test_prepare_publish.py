"""prepare() stages a sealed image in partial/ (never listed); publish()
makes it visible with one rename; abort() of a staged image removes it."""

from __future__ import annotations

import os

import pytest

from migrated.errors import ImageError

from .conftest import mapping, write_pattern

M1 = 0x10000000


def _staged(store, n_pages: int = 4):
    w = store.begin({}, 0)
    w.set_layout([mapping(M1, n_pages)])
    write_pattern(w, M1, n_pages, 1)
    image_id, digest = w.prepare({"migration_id": "m1"})
    return w, image_id, digest


def test_prepared_image_is_sealed_but_invisible(store):
    w, image_id, _ = _staged(store)
    assert w.state == "prepared"
    assert store.list() == []
    assert os.path.isfile(os.path.join(store.partial_dir, image_id, "manifest.json"))
    with pytest.raises(ImageError):
        store.show(image_id)
    assert store.used_bytes() > 0          # still charged against the quota
    with pytest.raises(ImageError):
        w.write_zeros(None)                # sealed: no more writes


def test_publish_makes_it_visible_and_verifiable(store):
    w, image_id, digest = _staged(store)
    w.publish()
    assert w.state == "committed"
    assert [i["image_id"] for i in store.list()] == [image_id]
    assert store.verify(image_id).ok
    assert store.show(image_id)["digest"] == digest
    assert os.listdir(store.partial_dir) == []
    w.abort()                              # a published image is never removed by abort
    assert [i["image_id"] for i in store.list()] == [image_id]


def test_abort_of_a_staged_image_removes_it(store):
    w, image_id, _ = _staged(store)
    w.abort()
    assert w.state == "aborted"
    assert store.list() == [] and os.listdir(store.partial_dir) == []
    assert store.used_bytes() == 0
    with pytest.raises(ImageError):
        w.publish()


def test_publish_needs_prepare(store):
    w = store.begin({}, 0)
    w.set_layout([mapping(M1, 2)])
    with pytest.raises(ImageError, match="only a prepared image"):
        w.publish()
    w.abort()


def test_commit_is_prepare_then_publish(store):
    w = store.begin({}, 0)
    w.set_layout([mapping(M1, 2)])
    write_pattern(w, M1, 2, 3)
    image_id, _ = w.commit({})
    assert w.state == "committed"
    assert [i["image_id"] for i in store.list()] == [image_id]


def test_withdraw_takes_a_published_image_back_out(store):
    w, image_id, _ = _staged(store)
    w.publish()
    used = store.used_bytes()
    assert used > 0 and [i["image_id"] for i in store.list()] == [image_id]
    assert w.withdraw() is True
    assert w.withdrawn and w.state == "aborted"
    assert store.list() == [] and os.listdir(store.images_dir) == []
    assert os.listdir(store.partial_dir) == []
    assert store.used_bytes() == 0
    w.abort()                              # idempotent afterwards
    assert w.withdraw() is False


def test_withdraw_of_a_staged_image_is_an_abort(store):
    w, image_id, _ = _staged(store)
    assert w.withdraw() is False
    assert not w.withdrawn and w.state == "aborted"
    assert store.list() == [] and os.listdir(store.partial_dir) == []


def test_withdraw_after_an_operator_removed_the_image(store):
    w, image_id, _ = _staged(store)
    w.publish()
    store.remove(image_id)
    assert w.withdraw() is True
    assert store.list() == [] and os.listdir(store.partial_dir) == []


# -- a source resolving a migration left in doubt (SPEC.md 9.2) -----------------

def _staged_for(store, mid="m1", node="src", peer="src-cert"):
    w = store.begin({"migration_id": mid, "source_node": node, "source_peer": peer}, 0)
    w.set_layout([mapping(M1, 4)])
    write_pattern(w, M1, 4, 1)
    image_id, _ = w.prepare()
    return w, image_id


def test_withdraw_migration_removes_its_published_image(store):
    w, image_id = _staged_for(store)
    w.publish()
    assert store.withdraw_migration("m1", image_id, source_node="src",
                                    source_peer="src-cert") == "removed"
    assert store.list() == [] and os.listdir(store.partial_dir) == []
    assert store.used_bytes() == 0
    # Asked again (a retry after a lost answer): nothing left, same verdict.
    assert store.withdraw_migration("m1", image_id, source_node="src",
                                    source_peer="src-cert") == "absent"


def test_withdraw_first_means_never_published(store):
    w, image_id = _staged_for(store)
    assert store.withdraw_migration("m1", image_id, source_node="src",
                                    source_peer="src-cert") == "absent"
    assert store.is_withdrawn("m1") and not store.is_withdrawn("m2")
    with pytest.raises(ImageError, match="withdrawn"):
        w.publish()
    assert w.state == "prepared"
    w.abort()
    assert store.list() == [] and os.listdir(store.partial_dir) == []


@pytest.mark.parametrize("who", [dict(source_node="other"), dict(source_peer="other-cert"),
                                 dict(migration_id="m2")])
def test_withdraw_of_someone_elses_image_is_refused(store, who):
    w, image_id = _staged_for(store)
    w.publish()
    args = dict(migration_id="m1", source_node="src", source_peer="src-cert") | who
    mid = args.pop("migration_id")
    with pytest.raises(ImageError, match="left alone"):
        store.withdraw_migration(mid, image_id, **args)
    assert [i["image_id"] for i in store.list()] == [image_id]


def test_withdraw_names_only_valid_image_ids(store):
    with pytest.raises(ImageError):
        store.withdraw_migration("m1", "../../etc", source_node="src")
