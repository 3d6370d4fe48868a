"""The three-way commit (issue 5, lost acknowledgement): Committed means
*prepared* -- the image is sealed but staged in partial/, never listed --
and only Release publishes it.  Whatever breaks before Release leaves no
image at the destination and a running target at the source."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import msgpack
import pytest

from migrated.engine.dest import DestMigration
from migrated.engine.source import SendOptions
from migrated.engine.transport import BlockingTransport
from migrated.image.store import ImageStore, ImageWriter
from migrated.runs import PAGE_SIZE, PageRuns
from migrated.wire import (NEED_DATA, Accept, Cancel, CommitRequest, Committed, ConnectionClosed,
                           Error, FinalEnd, Freeze, Hello, Layout, MappingInfo, Pages,
                           Release, Released, RoundEnd, SourceConnection, Start, Welcome,
                           Withdraw, Withdrawn)
from migrated.wire import limits as L
from migrated.wire.frames import encode
from tests.engine.harness import migrate
from tests.engine.procs import workload

BASE = 0x7F0000000000
# Bound on every wait of these tests (each takes well under a second).
WAIT_S = 20.0


@pytest.fixture
def store(tmp_path):
    return ImageStore(str(tmp_path / "state"))


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


# -- a proxy that cuts the link right after one message type passed ------------------

class FrameCutProxy:
    """Forwards both ways, reading the frames of the destination -> source
    direction; once a frame of type ``cut_after`` was forwarded, shuts both
    links down (a destination that vanishes at that exact point)."""

    def __init__(self, cut_after: str):
        self.cut_after = cut_after
        self.src_a, self.src_b = socket.socketpair()   # source <-> proxy
        self.dst_a, self.dst_b = socket.socketpair()   # proxy <-> dest
        self.cut = threading.Event()
        self._threads = [threading.Thread(target=self._down, daemon=True),
                         threading.Thread(target=self._up, daemon=True)]
        for t in self._threads:
            t.start()

    def sockets(self) -> tuple[socket.socket, socket.socket]:
        return self.src_a, self.dst_b

    def _shut(self) -> None:
        self.cut.set()
        for s in (self.src_b, self.dst_a):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _down(self) -> None:
        try:
            while not self.cut.is_set():
                data = self.src_b.recv(1 << 16)
                if not data or self.cut.is_set():
                    break
                self.dst_a.sendall(data)
        except OSError:
            pass
        self._shut()

    def _up(self) -> None:
        buf = b""
        pre = L.PREAMBLE_SIZE
        try:
            while True:
                data = self.dst_a.recv(1 << 16)
                if not data:
                    break
                buf += data
                if pre:
                    take = min(pre, len(buf))
                    self.src_b.sendall(buf[:take])
                    buf, pre = buf[take:], pre - take
                while len(buf) >= 4:
                    (n,) = struct.unpack(">I", buf[:4])
                    if len(buf) < 4 + n:
                        break
                    frame, buf = buf[:4 + n], buf[4 + n:]
                    self.src_b.sendall(frame)
                    if msgpack.unpackb(frame[4:], raw=False).get("type") == self.cut_after:
                        self._shut()
                        return
        except OSError:
            pass
        self._shut()

    def close(self) -> None:
        self._shut()
        for t in self._threads:
            t.join(5)
        for s in (self.src_b, self.dst_a):
            s.close()


def test_destination_closes_after_committed_before_release(store):
    with workload(mib=8, rate=2000) as w:
        proxy = FrameCutProxy("committed")
        try:
            out = migrate(w.pid, store, SendOptions(max_rounds=1, then="stop"),
                          sockets=proxy.sockets(), timeout=5.0)
        finally:
            proxy.close()
        s, d = out.source, out.dest
        assert proxy.cut.is_set()
        assert s["status"] == "failed" and d["status"] == "failed"
        assert store.list() == [] and os.listdir(store.partial_dir) == []
        assert _state(w.pid) != "T", "the target must run again"
        assert "thawed" in s["error"]
        if "in_doubt_image_id" in s:     # the Release made it into the socket
            assert "in doubt" in s["error"] and s["in_doubt_image_id"] in s["error"]


def test_a_complete_migration_waits_for_released(store):
    with workload(mib=8) as w:
        out = migrate(w.pid, store, SendOptions(max_rounds=1, then="resume"))
        s, d = out.source, out.dest
        assert s["status"] == "completed" and d["status"] == "completed"
        assert [i["image_id"] for i in store.list()] == [s["image_id"]]
        assert s["freeze_breakdown"]["release_ms"] >= 0.0
        commit = [e for e in out.dest_events if e["event"] == "commit"][0]
        assert commit["image_id"] == s["image_id"] and commit["digest"] == s["digest"]
        assert _state(w.pid) != "T"


# -- a scripted source, for what a real source never does -------------------------

class ScriptedSource:
    """A sans-IO SourceConnection over one end of a socket pair; the other
    end runs a real DestMigration in a thread."""

    def __init__(self, store: ImageStore):
        a, b = socket.socketpair()
        self.sock = a
        self.sock.settimeout(WAIT_S)
        self.conn = SourceConnection()
        self.result: dict = {}
        self.events: list = []
        self.dm = DestMigration(BlockingTransport(b, timeout=WAIT_S), store, node="dst",
                                on_event=self.events.append)
        self.thread = threading.Thread(target=lambda: self.result.update(self.dm.run()))
        self.thread.start()

    def send(self, ev) -> None:
        self.sock.sendall(self.conn.send(ev))

    def recv(self):
        while True:
            got = self.conn.next_event()
            if got is not NEED_DATA:
                return got
            self.conn.receive_data(self.sock.recv(1 << 16))

    def to_committed(self) -> Committed:
        data = bytes(range(256)) * (2 * PAGE_SIZE // 256)
        self.send(Hello(L.SUPPORTED_VERSIONS, "src", (), "mig-3way"))
        assert isinstance(self.recv(), Welcome)
        self.send(Start(os.getpid(), ("x",), "/x", PAGE_SIZE, "digest", len(data), {}))
        assert isinstance(self.recv(), Accept)
        self.send(Layout(0, (MappingInfo(BASE, BASE + 16 * PAGE_SIZE, "rw-p", 0, "",
                                         "anon"),)))
        self.send(Pages.build(0, PageRuns.from_pairs([(BASE, 2)]), data))
        self.send(RoundEnd(0, 2, len(data), 1.0, 0.0, 1.0, 0.0))
        self.send(Freeze(1))
        self.send(FinalEnd(1, 2))
        self.send(CommitRequest(2))
        got = self.recv()
        assert isinstance(got, Committed), got
        return got

    def finish(self) -> dict:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "destination hung"
        self.sock.close()
        return self.result


def _staged_only(store: ImageStore, image_id: str) -> None:
    """Prepared: sealed in partial/ (manifest written), not listed."""
    assert store.list() == []
    assert os.listdir(store.partial_dir) == [image_id]
    assert os.path.isfile(os.path.join(store.partial_dir, image_id, "manifest.json"))


def test_source_closes_after_committed_without_release(store):
    src = ScriptedSource(store)
    try:
        got = src.to_committed()
        _staged_only(store, got.image_id)
        src.sock.shutdown(socket.SHUT_RDWR)
    finally:
        res = src.finish()
    assert res["status"] == "failed"
    assert store.list() == [] and os.listdir(store.partial_dir) == []
    assert not [e for e in src.events if e["event"] == "commit"]


def test_release_with_a_wrong_image_id_is_refused(store):
    src = ScriptedSource(store)
    try:
        got = src.to_committed()
        # Our connection refuses to send it; put it on the wire by hand.
        src.sock.sendall(encode(Release(got.image_id + "x")))
        reply = src.recv()
    finally:
        res = src.finish()
    assert isinstance(reply, Error) and reply.code == "out-of-state"
    assert res["status"] == "failed" and res["error_code"] == "out-of-state"
    assert store.list() == [] and os.listdir(store.partial_dir) == []


def test_release_publishes_and_released_names_the_image(store):
    src = ScriptedSource(store)
    try:
        got = src.to_committed()
        src.send(Release(got.image_id))
        rel = src.recv()
        assert rel == Released(got.image_id)
        # The source's verdict: it got Released in time, so it just closes.
        src.sock.shutdown(socket.SHUT_WR)
        assert isinstance(src.recv(), ConnectionClosed)
    finally:
        res = src.finish()
    assert res["status"] == "completed" and res["image_id"] == got.image_id
    assert [i["image_id"] for i in store.list()] == [got.image_id]
    assert os.listdir(store.partial_dir) == []


@pytest.mark.parametrize("verdict", ["error", "cancel"])
def test_a_source_that_gave_up_after_release_gets_the_image_withdrawn(store, verdict):
    # The source timed out waiting for Released (the destination was slow),
    # resumed its process and said so: the image published meanwhile must
    # not stay behind as a second copy.
    src = ScriptedSource(store)
    try:
        got = src.to_committed()
        src.send(Release(got.image_id))
        assert src.recv() == Released(got.image_id)
        assert [i["image_id"] for i in store.list()] == [got.image_id]
        src.send(Error("timeout", "no Released within 1 s") if verdict == "error"
                 else Cancel("operator"))
        src.sock.shutdown(socket.SHUT_WR)
    finally:
        res = src.finish()
    assert res["status"] == "failed"
    assert res["error_code"] == ("timeout" if verdict == "error" else "cancelled")
    assert "withdrawn" in res["error"] and got.image_id in res["error"]
    assert store.list() == [] and os.listdir(store.partial_dir) == []
    assert os.listdir(store.images_dir) == []


def _published(store: ImageStore, how: int = socket.SHUT_RDWR) -> tuple[str, dict]:
    """A migration the destination published and answered Released for,
    whose source then shut its end (``how``) without a verdict: (image id,
    the destination's result)."""
    src = ScriptedSource(store)
    try:
        got = src.to_committed()
        src.send(Release(got.image_id))
        assert src.recv() == Released(got.image_id)
        src.sock.shutdown(how)
    finally:
        res = src.finish()
    return got.image_id, res


def test_a_source_that_vanishes_after_released_keeps_the_image(store):
    # End of stream after Released says nothing against it: presumed
    # released (the source may already have ended its process).
    image_id, res = _published(store)
    assert res["status"] == "completed"
    assert [i["image_id"] for i in store.list()] == [image_id]


def test_a_publish_stalled_past_the_window_is_withdrawn(store, monkeypatch):
    # Stalled between reading Release and sending Released (here: a slow
    # publish): the source may be past its timeout, so no Released is sent
    # and the image does not stay.
    monkeypatch.setattr(L, "COMMIT_TIMEOUT_S", 1.0)
    real = ImageWriter.publish

    def slow_publish(self):
        real(self)
        time.sleep(L.COMMIT_TIMEOUT_S * L.RELEASE_PUBLISH_SHARE + 0.2)

    monkeypatch.setattr(ImageWriter, "publish", slow_publish)
    src = ScriptedSource(store)
    try:
        got = src.to_committed()
        src.send(Release(got.image_id))
        reply = src.recv()
    finally:
        res = src.finish()
    assert isinstance(reply, Error) and reply.code == "timeout", reply
    assert res["status"] == "failed" and "withdrawn" in res["error"]
    assert store.list() == [] and os.listdir(store.partial_dir) == []


def test_a_released_that_cannot_be_sent_withdraws_the_image(store, monkeypatch):
    # The link breaks between the publish and Released: the source cannot
    # have read Released, so it gives up and keeps its process -- the image
    # must go, and the destination's summary must say it was withdrawn (it
    # said "the partial image was removed" while the image stayed listed).
    real = ImageWriter.publish
    src: ScriptedSource | None = None

    def publish_then_break(self):
        real(self)
        src.dm.transport.sock.shutdown(socket.SHUT_WR)   # our next send fails

    monkeypatch.setattr(ImageWriter, "publish", publish_then_break)
    src = ScriptedSource(store)
    try:
        got = src.to_committed()
        src.send(Release(got.image_id))
        assert isinstance(src.recv(), ConnectionClosed)   # never Released
    finally:
        res = src.finish()
    assert res["status"] == "failed"
    assert "Released" in res["error"] and "withdrawn" in res["error"], res["error"]
    assert "partial image was removed" not in res["error"]
    assert store.list() == [] and os.listdir(store.images_dir) == []
    assert os.listdir(store.partial_dir) == []
    # The source's in-doubt Withdraw, when it comes, finds nothing to remove.
    assert store.withdraw_migration("mig-3way", got.image_id, source_node="src") == "absent"


def test_release_after_the_publish_window_is_not_published(store, monkeypatch):
    # A destination that reads Release too late (it was stalled) may face a
    # source that already gave up: it removes the staged image instead.
    monkeypatch.setattr(L, "COMMIT_TIMEOUT_S", 1.0)
    src = ScriptedSource(store)
    try:
        got = src.to_committed()
        time.sleep(L.COMMIT_TIMEOUT_S * L.RELEASE_PUBLISH_SHARE + 0.3)
        try:
            src.send(Release(got.image_id))
        except OSError:
            pass                               # the destination may be gone already
    finally:
        res = src.finish()
    assert res["status"] == "failed" and res["error_code"] == "timeout"
    assert store.list() == [] and os.listdir(store.partial_dir) == []


# -- resolving a migration left in doubt: Withdraw (SPEC.md 9.2) ----------------

def _withdraw(store: ImageStore, image_id: str, mid: str = "mig-3way", node: str = "src"):
    """A second conversation: Hello (same migration id) then Withdraw."""
    a, b = socket.socketpair()
    a.settimeout(WAIT_S)
    conn = SourceConnection()
    res: dict = {}
    dm = DestMigration(BlockingTransport(b, timeout=WAIT_S), store, node="dst",
                       on_event=lambda e: None)
    t = threading.Thread(target=lambda: res.update(dm.run()))
    t.start()

    def recv():
        while True:
            got = conn.next_event()
            if got is not NEED_DATA:
                return got
            conn.receive_data(a.recv(1 << 16))
    try:
        a.sendall(conn.send(Hello(L.SUPPORTED_VERSIONS, node, (), mid)))
        assert isinstance(recv(), Welcome)
        a.sendall(conn.send(Withdraw(image_id)))
        reply = recv()
        a.shutdown(socket.SHUT_WR)
    finally:
        t.join(WAIT_S)
        a.close()
    assert not t.is_alive()
    return reply, res


def test_withdraw_removes_an_image_published_for_a_source_that_gave_up(store):
    # The source's connection is gone without a verdict (its daemon died).
    image_id, res = _published(store)
    assert res["status"] == "completed"
    assert [i["image_id"] for i in store.list()] == [image_id]
    reply, wres = _withdraw(store, image_id)
    assert reply == Withdrawn(image_id, "removed")
    assert wres["status"] == "completed" and wres["withdrawn"] == "removed"
    assert store.list() == [] and os.listdir(store.partial_dir) == []
    # A retry (the answer was lost) is harmless.
    reply, _ = _withdraw(store, image_id)
    assert reply == Withdrawn(image_id, "absent")


def test_withdraw_before_release_arrives_means_no_publish(store):
    # The destination was stalled with Release in its socket while the
    # source, restarted, withdrew the migration over a new connection.
    src = ScriptedSource(store)
    try:
        got = src.to_committed()
        reply, _ = _withdraw(store, got.image_id)
        assert reply == Withdrawn(got.image_id, "absent")
        src.send(Release(got.image_id))
        answer = src.recv()
    finally:
        res = src.finish()
    assert isinstance(answer, Error) and answer.code == "cancelled", answer
    assert res["status"] == "failed" and "withdrawn" in res["error"]
    assert store.list() == [] and os.listdir(store.partial_dir) == []


def test_withdraw_from_another_source_is_refused(store):
    image_id, _ = _published(store, socket.SHUT_WR)
    for mid, node in (("mig-3way", "intruder"), ("mig-other", "src")):
        reply, wres = _withdraw(store, image_id, mid=mid, node=node)
        assert isinstance(reply, Error) and reply.code == "auth", reply
        assert wres["status"] == "failed"
    assert [i["image_id"] for i in store.list()] == [image_id]
