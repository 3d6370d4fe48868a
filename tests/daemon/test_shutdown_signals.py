"""How the daemon ends: SIGHUP ends it like SIGTERM (it used to kill it on
the spot with the target frozen), and a send that comes once the shutdown
began is refused (it was admitted, froze its target while the daemon went
away and was never cancelled)."""

from __future__ import annotations

import signal
import time

import pytest

from tests.cluster import Cluster, ControlError, proc_state, wait_until
from tests.engine.procs import workload

MIB = 1 << 20


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_a_hangup_ends_the_daemon_cleanly_with_the_target_thawed(sig):
    with Cluster(tls=False) as c, workload(mib=32, rate=200) as w:
        a, b = c.daemon("a"), c.daemon("b")
        # Stop-and-copy held back by the cap: the target stays frozen a while.
        a.send(w.pid, "127.0.0.1", b.port, max_rounds=0, max_bandwidth=2 * MIB,
               then="resume")
        wait_until(lambda: proc_state(w.pid) == "T", 20, "the target frozen")
        a.signal(sig)
        assert a.proc.wait(30) == 0, a.log_tail()
        assert proc_state(w.pid) != "T"
        assert a.journal() == []
        assert "event=stopped" in a.log_text()


def test_a_send_after_the_shutdown_began_is_refused():
    with Cluster(tls=False) as c, workload(mib=64, rate=200) as w1, \
            workload(mib=8, rate=200) as w2:
        a, b, d = c.daemon("a"), c.daemon("b"), c.daemon("d")
        a.send(w1.pid, "127.0.0.1", b.port, then="resume")
        wait_until(lambda: b.partials(), 20, "the first migration under way")
        b.pause()          # its cancel now waits on b (CANCEL_FORCE_S): a shuts down slowly
        try:
            a.signal(signal.SIGTERM)
            wait_until(lambda: "event=shutdown_cancel" in a.log_text(), 10, "shutdown begun")
            try:
                reply = a.request({"op": "send", "pid": w2.pid, "host": "127.0.0.1",
                                   "port": d.port, "options": {"then": "resume"}})
                refused = None
            except ControlError as e:
                reply, refused = None, str(e)
            except OSError as e:          # the control socket already closed: refused too
                reply, refused = None, f"shutting down ({e})"
            assert refused is not None and "shutting down" in refused, (reply, refused)
            t0 = time.monotonic()
            while a.alive and time.monotonic() - t0 < 30:
                assert proc_state(w2.pid) != "T"
                time.sleep(0.05)
        finally:
            b.resume()
        assert a.proc.wait(30) == 0
        assert proc_state(w1.pid) != "T" and proc_state(w2.pid) != "T"


def test_the_source_hears_why_a_stopping_destination_left():
    # The destination cancels with its reason as its daemon stops; the
    # source's next send then fails (the link is gone) -- its error must
    # carry the destination's word, not just "Broken pipe".
    with Cluster(tls=False) as c, workload(mib=64, rate=200) as w:
        a, b = c.daemon("a"), c.daemon("b")
        mid = a.send(w.pid, "127.0.0.1", b.port, max_bandwidth=8 * MIB, then="resume")
        wait_until(lambda: b.partials(), 20, "the migration under way")
        time.sleep(0.5)
        b.signal(signal.SIGTERM)
        st = a.wait_done(mid, 60)
        assert st["state"] in ("failed", "cancelled"), st
        err = (st.get("summary") or {}).get("error", "")
        assert "shutting down" in err, err
        assert proc_state(w.pid) != "T"


@pytest.mark.parametrize("tls", [False, True])
def test_a_cancel_on_the_destination_reaches_the_source_with_its_reason(tls):
    # On a slow link the destination engine is still inside a page batch
    # when the cancel's grace runs out and the link is shut: the source
    # heard only that the link broke.  The latch now says Cancel first.
    # Over TLS the source's keepalive, sent right after its failed send,
    # left its SSL object failed for good and the Cancel unread (see
    # BlockingTransport._cut).
    from tests.cluster import FAST_TIMEOUTS
    with Cluster(tls=tls, timeouts=FAST_TIMEOUTS) as c, workload(mib=16, rate=200) as w:
        a, b = c.daemon("a"), c.daemon("b")
        mid = a.send(w.pid, "127.0.0.1", b.port, then="resume", max_bandwidth=MIB // 2)
        wait_until(lambda: b.partials(), 20, "the receive under way")
        time.sleep(1.0)
        recv = [m for m in b.list() if m["role"] == "receive" and m["migration_id"] == mid]
        b.request({"op": "cancel", "id": recv[0]["id"]})
        st = a.wait_done(mid, 60)
        err = (st.get("summary") or {}).get("error", "")
        assert "cancelled by operator" in err, (st["state"], err)
        assert st["state"] == "cancelled", (st["state"], err)
        assert proc_state(w.pid) != "T"
