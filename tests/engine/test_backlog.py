"""The "backlog" capability end to end: the destination reports the page
data it has not made durable yet, the source counts it in the expected
downtime and waits for the destination's disk before it freezes."""

from __future__ import annotations

import os
import signal

import pytest

import migrated.engine.dest as dest_mod
import migrated.engine.source as source_mod
from migrated.engine.source import SendOptions
from migrated.image.store import ImageStore
from tests.engine.harness import migrate
from tests.engine.imagecheck import compare
from tests.engine.procs import workload

MIB = 1024 * 1024


@pytest.fixture
def store(tmp_path):
    return ImageStore(str(tmp_path / "state"))


def _freeze_event(out) -> dict:
    return [e for e in out.events if e["event"] == "freeze"][0]


def test_the_source_waits_for_the_destinations_disk_then_freezes(store):
    # Round 0 leaves 48 MiB unflushed.  The destination's first report has
    # no measured flush rate yet and assumes ASSUMED_FLUSH_RATE (100 MiB/s:
    # about 480 ms, far over 5% of the 300 ms target), so the source must wait
    # for the report that comes when the flush started at RoundEnd is done.
    with workload(mib=48, rate=0) as w:
        out = migrate(w.pid, store, SendOptions(then="stop"))
        s = out.source
        assert s["status"] == "completed", s.get("error")
        assert s["dest_reports"] >= 2
        assert s["rounds"][1]["dest_wait_ms"] > 0 and s["dest_wait_ms"] > 0
        fz = _freeze_event(out)
        assert fz["dest_flush_ms"] <= 300 * 0.05      # BACKLOG_WAIT_SHARE of the target
        assert s["dest_backlog"]["round"] >= 0
        compare(store, s["image_id"], w.pid)
        os.kill(w.pid, signal.SIGCONT)


@pytest.mark.parametrize("side", ["dest", "source"])
def test_without_the_capability_on_either_side_nothing_is_reported_or_waited_for(
        store, monkeypatch, side):
    # An older peer: it neither offers nor accepts "backlog".  The
    # destination then flushes during the rounds itself, as before.
    mod = dest_mod if side == "dest" else source_mod
    monkeypatch.setattr(mod, "CAPABILITIES", ("zeros",))
    with workload(mib=48, rate=0) as w:
        out = migrate(w.pid, store, SendOptions(then="stop"))
        s = out.source
        assert s["status"] == "completed", s.get("error")
        assert s["dest_reports"] == 0 and s["dest_wait_ms"] == 0
        assert s["dest_backlog"] is None
        assert all(r["dest_wait_ms"] == 0 for r in s["rounds"])
        compare(store, s["image_id"], w.pid)
        os.kill(w.pid, signal.SIGCONT)


def test_the_summary_says_how_long_the_source_waited_for_the_destinations_disk():
    from migrated.cli.send import summary_lines
    s = {"status": "completed", "freeze_ms": 40.0, "total_ms": 2100.0, "bytes_sent": 64 << 20,
         "rounds": [{}, {}], "dest_wait_ms": 812.4}
    assert "waited 812 ms for the destination's disk" in summary_lines(s)[-1]
    assert "waited" not in summary_lines(s | {"dest_wait_ms": 0.0})[-1]
