"""freezer.py on real children: all threads stopped, thawed, left alone."""

import os
import signal
import time

import pytest

from migrated.errors import FreezeTimeout, NoSuchProcess, ZombieProcess
from migrated.kernel import procfs
from migrated.kernel.freezer import Freezer
from migrated.kernel.reader import MemReader


def states(pid):
    return procfs.read_task_states(pid)


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return False


def all_running(pid):
    return all(s not in "Tt" for s in states(pid).values())


def test_parse_stat_after_last_paren():
    line = "4242 (a) R (b c)) S 17 4242 1 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 3 0 98765 0 0"
    st = procfs.parse_stat(line)
    assert (st.pid, st.comm, st.state, st.ppid, st.num_threads, st.starttime) == (
        4242, "a) R (b c)", "S", 17, 3, 98765)


def test_stat_of_child_with_odd_comm(target):
    target.comm("x) T (y z")
    st = procfs.read_stat(target.pid)
    assert st.comm == "x) T (y z" and st.state in "SR" and st.ppid == os.getpid()
    assert procfs.read_cmdline(target.pid)[-1].endswith("target.py")
    assert procfs.read_exe(target.pid).startswith("/")
    assert procfs.read_uids(target.pid)[0] == os.getuid()
    assert procfs.list_tasks(target.pid)[0] == target.pid


def test_multithreaded_target_fully_stopped(target):
    tids = target.threads(4)
    journal = []
    with Freezer(target.pid, on_freeze=lambda p, st: journal.append(("freeze", p, st)),
                 on_thaw=lambda p: journal.append(("thaw", p))) as fz:
        assert not fz.was_stopped
        ms = fz.freeze()
        assert ms >= 0 and fz.is_frozen
        st = states(target.pid)
        assert set(tids) <= set(st) and len(st) >= 5
        assert set(st.values()) == {"T"}
        assert fz.verify_frozen()
        assert fz.freeze() == 0.0          # idempotent
        assert fz.thaw() is True
        assert fz.thaw() is False          # idempotent
        assert wait_for(lambda: all_running(target.pid))
    starttime = procfs.read_starttime(target.pid)
    assert journal == [("freeze", target.pid, starttime), ("thaw", target.pid)]
    target.tids()                           # still answering


def test_frozen_means_no_writes(target):
    target.map("s", 16)
    target.spin("s")                         # a thread writing flat out
    r = MemReader(target.pid)
    fz = Freezer(target.pid)
    try:
        with fz.frozen():
            a = r.read_range(target.addr("s"), 16 * 4096)
            time.sleep(0.05)
            b = r.read_range(target.addr("s"), 16 * 4096)
            assert a == b
        time.sleep(0.05)
        assert r.read_range(target.addr("s"), 16 * 4096) != b   # running again
    finally:
        fz.close()
    assert target.stop_spin("s") > 0


def test_threads_born_during_freeze(target):
    target.churn(500)                        # a new thread every 2 ms
    with Freezer(target.pid) as fz:
        for _ in range(5):
            with fz.frozen():
                st = states(target.pid)
                assert st and set(st.values()) <= set("Tt"), st
                time.sleep(0.01)
                # nothing new was born while stopped
                assert set(states(target.pid)) == set(st)


def test_already_stopped_target_left_stopped(target):
    os.kill(target.pid, signal.SIGSTOP)
    try:
        assert wait_for(lambda: set(states(target.pid).values()) == {"T"})
        fz = Freezer(target.pid)
        assert fz.was_stopped
        with fz.frozen():
            assert set(states(target.pid).values()) == {"T"}
        assert fz.thaw() is False
        fz.close()
        time.sleep(0.05)
        assert set(states(target.pid).values()) == {"T"}   # never SIGCONTed
    finally:
        os.kill(target.pid, signal.SIGCONT)
    assert wait_for(lambda: all_running(target.pid))


def test_context_manager_thaws_on_exception(target):
    target.threads(2)
    fz = Freezer(target.pid)
    with pytest.raises(RuntimeError, match="boom"):
        with fz.frozen():
            assert set(states(target.pid).values()) == {"T"}
            raise RuntimeError("boom")
    assert not fz.is_frozen
    assert wait_for(lambda: all_running(target.pid))
    fz.close()


def test_close_thaws(target):
    fz = Freezer(target.pid)
    fz.freeze()
    fz.close()
    assert wait_for(lambda: all_running(target.pid))


def test_exited_pid(target):
    pid = target.pid
    target.close()
    with pytest.raises(NoSuchProcess, match=str(pid)):
        Freezer(pid)


def test_target_exits_before_freeze(target):
    fz = Freezer(target.pid)
    try:
        target.proc.stdin.write(b"exit 0\n")   # no reap: it stays a zombie
        # the child is now a zombie (not reaped yet) or gone
        assert wait_for(fz.exited)
        with pytest.raises((NoSuchProcess, ZombieProcess), match=str(target.pid)):
            fz.freeze()
        assert not fz.is_frozen
    finally:
        fz.close()


def test_zombie(target):
    target.proc.stdin.write(b"exit 0\n")
    assert wait_for(lambda: procfs.read_state(target.pid) == "Z")
    with pytest.raises(ZombieProcess, match="zombie"):
        Freezer(target.pid)


def test_recycled_pid_detected(target):
    fz = Freezer(target.pid)
    try:
        # Another process at the same PID has another start time.
        fz.starttime -= 1
        with pytest.raises(NoSuchProcess, match="reused"):
            fz.freeze()
    finally:
        fz.close()
    assert all_running(target.pid)


def _v2_cgroup_root():
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.exists(os.path.join(root, "cgroup.procs")) and \
                os.access(root, os.W_OK) and \
                not os.path.exists(os.path.join(root, "cgroup.freeze")):
            return root
    return None


def test_timeout_when_threads_cannot_stop(target, tmp_path):
    """A cgroup-v2-frozen process cannot act on SIGSTOP (threads stay S):
    freeze must time out with a clear message and not leave a SIGSTOP
    behind."""
    root = _v2_cgroup_root()
    if root is None:
        pytest.skip("no writable cgroup v2 hierarchy to freeze a process with")
    cg = os.path.join(root, f"migrated-test-{os.getpid()}-{target.pid}")
    try:
        os.mkdir(cg)
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(target.pid))
        with open(os.path.join(cg, "cgroup.freeze"), "w") as f:
            f.write("1")
    except OSError as e:
        if os.path.isdir(cg):
            os.rmdir(cg)
        pytest.skip(f"cannot use cgroup v2 freezer here: {e}")
    try:
        assert wait_for(lambda: "frozen 1" in open(os.path.join(cg, "cgroup.events")).read())
        fz = Freezer(target.pid)
        with pytest.raises(FreezeTimeout, match=rf"process {target.pid}: .* did not stop"):
            fz.freeze(timeout=0.2)
        assert not fz.is_frozen
        fz.close()
        with open(os.path.join(cg, "cgroup.freeze"), "w") as f:
            f.write("0")
        time.sleep(0.05)
        assert all_running(target.pid)      # the SIGSTOP was cancelled
        target.tids()
    finally:
        with open(os.path.join(cg, "cgroup.freeze"), "w") as f:
            f.write("0")
        target.close()
        assert wait_for(lambda: "populated 0" in open(os.path.join(cg, "cgroup.events")).read())
        os.rmdir(cg)
