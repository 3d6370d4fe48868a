"""In-doubt records (migrated/daemon/indoubt.py): written before Release,
settled on Released, resolved by a withdrawal after a failure or after our
own restart.  Real child processes stand for targets; the withdrawal
itself is an injected callable here (the wire side is tested in
tests/engine/test_three_way_commit.py and by the fault matrix)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from migrated.daemon import indoubt as ind
from migrated.daemon.indoubt import InDoubt, Pending
from migrated.engine.withdraw import WithdrawRefused
from migrated.kernel.procfs import read_starttime

from .conftest import wait_state


class Log:
    def __init__(self):
        self.lines: list[tuple] = []

    def line(self, event, mid=None, level="info", **fields):
        self.lines.append((level, event, mid, fields))

    def info(self, event, mid=None, **f):
        self.line(event, mid, "info", **f)

    def warning(self, event, mid=None, **f):
        self.line(event, mid, "warning", **f)

    def error(self, event, mid=None, **f):
        self.line(event, mid, "error", **f)

    def events(self) -> list[str]:
        return [e for _, e, _, _ in self.lines]


class Attempts:
    """Counts withdrawal attempts; fails the first ``failures`` of them."""

    def __init__(self, failures: int = 0, outcome: str = "removed", refuse: bool = False):
        self.calls: list[str] = []
        self.failures = failures
        self.outcome = outcome
        self.refuse = refuse
        self.done = threading.Event()

    def __call__(self, rec: Pending) -> str:
        self.calls.append(rec.mid)
        if self.refuse:
            self.done.set()
            raise WithdrawRefused("auth: not yours")
        if len(self.calls) <= self.failures:
            raise ConnectionRefusedError("peer down")
        self.done.set()
        return self.outcome


def _rec(pid: int, mid: str = "m1") -> Pending:
    return Pending(mid=mid, pid=pid, starttime=read_starttime(pid), host="127.0.0.1",
                   port=9, image_id="20260101-000000.000-0123456789", since=time.time())


def _wait_settled(d: InDoubt, mid: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while d.has(mid) and time.monotonic() < end:
        time.sleep(0.02)
    assert not d.has(mid)


def test_record_is_durable_and_settle_removes_it(tmp_path, children):
    p = children()
    d = InDoubt(str(tmp_path), Log(), Attempts())
    d.record(_rec(p.pid))
    path = os.path.join(d.dir, "m1.json")
    rec = json.load(open(path))
    assert rec["pid"] == p.pid and rec["image_id"].startswith("2026")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    d.settle("m1")
    assert not d.has("m1")
    d.settle("m1")                     # idempotent
    assert d.resolve("m1") is False    # nothing to resolve


def test_resolve_retries_until_the_destination_answers(tmp_path, children, monkeypatch):
    monkeypatch.setattr(ind, "RETRY_FIRST_S", 0.05)
    p = children()
    log, att = Log(), Attempts(failures=2)
    d = InDoubt(str(tmp_path), log, att)
    d.record(_rec(p.pid))
    assert d.resolve("m1") is True
    _wait_settled(d, "m1")
    assert att.calls == ["m1"] * 3
    assert log.events().count("withdraw_retry") == 2 and "withdraw_done" in log.events()


def test_a_refusal_is_final_and_logged_for_the_operator(tmp_path, children):
    p = children()
    log = Log()
    d = InDoubt(str(tmp_path), log, Attempts(refuse=True))
    d.record(_rec(p.pid))
    d.resolve("m1")
    _wait_settled(d, "m1")
    errs = [f for lv, e, _, f in log.lines if e == "withdraw_refused"]
    assert errs and "not yours" in errs[0]["error"] and "images list" in errs[0]["hint"]


def test_restart_withdraws_only_where_the_process_runs_here(tmp_path, children):
    running, stopped, gone = children(), children(), children()
    d = InDoubt(str(tmp_path), Log(), Attempts())
    for mid, p in (("run", running), ("stop", stopped), ("gone", gone)):
        d.record(_rec(p.pid, mid))
    os.kill(stopped.pid, signal.SIGSTOP)       # --then stop had been applied
    assert wait_state(stopped.pid, "T")
    gone.kill()                                 # --then kill had been applied
    gone.wait()
    with open(os.path.join(d.dir, "torn.json.tmp"), "w") as f:
        f.write("{")                            # Release was never sent after it
    att = Attempts()
    d2 = InDoubt(str(tmp_path), Log(), att)
    out = d2.resume()
    assert out == {"withdrawing": ["run"], "completed": ["gone", "stop"]}
    _wait_settled(d2, "run")
    assert att.calls == ["run"]
    assert os.listdir(d2.dir) == []
    os.kill(stopped.pid, signal.SIGCONT)


def test_a_recycled_pid_is_not_our_process(tmp_path, children):
    p = children()
    d = InDoubt(str(tmp_path), Log(), Attempts())
    rec = _rec(p.pid)
    d.record(Pending(**{**rec.__dict__, "starttime": rec.starttime + 1}))
    out = InDoubt(str(tmp_path), Log(), Attempts()).resume()
    assert out == {"withdrawing": [], "completed": ["m1"]}


def test_a_record_from_an_earlier_boot_keeps_the_image(tmp_path, children):
    """The machine rebooted inside the Release/Released window: the process
    is gone, so the destination's image is the only copy.  A process now
    running with the record's PID and start time (both repeat across boots
    for early services) is someone else's and must not make us withdraw."""
    p = children()
    d = InDoubt(str(tmp_path), Log(), Attempts())
    rec = _rec(p.pid)
    assert rec.boot_id == ""                    # none named: record() writes this boot's
    d.record(Pending(**{**rec.__dict__, "boot_id": "0" * 8 + "-0000-4000-8000-" + "0" * 12}))
    att = Attempts()
    log = Log()
    out = InDoubt(str(tmp_path), log, att).resume()
    assert out == {"withdrawing": [], "completed": ["m1"]}
    assert att.calls == []
    assert "rebooted" in [f for _, e, _, f in log.lines if e == "indoubt_settled"][0]["reason"]
    # The same record written in this boot is judged by the process: withdrawn.
    d.record(Pending(**{**rec.__dict__, "boot_id": ind.boot_id()}))
    assert InDoubt(str(tmp_path), Log(), Attempts()).resume()["withdrawing"] == ["m1"]


