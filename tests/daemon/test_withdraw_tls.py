"""Withdrawal (SPEC.md 9.2) against a real daemon over mutual TLS: the
image remembers the certificate name that sent it, and only that identity
(with the same node name and migration id) may take it back."""

from __future__ import annotations

import os

import pytest

from migrated.daemon import tls
from migrated.engine.transport import BlockingTransport, Channel
from migrated.engine.withdraw import WithdrawRefused, request_withdraw
from migrated.runs import PAGE_SIZE, PageRuns
from migrated.wire import (NEED_DATA, Accept, CommitRequest, Committed, FinalEnd, Freeze,
                           Hello, Layout, MappingInfo, Pages, Release, Released, RoundEnd,
                           SourceConnection, Start, Welcome)
from migrated.wire import limits as L
from tests.cluster import Cluster, wait_until

BASE = 0x7F0000000000
TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def cluster():
    with Cluster(tls=True) as c:
        yield c


def _connect(c: Cluster, dst, name: str) -> BlockingTransport:
    cert, key = c.node_cert(name)
    sock, _ = tls.client_connect("127.0.0.1", dst.port, tls.client_context(cert, key, c.ca),
                                 [], timeout=TIMEOUT_S)
    return BlockingTransport(sock, timeout=TIMEOUT_S, peer=f"127.0.0.1:{dst.port}")


def _expect(ch: Channel, want: type):
    got = ch.next_event(TIMEOUT_S)
    assert isinstance(got, want), got
    return got


def _migrate_by_hand(c: Cluster, dst, name: str, mid: str) -> str:
    """A whole (tiny) migration from a client holding ``name``'s
    certificate; returns the published image id."""
    t = _connect(c, dst, name)
    ch = Channel(SourceConnection(), t, NEED_DATA)
    try:
        data = bytes(range(256)) * (2 * PAGE_SIZE // 256)
        ch.send_event(Hello(L.SUPPORTED_VERSIONS, name, (), mid))
        _expect(ch, Welcome)
        ch.send_event(Start(os.getpid(), ("x",), "/x", PAGE_SIZE, "digest", len(data), {}))
        _expect(ch, Accept)
        ch.send_event(Layout(0, (MappingInfo(BASE, BASE + 16 * PAGE_SIZE, "rw-p", 0, "",
                                             "anon"),)))
        ch.send_event(Pages.build(0, PageRuns.from_pairs([(BASE, 2)]), data))
        ch.send_event(RoundEnd(0, 2, len(data), 1.0, 0.0, 1.0, 0.0))
        ch.send_event(Freeze(1))
        ch.send_event(FinalEnd(1, 2))
        ch.send_event(CommitRequest(2))
        committed = _expect(ch, Committed)
        ch.send_event(Release(committed.image_id))
        _expect(ch, Released)
    finally:
        t.close()
    wait_until(lambda: [i for i in dst.images(mid)], TIMEOUT_S, "the image")
    return committed.image_id


def _withdraw(c: Cluster, dst, name: str, mid: str, image_id: str) -> str:
    t = _connect(c, dst, name)
    try:
        return request_withdraw(t, node=name, migration_id=mid, image_id=image_id,
                                timeout=TIMEOUT_S)
    finally:
        t.close()


def test_only_the_sending_certificate_may_withdraw(cluster):
    dst = cluster.daemon("dst")
    image_id = _migrate_by_hand(cluster, dst, "src", "tls-w-1")
    # Another node of the same cluster, claiming to be "src", is refused: its
    # certificate name is not the one that sent the image.
    cluster.node_cert("other")
    with pytest.raises(WithdrawRefused, match="auth"):
        _withdraw(cluster, dst, "other", "tls-w-1", image_id)
    t = _connect(cluster, dst, "other")
    try:
        with pytest.raises(WithdrawRefused, match="auth"):
            request_withdraw(t, node="src", migration_id="tls-w-1", image_id=image_id,
                             timeout=TIMEOUT_S)
    finally:
        t.close()
    assert [i["image_id"] for i in dst.images("tls-w-1")] == [image_id]
    # The sender itself: removed, then (a retry) absent.
    assert _withdraw(cluster, dst, "src", "tls-w-1", image_id) == "removed"
    assert dst.images("tls-w-1") == []
    assert _withdraw(cluster, dst, "src", "tls-w-1", image_id) == "absent"
