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
        # The wait is on the round it preceded (the final one, if the
        # collection after it ended pre-copy); the rounds add up to the total.
        assert s["rounds"][0]["dest_wait_ms"] == 0 and s["dest_wait_ms"] > 0
        assert sum(r["dest_wait_ms"] for r in s["rounds"]) == pytest.approx(
            s["dest_wait_ms"], abs=0.01 * len(s["rounds"]))
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


class _Pessimist(dest_mod.DestMigration):
    """A destination whose reports say its disk needs ``FLUSH_MS`` more,
    every time, and never reports a finished flush."""
    FLUSH_MS = 0.0

    def _backlog_report(self):
        from migrated.wire import Backlog
        return Backlog(self.channel.conn.round - 1, 1 << 30, self.FLUSH_MS)

    def _report_flushed(self) -> None:
        pass


def test_a_destination_that_says_its_disk_takes_forever_cannot_hold_the_source(store):
    # Longer than the whole timeout budget: not worth waiting for, and a
    # commit that would wait for it does not fit either -- so the source
    # gives up before freezing (the policy's timeout rule), at once, says
    # why, and its process never stopped.
    class Forever(_Pessimist):
        FLUSH_MS = 1e12

    with workload(mib=16, rate=0) as w:
        out = migrate(w.pid, store, SendOptions(then="resume", timeout_s=60),
                      dest_class=Forever)
        s = out.source
        assert s["status"] == "failed" and s["error_code"] == "timeout"
        assert "expects" in s["error"] and "durable" in s["error"]
        assert s["total_ms"] < 10000 and s["dest_wait_ms"] < 5000
        assert s["freeze_ms"] is None
        assert not [e for e in out.events if e["event"] == "freeze"]
    assert not os.listdir(store.partial_dir)


def test_a_report_ages_so_a_destination_gone_quiet_is_waited_for_only_as_long_as_it_said(
        store):
    class Slow(_Pessimist):
        FLUSH_MS = 1500.0

    with workload(mib=16, rate=0) as w:
        out = migrate(w.pid, store, SendOptions(then="stop", max_rounds=1), dest_class=Slow)
        s = out.source
        assert s["status"] == "completed", s.get("error")
        # One wait (before the final collection), as long as the report said
        # less the 5% share, give or take scheduling; then the freeze.
        assert 1300 <= s["dest_wait_ms"] <= 6000, s["dest_wait_ms"]
        compare(store, s["image_id"], w.pid)
        os.kill(w.pid, signal.SIGCONT)


def test_the_source_waits_for_the_answer_to_its_round_end_however_late(store):
    # A destination slow to read a round (a slow link, a busy disk) answers
    # late; the source takes that answer before it collects again, rather
    # than going on blind after a fixed time.
    class Late(dest_mod.DestMigration):
        def _backlog_report(self):
            import time as _t
            _t.sleep(2.5)
            return super()._backlog_report()

        def _report_flushed(self) -> None:
            pass

    with workload(mib=16, rate=0) as w:
        out = migrate(w.pid, store, SendOptions(then="resume", max_rounds=1),
                      dest_class=Late)
        s = out.source
        assert s["status"] == "completed", s.get("error")
        assert s["dest_reports"] >= 1 and s["dest_backlog"]["round"] == 0
        # The wait for the answer is the round's own time (it was on its way
        # to the destination until then), not a wait for its disk.
        r0 = s["rounds"][0]
        assert r0["duration_ms"] >= 2400 and r0["send_ms"] < r0["duration_ms"]
        assert s["dest_wait_ms"] < 2400


def test_a_report_that_crosses_the_commit_request_is_taken_not_refused(store):
    # A flush ending just as the source freezes: its report reaches the
    # source while it waits for Committed (legal up to COMMIT_SENT).
    class Crossing(dest_mod.DestMigration):
        def _prepare(self, req):
            self.channel.send_event(self._backlog_report())
            return super()._prepare(req)

    with workload(mib=16, rate=0) as w:
        out = migrate(w.pid, store, SendOptions(then="stop"), dest_class=Crossing)
        s = out.source
        assert s["status"] == "completed", s.get("error")
        assert s["dest_reports"] >= 2
        compare(store, s["image_id"], w.pid)
        os.kill(w.pid, signal.SIGCONT)
