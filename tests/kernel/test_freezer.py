"""freezer.py on real children: all threads stopped, thawed, left alone."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from migrated.errors import (FreezeTimeout, NoSuchProcess, TargetSharesMemory, TargetTraced,
                             ZombieProcess)
from migrated.kernel import freezer, procfs
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


def _release(fifo, timeout: float = 10.0):
    """Let the target's thread out of its wait in the kernel (Target.dwait).
    The spawned child may not have reached its open of the FIFO yet (its
    parent thread is in D from the vfork on): until it has, an open for
    writing finds no reader (ENXIO) and would release nothing -- retry."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                return      # no reader (any more): nothing waits on it
        time.sleep(0.005)


def test_stop_by_someone_else_not_yet_complete_is_not_ours(target, tmp_path, monkeypatch):
    """Someone stopped the target before us, but one thread is in the kernel
    (D) and joins the stop only when it leaves: the stop is not ours, so
    neither a timeout nor a thaw may SIGCONT it."""
    # The D state here is a vfork's, whose child shares the address space
    # (test_a_process_sharing_the_address_space_is_refused); a thread in D
    # on a disk or NFS has no such child.  Only the stop is under test.
    monkeypatch.setattr(freezer, "_sharing_mm", lambda pid: [])
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    tid = target.dwait(fifo)
    assert wait_for(lambda: states(target.pid).get(tid) == "D")
    os.kill(target.pid, signal.SIGSTOP)            # not us
    try:
        assert wait_for(lambda: states(target.pid).get(target.pid) == "T")
        assert states(target.pid)[tid] == "D"
        fz = Freezer(target.pid)
        assert fz.was_stopped
        with pytest.raises(FreezeTimeout):
            fz.freeze(timeout=0.2)
        time.sleep(0.05)
        assert states(target.pid)[target.pid] == "T"     # no SIGCONT on the timeout
        _release(fifo)
        fz.freeze(timeout=5.0)                           # waits for the D thread
        assert fz.was_stopped and set(states(target.pid).values()) <= {"T"}
        assert fz.thaw() is False
        fz.close()
        time.sleep(0.05)
        assert set(states(target.pid).values()) <= {"T"}  # still theirs, still stopped
    finally:
        os.kill(target.pid, signal.SIGCONT)


_SEIZE = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:   # PTRACE_SEIZE
    sys.exit(f"seize: errno {ctypes.get_errno()}")
print("seized", flush=True)
time.sleep(600)
"""


def test_target_traced_by_another_process_is_refused(target):
    """A debugger or strace may swallow our SIGSTOP, and its tracing stops
    look like a freeze: such a target is neither frozen nor taken as
    stopped, at the start and at the freeze."""
    fz = Freezer(target.pid)                     # not traced yet
    journal = []
    fz.on_freeze = lambda pid, st: journal.append(pid)
    tracer = subprocess.Popen([sys.executable, "-c", _SEIZE, str(target.pid)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline().strip() == "seized"
        with pytest.raises(TargetTraced, match=rf"process {target.pid} is traced by "
                                               rf"process {tracer.pid}.*detach the tracer"):
            Freezer(target.pid)
        with pytest.raises(TargetTraced):
            fz.freeze()
        assert journal == [] and not fz.is_frozen
        assert all_running(target.pid)
        fz.close()
    finally:
        tracer.kill()
        tracer.wait()
    target.tids()


def test_still_frozen_sees_a_sigcont_behind_our_back(target):
    target.threads(2)
    fz = Freezer(target.pid)
    fz.freeze()
    assert fz.still_frozen()
    os.kill(target.pid, signal.SIGCONT)          # someone else
    assert wait_for(lambda: all_running(target.pid))
    assert not fz.still_frozen()
    fz.close()


def test_a_process_sharing_the_address_space_is_refused(target, tmp_path):
    """SIGSTOP stops a thread group, not an address space: a vfork child
    that has not exec'd yet (or a clone(CLONE_VM) child) writes on while
    the target is frozen.  Refused at the start and just before a freeze."""
    fz = Freezer(target.pid)
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    target.dwait(fifo)

    def children():
        return [int(c) for t in states(target.pid)
                for c in open(f"/proc/{target.pid}/task/{t}/children").read().split()]

    assert wait_for(children)
    with pytest.raises(TargetSharesMemory, match=rf"process {target.pid} shares its "
                                                 rf"memory with process\(es\) {children()[0]}"):
        Freezer(target.pid)
    with pytest.raises(TargetSharesMemory):
        fz.check_alone()
    _release(fifo)
    assert wait_for(lambda: not freezer._sharing_mm(target.pid), 30.0), \
        freezer._sharing_mm(target.pid)
    fz.check_alone()
    fz.close()


def test_still_frozen_sees_a_thread_that_ran_and_stopped_again(target):
    """SIGCONT then SIGSTOP by someone else between our checks: every thread
    is stopped again, but they ran (and may have written)."""
    target.threads(2)
    fz = Freezer(target.pid)
    fz.freeze()
    fz.mark_quiescent()
    assert fz.still_frozen()
    os.kill(target.pid, signal.SIGCONT)
    time.sleep(0.05)
    os.kill(target.pid, signal.SIGSTOP)
    assert wait_for(lambda: set(states(target.pid).values()) == {"T"})
    assert not fz.still_frozen()
    fz.close()


def test_a_thread_just_stopped_is_not_taken_for_one_that_ran(target):
    """A thread shows state T a moment before it is off its CPU (and, if
    preempted on the way, stays queued in state T): its run time grows
    once more when it is switched out.  Noted right after the freeze, that
    looked like a thread resumed behind our back -- a follow-up migration
    of a busy target failed so in CI ("resumed by another process
    (SIGCONT) while its final delta was read").  mark_quiescent now waits
    until every thread is off the run queue: a spinning thread is on it
    (wchan 0), a stopped one is not.  (The race itself is rare: the loop
    below is a stress check, the wchan checks are what can fail.)"""
    target.map("a", 64)
    target.threads(2)
    target.spin("a")
    assert not freezer._all_descheduled(target.pid)     # the spinner runs
    fz = Freezer(target.pid)
    try:
        for _ in range(30):
            fz.freeze()
            fz.mark_quiescent()
            assert freezer._all_descheduled(target.pid)
            time.sleep(0.002)
            assert fz.still_frozen()
            fz.thaw()
            time.sleep(0.002)
    finally:
        fz.close()
