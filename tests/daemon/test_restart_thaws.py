"""A restart of a daemon that was SIGKILLed with its target frozen thaws
the target before anything else can fail: it built its TLS contexts first,
and certificates that did not load (a half-written rotation) ended the
start with the target still stopped."""

from __future__ import annotations

import os
import signal
import time

from tests.cluster import FAST_TIMEOUTS, Cluster, proc_state, wait_until
from tests.faults.proxy import S2D, FaultProxy, Rule
from tests.faults.victim import Victim


def test_a_restart_that_fails_to_load_its_certificates_still_thaws_the_target():
    with Cluster(tls=False, timeouts=FAST_TIMEOUTS) as c:
        src = c.daemon("src", tls=False)
        dst = c.daemon("dst", tls=False)
        proxy = FaultProxy(("127.0.0.1", dst.port))
        # Our daemon dies as the freeze goes out: the target is frozen, the
        # journal says so.
        proxy.arm(Rule(match=lambda f, h: f.direction == S2D and f.type == "freeze",
                       action=lambda f: (src.kill(), "stall")[1]))
        v = Victim(mib=4, rate=200.0, layout_ms=0.0)
        try:
            src.send(v.pid, "127.0.0.1", proxy.port, then="resume", timeout_s=30)
            wait_until(lambda: proxy.rule.verdict is not None, 30, "the kill")
            assert proc_state(v.pid) == "T" and src.journal()
            cert, _ = c.node_cert("src")
            with open(cert, "w") as f:
                f.write("-----BEGIN CERTIFICATE-----\ngarbage\n")
            src.tls = True
            try:
                src.start()
            except RuntimeError:
                pass                            # the start fails, as it must ...
            wait_until(lambda: proc_state(v.pid) != "T", 10, "the target thawed")
            assert src.journal() == []          # ... after the journal was replayed
        finally:
            if proc_state(v.pid) == "T":
                os.kill(v.pid, signal.SIGCONT)
            v.close()
            proxy.release()
            proxy.close()
            time.sleep(0)
