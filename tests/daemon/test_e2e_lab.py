"""The daemon end-to-end test inside the lab VM with --tracker soft-dirty:
two `migrated` with mutual TLS on the guest's loopback, `migratectl send`
against a real workload, and the image compared page for page with the
frozen source (tests/lab/run.py boots the soft-dirty kernel; skipped on the
host).  Small workload: Python runs several times slower under emulation."""

from __future__ import annotations

import os
import signal

import pytest

from migrated.image.store import ImageStore
from tests.engine.imagecheck import compare

from . import conftest, test_e2e
from .conftest import proc_state
from .test_e2e import send, workload

pytestmark = pytest.mark.lab

# Start-up (imports, probe) under software emulation takes far longer.
LAB_START_TIMEOUT_S = 240.0


def test_send_soft_dirty_through_daemons_is_exact(daemons, certdir, monkeypatch):
    monkeypatch.setattr(conftest, "DAEMON_START_TIMEOUT_S", LAB_START_TIMEOUT_S)
    monkeypatch.setattr(test_e2e, "WORKLOAD_READY_S", LAB_START_TIMEOUT_S)
    a = daemons("a", certdir)
    b = daemons("b", certdir)
    with workload(8, 2000) as w:
        rc, s = send(a, w.pid, b.port, "--tracker", "soft-dirty", "--then", "stop",
                     timeout=600)
        assert rc == 0 and s["status"] == "completed", s
        assert s["tracker"] == "soft-dirty"
        assert len(s["rounds"]) >= 2
        assert proc_state(w.pid) == "T"          # --then stop: left stopped
        store = ImageStore(b.state_dir)
        compare(store, s["image_id"], w.pid)
        assert store.verify(s["image_id"]).ok
        os.kill(w.pid, signal.SIGCONT)
