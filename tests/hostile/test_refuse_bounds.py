"""Refused connections are bounded too (review 1): a real plaintext daemon
on 127.0.0.1, and raw peers that, once refused ("busy", or "timeout" for a
silent handshake), trickle a byte now and then to keep the connection.

The daemon must close them within listener.REFUSE_LINGER_S whatever they
send, and count them as pending handshakes until then, so that neither the
per-address nor the global limit can be dodged by getting refused."""

from __future__ import annotations

import threading
import time

import pytest

from migrated.daemon import listener
from migrated.wire import Error, Keepalive, Welcome
from migrated.wire import limits as L
from migrated.wire.frames import encode
from tests.cluster import FAST_TIMEOUTS, Cluster
from tests.hostile.peer import RawPeer, hello

# How long past REFUSE_LINGER_S a refused connection may stay open here
# (two trickle periods to see the close, scheduling on a loaded box; the
# old drain never ended at all).
SLACK_S = 2.0
TRICKLE_S = 0.3


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(tls=False, timeouts=FAST_TIMEOUTS)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def busy_dst(cluster):
    """A destination whose one migration slot is held by a source that
    sends keepalives for as long as the module runs."""
    d = cluster.daemon("busy", extra=["--max-migrations", "1", "--min-free", "1M"])
    holder = RawPeer(d.host, d.port, timeout=30)
    holder.handshake(mid="refuse-holder")
    stop = threading.Event()

    def keepalives() -> None:
        seq = 0
        while not stop.wait(0.5):
            holder.send_raw(encode(Keepalive(seq)))
            seq += 1
            holder._pull(0)

    t = threading.Thread(target=keepalives, daemon=True, name="holder-keepalives")
    t.start()
    try:
        yield d
    finally:
        stop.set()
        t.join(5)
        holder.close()


def _gone(p: RawPeer) -> bool:
    """Whether the daemon closed its socket (not only its sending half,
    which it shuts right after its Error): data we send then meets a reset."""
    try:
        p.sock.send(b"x")
        p.sock.setblocking(False)
        try:
            while p.sock.recv(65536):
                pass
        except BlockingIOError:
            pass
        finally:
            p.sock.setblocking(True)
    except OSError:              # EPIPE, ECONNRESET: closed on the daemon's side
        return True
    return False


def _trickle_until_closed(peers: list[RawPeer], limit_s: float) -> list[float]:
    """Send each peer a byte every TRICKLE_S until the daemon closed every
    connection or ``limit_s`` ran out; how long each stayed open (inf:
    still open at the end).  A close shows at most two sends late."""
    t0 = time.monotonic()
    closed_at = [float("inf")] * len(peers)
    while time.monotonic() - t0 < limit_s:
        for i, p in enumerate(peers):
            if closed_at[i] == float("inf") and _gone(p):
                closed_at[i] = time.monotonic() - t0
        if all(c != float("inf") for c in closed_at):
            break
        time.sleep(TRICKLE_S)
    return closed_at


def _refused(p: RawPeer, code: str, timeout: float = 10.0) -> Error:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        errs = [e for e in p.events if isinstance(e, Error)]
        if errs:
            assert errs[0].code == code, errs[0]
            return errs[0]
        if p.closed:
            break
        p._pull(0.2)
    raise AssertionError(f"no {code} Error: {p.events} closed={p.closed}")


def test_a_busy_refused_peer_that_trickles_is_closed_within_the_linger(busy_dst):
    p = RawPeer(busy_dst.host, busy_dst.port)
    p.send_raw(L.PREAMBLE + encode(hello("refuse-trickler")))
    _refused(p, "busy")
    open_s = _trickle_until_closed([p], listener.REFUSE_LINGER_S + SLACK_S + 4)[0]
    assert open_s < listener.REFUSE_LINGER_S + SLACK_S, \
        f"a refused peer trickling a byte every {TRICKLE_S} s kept its connection {open_s:.1f} s"
    p.close()


def test_busy_refused_peers_count_as_pending_until_closed(busy_dst):
    """The per-address limit holds while refused peers are being told why:
    one more connection from that address is closed at once, unanswered."""
    peers = [RawPeer(busy_dst.host, busy_dst.port) for _ in range(listener.MAX_PENDING_PER_ADDR)]
    try:
        for p in peers:
            p.send_raw(L.PREAMBLE)
        for p in peers:
            _refused(p, "busy")
        extra = RawPeer(busy_dst.host, busy_dst.port)
        extra.send_raw(L.PREAMBLE)
        out = extra.finish(5.0)
        assert out.closed and not out.errors, \
            f"a connection past {listener.MAX_PENDING_PER_ADDR} refused ones from one address " \
            f"was handled, not closed at once: {out}"
        extra.close()
        # and they all go within the linger, though they trickle
        left = _trickle_until_closed(peers, listener.REFUSE_LINGER_S + SLACK_S + 4)
        assert max(left) < listener.REFUSE_LINGER_S + SLACK_S, left
    finally:
        for p in peers:
            p.close()
    # the slots are free again: the address is served (refused as busy, not dropped)
    p = RawPeer(busy_dst.host, busy_dst.port)
    p.send_raw(L.PREAMBLE)
    _refused(p, "busy")
    p.close()


def test_silent_handshakes_refused_and_trickling_give_their_slots_back(cluster):
    d = cluster.daemon("pending", extra=["--min-free", "1M"])
    peers = [RawPeer(d.host, d.port) for _ in range(listener.MAX_PENDING_PER_ADDR)]
    try:
        for p in peers:                  # silent past the handshake timeout
            _refused(p, "timeout", timeout=FAST_TIMEOUTS.handshake_s + 10)
        left = _trickle_until_closed(peers, listener.REFUSE_LINGER_S + SLACK_S + 4)
        assert max(left) < listener.REFUSE_LINGER_S + SLACK_S, \
            f"refused silent peers that then trickle stayed open: {left}"
        # A real source from the same address is served, not locked out.
        src = RawPeer(d.host, d.port)
        src.send(hello("refuse-legit"))
        assert isinstance(src.expect(Welcome, 10), Welcome)
        src.close()
    finally:
        for p in peers:
            p.close()
