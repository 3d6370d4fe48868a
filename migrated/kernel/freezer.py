"""Freezer: stop every thread of a process with SIGSTOP, and let it go.

Signals go through a pidfd opened at construction, so a recycled PID is
never hit; the start time read from /proc/PID/stat at the same moment
guards the /proc reads against recycling too.

A process someone else stopped before we came is left exactly as it was:
we neither SIGSTOP nor SIGCONT it, we only wait until every thread has
stopped.  "Stopped before we came" means a stop is under way: some thread
is in job-control stop (T), or a SIGSTOP is pending for the process -- a
thread in uninterruptible sleep (D: I/O, NFS, FUSE, a vfork) joins the
group stop only when it leaves the kernel, so "every thread in T" would
miss a stop that has not finished, and our SIGCONT would undo it.

A process traced by another process (a debugger, strace) is refused
(TargetTraced): a tracer may swallow or undo our SIGSTOP, and a thread in
a tracing stop (t) at a syscall looks stopped while the process runs on.
So is one whose address space another process shares (TargetSharesMemory,
``check_alone``): SIGSTOP stops a thread group, not an address space.

A freeze must also hold while the final delta is read.  Someone else's
SIGCONT (job control, a supervisor) may resume the process, and a SIGSTOP
after it may stop it again before we look: ``mark_quiescent`` notes every
thread's CPU time (schedstat) once the freeze is complete, and
``still_frozen`` fails if any thread ran since, appeared or vanished.

Journal hooks: ``on_freeze(pid, starttime)`` runs just before we send
SIGSTOP (only when we will owe a SIGCONT), ``on_thaw(pid)`` right after we
sent SIGCONT (or gave up owing it).  A daemon that crashes in between finds
in its journal exactly the processes it must SIGCONT, with the start time
to check the PID still names the same process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import time
from typing import Callable, Iterator

from migrated.errors import (FreezeTimeout, NoSuchProcess, TargetSharesMemory, TargetTraced,
                             ZombieProcess)
from migrated.kernel import procfs
from migrated.kernel.ptrace_inject import tracer_pid

# Thread states that count as stopped once we sent SIGSTOP: T (job control
# stop) and t (tracing stop: while our own syscall injection holds a
# thread, see kernel/uffd.py; other tracers are refused).
STOPPED_STATES = frozenset("Tt")
# Poll interval while waiting for threads to stop: start short (a thread
# usually stops within microseconds), double up to a cap that keeps the
# /proc re-reads cheap while a thread sits in uninterruptible sleep.
POLL_FIRST_S = 0.0001
POLL_MAX_S = 0.005
# mark_quiescent: how often, and how long at most, to wait for stopped
# threads to be off their CPUs.
QUIESCE_POLL_S = 0.0005
QUIESCE_MAX_S = 0.05


class Freezer:
    def __init__(self, pid: int, *,
                 on_freeze: Callable[[int, int], None] | None = None,
                 on_thaw: Callable[[int], None] | None = None,
                 starttime: int | None = None):
        """``starttime``: the start time (/proc/PID/stat field 22) of the
        process the caller means -- e.g. the one whose owner the daemon
        checked when the request came: a PID reused since is refused."""
        self.pid = pid
        self.on_freeze = on_freeze
        self.on_thaw = on_thaw
        st = procfs.check_alive(pid, "freezer")
        if starttime is not None and st.starttime != starttime:
            raise NoSuchProcess(pid, "freezer (the process the request named exited and its "
                                     "PID was reused by another process)")
        with procfs.translate(pid, "pidfd_open"):
            self.pidfd = os.pidfd_open(pid)
        self.starttime = st.starttime
        # The PID may have been recycled between the stat read and
        # pidfd_open: the stat read after pidfd_open must match.
        self._check_same("freezer")
        self._frozen_by_us = False
        self._frozen = False
        self._quiet: dict[int, int] | None = None    # mark_quiescent
        self._check_not_traced("freezer")
        self.check_alone("freezer")
        self.was_stopped = self._stop_under_way()

    # -- state ---------------------------------------------------------------

    @property
    def is_frozen(self) -> bool:
        """True between a successful freeze() and thaw()."""
        return self._frozen

    def exited(self) -> bool:
        """The process exited (pidfd readable), zombie or reaped."""
        if self.pidfd < 0:
            return True
        r, _, _ = select.select([self.pidfd], [], [], 0)
        return bool(r)

    def _check_same(self, what: str) -> procfs.Stat:
        st = self._check_same_any_state(what)
        if st.state in ("Z", "X"):
            raise ZombieProcess(self.pid, what)
        return st

    def _check_same_any_state(self, what: str) -> procfs.Stat:
        if self.exited():
            raise NoSuchProcess(self.pid, what)
        st = procfs.read_stat(self.pid)
        if st.starttime != self.starttime:
            raise NoSuchProcess(self.pid, f"{what} (PID was reused by another process)")
        return st

    def _all_stopped(self) -> bool:
        states = procfs.read_task_states(self.pid)
        return bool(states) and all(s in STOPPED_STATES for s in states.values())

    def _stop_under_way(self) -> bool:
        """Someone else is stopping or has stopped the process: a thread in
        job-control stop, or a SIGSTOP pending (module doc)."""
        states = procfs.read_task_states(self.pid)
        return any(s == "T" for s in states.values()) or procfs.sigstop_pending(self.pid)

    def _check_not_traced(self, what: str) -> None:
        """TargetTraced if a process other than ours traces the target."""
        tracer = tracer_pid(self.pid)
        if tracer and tracer != os.getpid():
            raise TargetTraced(self.pid, tracer, what)

    def verify_frozen(self) -> bool:
        """Re-check that every thread is still stopped (someone may have sent
        SIGCONT behind our back)."""
        self._check_same("checking freeze")
        return self._all_stopped()

    def check_alone(self, what: str = "freeze") -> None:
        """TargetSharesMemory if another process shares the target's address
        space (module doc).  One kcmp per process on the system (well under
        a millisecond per hundred): call it before a freeze, not in it."""
        others = _sharing_mm(self.pid)
        if others:
            raise TargetSharesMemory(self.pid, others, what)

    def mark_quiescent(self) -> None:
        """Note every thread's CPU time now, frozen (``still_frozen``).

        A thread shows state T a moment before it is off its CPU: its run
        time grows once more when it is switched out -- much later if it
        was preempted on the way (a busy machine), since it stays queued
        in state T.  Noted too early, that looked like a thread resumed
        behind our back (a follow-up migration failed so in CI).  So wait
        until every thread is off the run queue (its wchan names where it
        sleeps: the kernel shows 0 for a task still queued), or, where
        wchan tells nothing, until two reads QUIESCE_POLL_S apart agree;
        at most QUIESCE_MAX_S (past it, still_frozen judges as before)."""
        end = time.monotonic() + QUIESCE_MAX_S
        last = None
        # Usually every thread is off its CPU already: one wchan pass.
        while time.monotonic() < end:
            wchans = _read_wchans(self.pid)
            if _off_queue(wchans):
                break
            now = _thread_cpu(self.pid)
            if now == last and not any(map(_sleeping, wchans)):
                break               # wchan tells nothing here: the times settled
            last = now
            time.sleep(QUIESCE_POLL_S)
        self._quiet = _thread_cpu(self.pid)

    def still_frozen(self) -> bool:
        """Every thread stopped now, and -- after ``mark_quiescent`` -- none
        ran since (a SIGCONT then a SIGSTOP in between would leave them
        stopped again, with their writes after our final collection)."""
        self._check_same_any_state("checking freeze")
        if not self._all_stopped():
            return False
        return self._quiet is None or _thread_cpu(self.pid) == self._quiet

    # -- freeze / thaw -------------------------------------------------------

    def freeze(self, timeout: float = 2.0) -> float:
        """Stop every thread; return the milliseconds it took.

        Idempotent while frozen.  On timeout the process is thawed (if we
        stopped it) and FreezeTimeout is raised; if it exits meanwhile,
        NoSuchProcess.
        """
        t0 = time.perf_counter()
        if self._frozen:
            return 0.0
        self._check_same("freeze")
        self._check_not_traced("freeze")
        self.was_stopped = self._stop_under_way()
        if not self.was_stopped:
            if self.on_freeze is not None:
                # Journal first: a crash after the signal must find the PID
                # recorded so it can be thawed.
                self.on_freeze(self.pid, self.starttime)
            self._frozen_by_us = True
            try:
                with procfs.translate(self.pid, "SIGSTOP via pidfd"):
                    signal.pidfd_send_signal(self.pidfd, signal.SIGSTOP)
            except BaseException:
                self._frozen_by_us = False
                self._journal_thaw()
                raise
        try:
            self._wait_stopped(t0, timeout)
        except BaseException:
            self.thaw()
            raise
        self._frozen = True
        return (time.perf_counter() - t0) * 1000.0

    def _wait_stopped(self, t0: float, timeout: float) -> None:
        delay = POLL_FIRST_S
        while True:
            self._check_same("waiting for threads to stop")
            # Re-list tasks every pass: a thread born just before the stop
            # joins the group stop and must be seen in T as well.
            states = procfs.read_task_states(self.pid)
            running = {t: s for t, s in states.items() if s not in STOPPED_STATES}
            if states and not running:
                return
            if time.perf_counter() - t0 > timeout:
                detail = ", ".join(f"{t}:{s}" for t, s in sorted(running.items())[:8])
                raise FreezeTimeout(
                    self.pid,
                    f"process {self.pid}: {len(running)} of {len(states)} threads did "
                    f"not stop within {timeout:.1f}s (tid:state {detail}); a thread in "
                    "D state is stuck in the kernel (I/O, NFS, FUSE) -- retry later "
                    "or raise the freeze timeout")
            time.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)

    def thaw(self) -> bool:
        """SIGCONT if we stopped it.  Idempotent; never raises for a process
        that is already gone.  Returns True if a SIGCONT was sent."""
        self._frozen = False
        if not self._frozen_by_us:
            return False
        self._frozen_by_us = False
        sent = False
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGCONT)
                sent = True
            except ProcessLookupError:
                pass  # exited: nothing to thaw
        self._journal_thaw()
        return sent

    def _journal_thaw(self) -> None:
        if self.on_thaw is not None:
            self.on_thaw(self.pid)

    @contextlib.contextmanager
    def frozen(self, timeout: float = 2.0) -> Iterator[float]:
        """``with fz.frozen() as ms:`` -- thawed on every way out."""
        ms = self.freeze(timeout)
        try:
            yield ms
        finally:
            self.thaw()

    def close(self) -> None:
        """Thaw if we froze it, then close the pidfd."""
        try:
            self.thaw()
        finally:
            if self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1

    def __enter__(self) -> "Freezer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "pidfd", -1) >= 0:
            with contextlib.suppress(Exception):
                self.close()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_kcmp = 312          # x86_64
KCMP_VM = 1


def _sharing_mm(pid: int) -> list[int]:
    """Other processes (thread groups) whose address space is ``pid``'s.
    Processes we may not compare (EPERM) or that exit meanwhile are
    skipped; without kcmp (ENOSYS: kernel or seccomp) nothing is found."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == pid:
            continue
        other = int(name)
        r = _libc.syscall(ctypes.c_long(SYS_kcmp), ctypes.c_long(pid), ctypes.c_long(other),
                          ctypes.c_long(KCMP_VM), ctypes.c_ulong(0), ctypes.c_ulong(0))
        if r == 0:
            out.append(other)
        elif r < 0 and ctypes.get_errno() == errno.ENOSYS:
            return []
    return out


