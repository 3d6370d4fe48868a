"""Freezer: stop every thread of a process with SIGSTOP, and let it go.

Signals go through a pidfd opened at construction, so a recycled PID is
never hit; the start time read from /proc/PID/stat at the same moment
guards the /proc reads against recycling too.  A process whose threads
were all stopped already (state T, or t under a debugger) before we came
is left exactly as it was: we neither SIGSTOP nor SIGCONT it.

Journal hooks: ``on_freeze(pid, starttime)`` runs just before we send
SIGSTOP (only when we will owe a SIGCONT), ``on_thaw(pid)`` right after we
sent SIGCONT (or gave up owing it).  A daemon that crashes in between finds
in its journal exactly the processes it must SIGCONT, with the start time
to check the PID still names the same process.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from typing import Callable, Iterator

from migrated.errors import FreezeTimeout, NoSuchProcess, ZombieProcess
from migrated.kernel import procfs

# Thread states that count as stopped: T (job control stop) and t (stopped
# by a tracer; SIGSTOP on a traced thread ends in t, not T).
STOPPED_STATES = frozenset("Tt")
# Poll interval while waiting for threads to stop: start short (a thread
# usually stops within microseconds), double up to a cap that keeps the
# /proc re-reads cheap while a thread sits in uninterruptible sleep.
POLL_FIRST_S = 0.0001
POLL_MAX_S = 0.005


class Freezer:
    def __init__(self, pid: int, *,
                 on_freeze: Callable[[int, int], None] | None = None,
                 on_thaw: Callable[[int], None] | None = None):
        self.pid = pid
        self.on_freeze = on_freeze
        self.on_thaw = on_thaw
        st = procfs.check_alive(pid, "freezer")
        with procfs.translate(pid, "pidfd_open"):
            self.pidfd = os.pidfd_open(pid)
        self.starttime = st.starttime
        # The PID may have been recycled between the stat read and
        # pidfd_open: the stat read after pidfd_open must match.
        self._check_same("freezer")
        self._frozen_by_us = False
        self._frozen = False
        self.was_stopped = self._all_stopped()

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
        if self.exited():
            raise NoSuchProcess(self.pid, what)
        st = procfs.read_stat(self.pid)
        if st.starttime != self.starttime:
            raise NoSuchProcess(self.pid, f"{what} (PID was reused by another process)")
        if st.state in ("Z", "X"):
            raise ZombieProcess(self.pid, what)
        return st

    def _all_stopped(self) -> bool:
        states = procfs.read_task_states(self.pid)
        return bool(states) and all(s in STOPPED_STATES for s in states.values())

    def verify_frozen(self) -> bool:
        """Re-check that every thread is still stopped (someone may have sent
        SIGCONT behind our back)."""
        self._check_same("checking freeze")
        return self._all_stopped()

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
        self.was_stopped = self._all_stopped()
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
