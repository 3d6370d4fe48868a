"""Withdrawal (SPEC.md 9.2) acts only on what the requester owns.

A withdraw marks the requester's own open or staged writers (same
migration id, source node and certificate name) and removes its own
published image; one that matches nothing records nothing.  So no peer can
flush the destination's memory of a real withdrawal with made-up requests,
nor block another source's publish by naming its migration id."""

from __future__ import annotations

import os

import pytest

from migrated.errors import ImageError, ImageWithdrawn
from migrated.image import ImageStore
from migrated.image import store as store_mod

from .conftest import mapping, write_pattern

M = 0x10000000
OWNER = dict(source_node="src", source_peer="src-cert")
# More made-up withdraws than the old list of withdrawn ids kept (4096).
FLOOD = 4200


def _writer(store: ImageStore, mid="m1", node="src", peer="src-cert"):
    w = store.begin({"migration_id": mid, "source_node": node, "source_peer": peer}, 0)
    w.set_layout([mapping(M, 4)])
    write_pattern(w, M, 4, 1)
    return w


def _made_up(i: int) -> str:
    return f"20200101-000000.000-{i:010x}"


def test_a_flood_of_made_up_withdraws_does_not_undo_a_real_one(store):
    w = _writer(store)
    image_id, _ = w.prepare()
    assert store.withdraw_migration("m1", image_id, **OWNER) == "absent"
    for i in range(FLOOD):
        assert store.withdraw_migration(f"flood-{i}", _made_up(i), source_node=f"n{i}",
                                        source_peer="other") == "absent"
    with pytest.raises(ImageWithdrawn):
        w.publish()
    w.abort()
    assert store.list() == [] and os.listdir(store.partial_dir) == []


def test_made_up_withdraws_leave_no_trace(store):
    for i in range(64):
        store.withdraw_migration(f"flood-{i}", _made_up(i), source_node="n")
    assert not hasattr(store, "_withdrawn")
    assert not any(store.is_withdrawn(f"flood-{i}") for i in range(64))
    assert not hasattr(store_mod, "MAX_WITHDRAWN_KEPT")


@pytest.mark.parametrize("who", [dict(source_node="other", source_peer="src-cert"),
                                 dict(source_node="src", source_peer="other-cert"),
                                 dict(source_node="src", source_peer="")])
def test_another_source_cannot_block_a_publish(store, who):
    # It knows the victim's migration id (and even its node name), not its
    # certificate: nothing of the victim's is touched.
    w = _writer(store)
    image_id, _ = w.prepare()
    assert store.withdraw_migration("m1", _made_up(1), **who) == "absent"
    assert not store.is_withdrawn("m1")
    w.publish()
    assert [r["image_id"] for r in store.list()] == [image_id]


def test_another_source_cannot_remove_a_published_image(store):
    w = _writer(store)
    image_id, _ = w.commit()
    with pytest.raises(ImageError, match="left alone"):
        store.withdraw_migration("m1", image_id, source_node="src", source_peer="x")
    assert [r["image_id"] for r in store.list()] == [image_id]


def test_the_owner_withdrawing_an_open_writer_stops_its_publish(store):
    w = _writer(store)
    assert store.withdraw_migration("m1", _made_up(2), **OWNER) == "absent"
    assert store.is_withdrawn("m1")
    w.prepare()
    with pytest.raises(ImageWithdrawn):
        w.publish()
    w.abort()
    assert store.list() == []


def test_only_the_owners_writers_are_marked(store):
    mine, theirs = _writer(store, "m1"), _writer(store, "m1", node="other", peer="o")
    store.withdraw_migration("m1", _made_up(3), **OWNER)
    for w in (mine, theirs):
        w.prepare()
    with pytest.raises(ImageWithdrawn):
        mine.publish()
    theirs.publish()
    mine.abort()
    assert [r["source_node"] for r in store.list()] == ["other"]


def test_a_withdraw_landing_inside_a_publish_removes_the_image(store, monkeypatch):
    # The rename is done, the directory fsyncs still run: the withdraw finds
    # the writer (not yet forgotten) and the image already in images/.
    w = _writer(store)
    image_id, _ = w.prepare()
    answers: list = []
    real = store_mod._fsync_dir

    def fsync_dir(path):
        if path == store.images_dir and not answers:
            answers.append(None)                  # once (remove() fsyncs it too)
            answers[0] = store.withdraw_migration("m1", _made_up(4), **OWNER)
        real(path)
    monkeypatch.setattr(store_mod, "_fsync_dir", fsync_dir)
    w.publish()
    assert answers == ["removed"]
    assert store.list() == [] and not os.path.exists(os.path.join(store.images_dir,
                                                                  image_id))