def _read_wchans(pid: int) -> list[str]:
    """Where each thread of ``pid`` sleeps ("0" while it is still queued
    to run, or where the kernel does not say); [] if unreadable."""
    out = []
    try:
        for tid in procfs.list_tasks(pid):
            try:
                with open(procfs.proc_path(pid, f"task/{tid}/wchan")) as f:
                    out.append(f.read().strip())
            except FileNotFoundError:
                continue        # exited between the listing and the read
    except OSError:
        return []
    return out


def _sleeping(wchan: str) -> bool:
    return wchan not in ("", "0")


def _off_queue(wchans: list[str]) -> bool:
    return bool(wchans) and all(map(_sleeping, wchans))


def _all_descheduled(pid: int) -> bool:
    """Every thread of ``pid`` is off the run queue (its wchan is known)."""
    return _off_queue(_read_wchans(pid))


def _thread_cpu(pid: int) -> dict[int, int]:
    """{tid: CPU time} for every thread of ``pid``: nanoseconds run from
    /proc/PID/task/TID/schedstat, or where that is not kept, the count of
    context switches (a thread that ran has switched at least once)."""
    out = {}
    for tid in procfs.list_tasks(pid):
        try:
            try:
                ran = procfs.thread_runtime_ns(pid, tid)
            except (OSError, NoSuchProcess):
                ran = 0             # no schedstat here, or the thread is gone:
                                    # the status read below tells which
            if ran == 0:
                status = procfs.read_status(pid, tid)
                ran = -(int(status.get("voluntary_ctxt_switches", "0"))
                        + int(status.get("nonvoluntary_ctxt_switches", "0")))
        except NoSuchProcess:
            continue            # exited between the listing and the read
        out[tid] = ran
    return out
