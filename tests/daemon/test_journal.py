"""The frozen-PID journal: what we froze is thawed after our crash, and
nothing else is ever touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap

from migrated.daemon.journal import FrozenJournal
from migrated.kernel.procfs import read_starttime

from .conftest import PY, ROOT, proc_state, wait_state


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    assert wait_state(pid, "T")


def test_record_is_durable_file_then_removed(tmp_path, children):
    j = FrozenJournal(str(tmp_path))
    p = children()
    j.on_freeze(p.pid, read_starttime(p.pid), "mid1")
    path = os.path.join(j.dir, f"{p.pid}.json")
    rec = json.load(open(path))
    assert rec["pid"] == p.pid and rec["mid"] == "mid1" and rec["starttime"] > 0
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert [r.pid for r in j.records()] == [p.pid]
    j.on_thaw(p.pid)
    assert j.records() == [] and not os.path.exists(path)
    j.on_thaw(p.pid)   # idempotent


def test_replay_thaws_what_we_froze(tmp_path, children):
    j = FrozenJournal(str(tmp_path))
    p = children()
    j.on_freeze(p.pid, read_starttime(p.pid))
    stop(p.pid)
    res = FrozenJournal(str(tmp_path)).replay()
    assert res.thawed == [p.pid]
    assert wait_state(p.pid, "S"), proc_state(p.pid)
    assert j.records() == []


def test_replay_leaves_others_stopped_processes_alone(tmp_path, children):
    j = FrozenJournal(str(tmp_path))
    ours, theirs = children(), children()
    j.on_freeze(ours.pid, read_starttime(ours.pid))
    stop(ours.pid)
    stop(theirs.pid)                    # stopped by someone else: no record
    res = j.replay()
    assert res.thawed == [ours.pid]
    assert wait_state(ours.pid, "S")
    assert proc_state(theirs.pid) == "T"
    os.kill(theirs.pid, signal.SIGCONT)


def test_replay_ignores_recycled_pid(tmp_path, children):
    """A record whose start time differs is another process on a reused PID."""
    j = FrozenJournal(str(tmp_path))
    p = children()
    j.on_freeze(p.pid, read_starttime(p.pid) - 1)     # "the process we froze earlier"
    stop(p.pid)
    res = j.replay()
    assert res.thawed == [] and res.gone == [p.pid]
    assert proc_state(p.pid) == "T"
    assert j.records() == []                          # stale record cleared
    os.kill(p.pid, signal.SIGCONT)


def test_replay_skips_exited_and_other_boot(tmp_path, children):
    j = FrozenJournal(str(tmp_path))
    gone = children("true")
    gone.wait()
    j.on_freeze(gone.pid, 12345)
    p = children()
    j.on_freeze(p.pid, read_starttime(p.pid))
    stop(p.pid)
    path = os.path.join(j.dir, f"{p.pid}.json")
    rec = json.load(open(path))
    rec["boot_id"] = "another-boot"
    with open(path, "w") as f:
        json.dump(rec, f)
    res = j.replay()
    assert sorted(res.gone) == sorted([gone.pid, p.pid]) and not res.thawed
    assert proc_state(p.pid) == "T"
    os.kill(p.pid, signal.SIGCONT)


def test_torn_and_bad_records(tmp_path):
    j = FrozenJournal(str(tmp_path))
    open(os.path.join(j.dir, "77.json.tmp.1"), "w").write('{"pid": 7')
    open(os.path.join(j.dir, "78.json"), "w").write("garbage")
    open(os.path.join(j.dir, "79.json"), "w").write(json.dumps({"pid": 80, "starttime": 1}))
    assert j.records() == []
    assert not os.path.exists(os.path.join(j.dir, "77.json.tmp.1"))


# A stand-in for a daemon that journals, freezes its target, then dies.
_FREEZER = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    from migrated.daemon.journal import FrozenJournal
    from migrated.kernel.procfs import read_starttime
    pid = int(sys.argv[2])
    FrozenJournal(sys.argv[1]).on_freeze(pid, read_starttime(pid), "crashy")
    os.kill(pid, signal.SIGSTOP)
    print("frozen", flush=True)
    time.sleep(600)
""")


