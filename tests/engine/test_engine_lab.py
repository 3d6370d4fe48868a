"""The engine end to end with the soft-dirty tracker, inside the lab VM
(tests/lab/run.py boots a kernel with CONFIG_MEM_SOFT_DIRTY; skipped on the
host).  Kept small: Python runs several times slower under emulation."""

from __future__ import annotations

import os
import signal

import pytest

from migrated.engine.source import SendOptions
from migrated.image.store import ImageStore
from tests.engine.harness import migrate
from tests.engine.imagecheck import compare
from tests.engine.procs import workload

pytestmark = pytest.mark.lab

MIB = 1024 * 1024


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_soft_dirty_migration_is_exact(tmp_path):
    store = ImageStore(str(tmp_path / "state"))
    with workload(mib=16, rate=5000) as w:
        out = migrate(w.pid, store, SendOptions(tracker="soft-dirty", then="stop"), timeout=120)
        s = out.source
        assert s["status"] == "completed", s.get("error")
        assert s["tracker"] == "soft-dirty"
        # arming the tracker stopped the target (read and clear): round 0
        # reports that pause like every later round
        assert s["rounds"][0]["pause_ms"] > 0
        assert _state(w.pid) == "T"
        compare(store, s["image_id"], w.pid)
        assert store.verify(s["image_id"]).ok
        os.kill(w.pid, signal.SIGCONT)


def test_soft_dirty_hot_writer_stops_and_is_exact(tmp_path):
    store = ImageStore(str(tmp_path / "state"))
    with workload(mib=12, rate=50000, hot_mib=4) as w:
        opts = SendOptions(tracker="soft-dirty", then="stop", downtime_ms=5,
                           plateau_rounds=2, max_rounds=6)
        out = migrate(w.pid, store, opts, max_bandwidth=16 * MIB, timeout=120)
        s = out.source
        assert s["status"] == "completed", s.get("error")
        assert s["stop_reason"] in ("plateau", "max-rounds", "downtime-target")
        live = [r for r in s["rounds"] if not r["final"]]
        assert len(live) >= 2
        # soft-dirty collects stop the target briefly: the pause is reported
        assert any(r["pause_ms"] > 0 for r in live[1:])
        compare(store, s["image_id"], w.pid)
        os.kill(w.pid, signal.SIGCONT)
