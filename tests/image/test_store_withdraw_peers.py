"""Withdrawal through a real daemon (SPEC.md 9.2): a peer that is not the
migration's source -- another node name, same migration id -- cannot stop
that migration's publish; the source itself can."""

from __future__ import annotations

import pytest

from migrated.wire import (CommitRequest, Committed, FinalEnd, Freeze, Hello, Release,
                           Released, Withdraw, Withdrawn, Error)
from tests.cluster import Cluster
from tests.hostile.peer import RawPeer, anon_layout, pages, hello, BASE, drain, _reencode


def _staged(d, mid: str) -> tuple[RawPeer, str]:
    """A migration brought to Committed (its image staged, Release unsent)."""
    a = RawPeer("127.0.0.1", d.port, timeout=30)
    a.handshake(mid=mid)
    a.send(anon_layout(0, 4))
    a.send(pages(0, BASE, 1))
    a.send(Freeze(0))
    a.send(FinalEnd(0, 1))
    a.send(CommitRequest(1))
    committed = a.expect(Committed)
    a.conn.receive_data(_reencode(a.conn, committed))
    drain(a.conn)
    return a, committed.image_id


def _withdraw(d, first: Hello, image_id: str) -> str:
    with RawPeer("127.0.0.1", d.port) as b:
        b.send(first)
        b.expect_welcome()
        b.send(Withdraw(image_id))
        return b.expect(Withdrawn).outcome


@pytest.fixture(scope="module")
def daemon():
    with Cluster(tls=False) as c:
        yield c.daemon("dst")


def test_another_node_naming_the_migration_cannot_block_its_publish(daemon):
    a, image_id = _staged(daemon, "victim-1")
    try:
        outcome = _withdraw(daemon, Hello((1,), "someone-else", (), "victim-1"),
                            "20200101-000000.000-00000000ff")
        assert outcome == "absent"
        a.send(Release(image_id))
        a.expect(Released)
    finally:
        a.close()
    assert [r["image_id"] for r in daemon.images("victim-1")] == [image_id]


def test_the_source_itself_withdrawing_stops_the_publish(daemon):
    a, image_id = _staged(daemon, "victim-2")
    try:
        assert _withdraw(daemon, hello("victim-2"), image_id) == "absent"
        a.send(Release(image_id))
        out = a.finish(10)
    finally:
        a.close()
    assert not any(type(e).__name__ == "Released" for e in out.events), out
    assert any(isinstance(e, Error) and e.code == "cancelled" for e in out.events), out
    assert daemon.images("victim-2") == []