def test_sigkilled_freezer_then_thaw_journal(tmp_path, children):
    """Our crash: the journaling process is SIGKILLed with the target frozen;
    `migrated --thaw-journal` (ExecStopPost) thaws it."""
    state = str(tmp_path / "state")
    target = children()
    crashy = children(PY, "-c", _FREEZER.format(root=ROOT), state, str(target.pid),
                      stdout=subprocess.PIPE)
    assert crashy.stdout.readline().strip() == b"frozen"
    assert wait_state(target.pid, "T")
    crashy.kill()
    crashy.wait()
    assert proc_state(target.pid) == "T"
    r = subprocess.run([PY, "-m", "migrated.daemon.main", "--config", "/dev/null",
                        "--state-dir", state, "--thaw-journal"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "journal_thawed" in r.stderr and "mid=crashy" in r.stderr
    assert wait_state(target.pid, "S")


def test_daemon_start_replays_and_thaw_journal_refuses_while_running(daemons, children):
    d_base = daemons.base
    state = os.path.join(d_base, "n1-state")
    target = children()
    FrozenJournal(state).on_freeze(target.pid, read_starttime(target.pid), "old")
    stop(target.pid)
    d = daemons("n1")                     # insecure daemon on this state dir
    assert wait_state(target.pid, "S")
    assert "journal_thawed" in d.log()
    r = subprocess.run([PY, "-m", "migrated.daemon.main", "--config", "/dev/null",
                        "--state-dir", state, "--thaw-journal"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 1 and "another migrated is running" in r.stderr


def test_bad_records_never_stop_the_replay(tmp_path, children):
    """Values no PID can have (infinity, a number past any pid_max) and a
    record nested past the JSON parser (RecursionError, not ValueError:
    found by fuzzing the state dir, it ended the replay and the frozen
    process after it stayed stopped) are logged and kept; the records
    after them are still replayed."""
    j = FrozenJournal(str(tmp_path))
    open(os.path.join(j.dir, "1.json"), "w").write('{"pid": Infinity, "starttime": 1}')
    open(os.path.join(j.dir, "2.json"), "w").write("[" * 2000)
    open(os.path.join(j.dir, "10000000000000000000.json"), "w").write(
        '{"pid": 10000000000000000000, "starttime": 1}')
    open(os.path.join(j.dir, "5.json"), "w").write('{"pid": 5, "starttime": -1}')
    p = children()
    j.on_freeze(p.pid, read_starttime(p.pid))
    stop(p.pid)
    res = j.replay()
    assert res.thawed == [p.pid]
    assert wait_state(p.pid, "S")
    assert sorted(os.listdir(j.dir)) == sorted(["1.json", "2.json", "10000000000000000000.json",
                                                "5.json"])


def _release(fifo: str) -> None:
    """Let a target thread out of its wait in the kernel (Target.dwait)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass        # no reader (any more): nothing waits on it


def _sigstop_pending(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        masks = [int(line.split()[1], 16) for line in f
                 if line.startswith(("ShdPnd:", "SigPnd:"))]
    return any(m & (1 << (signal.SIGSTOP - 1)) for m in masks)


def test_replay_cancels_a_stop_that_has_not_taken_hold(tmp_path, target):
    """The daemon sent SIGSTOP to a target whose only thread was in the
    kernel (D: I/O, a vfork) and died before the stop took hold.  The
    replay must SIGCONT it although it is not in T yet -- else the stop
    takes hold later with no record left to undo it."""
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    target.dwait(fifo, main=True)
    assert wait_state(target.pid, "D")
    state = str(tmp_path / "state")
    FrozenJournal(state).on_freeze(target.pid, read_starttime(target.pid), "crashed")
    os.kill(target.pid, signal.SIGSTOP)          # ... and the daemon died
    assert _sigstop_pending(target.pid) and proc_state(target.pid) == "D"
    res = FrozenJournal(state).replay()
    assert res.thawed == [target.pid] and FrozenJournal(state).records() == []
    _release(fifo)
    target.cmd("tids", timeout=5)                # it answers: it runs
    assert proc_state(target.pid) != "T"


def test_thaw_journal_does_not_depend_on_a_valid_config(tmp_path, children):
    """ExecStopPost's `migrated --thaw-journal` with a config the daemon
    itself would refuse (a typo, TOML that does not parse) still thaws,
    from --state-dir or else the file's state-dir."""
    state = str(tmp_path / "state")
    typo = tmp_path / "typo.toml"
    typo.write_text(f'state-dir = "{state}"\nmax-migration = 8\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("state-dir = [\n")
    for args in (["--config", str(typo)],
                 ["--config", str(broken), "--state-dir", state]):
        p = children()
        FrozenJournal(state).on_freeze(p.pid, read_starttime(p.pid), "cfg")
        stop(p.pid)
        r = subprocess.run([PY, "-m", "migrated.daemon.main", *args, "--thaw-journal"],
                           capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert "no process stays frozen" in r.stderr and state in r.stderr
        assert "journal_thawed" in r.stderr
        assert wait_state(p.pid, "S")
    # Without --thaw-journal the same config still stops the daemon.
    r = subprocess.run([PY, "-m", "migrated.daemon.main", "--config", str(typo), "--insecure"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 2 and "unknown key 'max-migration'" in r.stderr