# The last two ended resume() (the daemon's start) with OverflowError and
# RecursionError before they were caught (found by fuzzing the state dir).
@pytest.mark.parametrize("content", [b"{", b"[]", b'{"mid": "other", "pid": 1}', b"x" * 5000,
                                     b'{"mid": "m9", "pid": 1, "starttime": 1, "host": "h", '
                                     b'"port": 1, "image_id": "i", "since": 1' + b"0" * 400 + b"}",
                                     b"[" * 2000])
def test_bad_records_are_reported_not_trusted(tmp_path, content):
    log = Log()
    d = InDoubt(str(tmp_path), log, Attempts())
    with open(os.path.join(d.dir, "m9.json"), "wb") as f:
        f.write(content)
    assert d.resume() == {"withdrawing": [], "completed": []}
    assert "indoubt_bad_record" in log.events()


def test_unwritable_dir_refuses_to_release(tmp_path, children):
    p = children()
    d = InDoubt(str(tmp_path), Log(), Attempts())
    os.rmdir(d.dir)
    with open(d.dir, "w"):
        pass                             # a file where the directory was
    with pytest.raises(Exception, match="not releasing"):
        d.record(_rec(p.pid))


def test_pending_lists_withdrawals_in_progress_until_closed(tmp_path, children, monkeypatch):
    monkeypatch.setattr(ind, "RETRY_FIRST_S", 0.05)
    p = children()
    d = InDoubt(str(tmp_path), Log(), Attempts(failures=10 ** 6))
    d.record(_rec(p.pid))
    d.resolve("m1")
    assert d.pending() == ["m1"]
    d.close()                             # daemon shutdown: the record stays
    end = time.monotonic() + 5
    while d.pending() and time.monotonic() < end:
        time.sleep(0.02)
    assert d.pending() == [] and d.has("m1")


def test_a_failed_verdict_is_withdrawn_after_a_restart_whatever_the_process_does(
        tmp_path, children, monkeypatch):
    """The migration failed after Release (the process was thawed and ran
    on); the destination was unreachable, then the process stopped (or
    exited) and the daemon restarted.  The record's verdict says the source
    decided "failed": the image must still go (it was kept, "the migration
    completed", because the process looked like --then had run)."""
    monkeypatch.setattr(ind, "RETRY_FIRST_S", 30.0)     # the first attempt fails, then waits
    stopped, gone = children(), children()
    first = Attempts(failures=10)
    d = InDoubt(str(tmp_path), Log(), first)
    for mid, p in (("stop", stopped), ("gone", gone)):
        d.record(_rec(p.pid, mid))
        assert d.resolve(mid) is True
    end = time.monotonic() + 10
    while len(first.calls) < 2 and time.monotonic() < end:
        time.sleep(0.02)
    d.close()                                   # the daemon goes away, records stay
    for mid in ("stop", "gone"):
        assert json.load(open(os.path.join(d.dir, f"{mid}.json")))["verdict"] == "failed"
    os.kill(stopped.pid, signal.SIGSTOP)
    assert wait_state(stopped.pid, "T")
    gone.kill()
    gone.wait()
    att = Attempts()
    d2 = InDoubt(str(tmp_path), Log(), att)
    out = d2.resume()
    assert out == {"withdrawing": ["gone", "stop"], "completed": []}
    _wait_settled(d2, "gone")
    _wait_settled(d2, "stop")
    assert sorted(att.calls) == ["gone", "stop"]
    os.kill(stopped.pid, signal.SIGCONT)


def test_giving_up_is_timed_in_this_run_not_from_the_record(tmp_path, children, monkeypatch):
    """A record written more than GIVE_UP_S ago (a daemon down for a day, a
    clock that stepped): the resolver still tries, and retries, in this run
    -- it gave up after its first failed attempt."""
    monkeypatch.setattr(ind, "RETRY_FIRST_S", 0.02)
    p = children()
    log, att = Log(), Attempts(failures=3)
    d = InDoubt(str(tmp_path), log, att)
    rec = _rec(p.pid)
    d.record(Pending(**{**rec.__dict__, "since": time.time() - ind.GIVE_UP_S - 3600}))
    assert d.resolve("m1") is True
    _wait_settled(d, "m1")
    assert "withdraw_gave_up" not in log.events() and "withdraw_done" in log.events()
    assert len(att.calls) == 4


def test_giving_up_needs_time_and_attempts(tmp_path, children, monkeypatch):
    monkeypatch.setattr(ind, "RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(ind, "RETRY_MAX_S", 0.01)
    monkeypatch.setattr(ind, "GIVE_UP_S", 0.0)
    p = children()
    log, att = Log(), Attempts(failures=10**6)
    d = InDoubt(str(tmp_path), log, att)
    d.record(_rec(p.pid))
    d.resolve("m1")
    _wait_settled(d, "m1")
    assert "withdraw_gave_up" in log.events()
    assert len(att.calls) == ind.GIVE_UP_MIN_ATTEMPTS
