"""Run a few system calls inside another process with ptrace (x86_64).

Used to create a userfaultfd *inside* a target (the fd binds to the mm of
the process that calls userfaultfd(2)) and to close it there again after
pidfd_getfd(2) has copied it out.

How one session goes (``Injector``)::

    PTRACE_SEIZE + PTRACE_INTERRUPT one thread, wait for the stop
    save its registers and signal mask
    per call: block every signal but SIGTRAP; registers = saved with rip ->
    a `syscall` instruction found in the target (its [vdso]), rax = nr,
    args in rdi rsi rdx r10 r8 r9, orig_rax = -1; PTRACE_SINGLESTEP; the
    result is rax; registers and mask back exactly, and the thread parked
    in an interrupt-stop again (``Injector._park``)
    PTRACE_DETACH

Restart semantics.  A thread blocked in a system call (read(2) on a pipe,
nanosleep(2)) leaves it with rax = -ERESTARTSYS / -ERESTARTNOHAND /
-ERESTART_RESTARTBLOCK and orig_rax = the call's number when the
interrupt-stop is reported; the kernel's restart fix-up (rip -= 2, rax =
orig_rax or restart_syscall) runs only *after* the stop, when the thread
leaves signal handling.  So:

* the injected calls run with orig_rax = -1, which tells that fix-up "not
  in a system call" -- it leaves our rip and rax alone;
* the saved registers are put back *exactly* (orig_rax included) before we
  detach from the last single-step stop; the fix-up then sees the original
  error code and orig_rax and restarts the interrupted call as if a signal
  without a handler had come: read() goes on waiting, nanosleep() resumes
  with the time left (restart_block is untouched by our calls).

Signals.  Signals already pending when we interrupt are delivered normally
first (PTRACE_CONT with the signal, then the interrupt-stop comes).  During
each injected call every signal except SIGTRAP is blocked with
PTRACE_SETSIGMASK, so anything arriving stays pending and is delivered
after we detach; SIGTRAP stays unblocked because a single-step trap on a
blocked SIGTRAP would reset the target's SIGTRAP handler to the default.
A SIGSTOP (cannot be blocked) arriving mid-injection is held and handed
back at detach.

Robustness.  Whatever fails after the seize (a fault at the injected rip,
a failed call, our own bug), the registers and mask are restored and the
thread detached in ``finally``.  If *our* process dies (the kernel then
detaches its tracees, which run on from where they are stopped), the
thread is between calls in an interrupt-stop with its own registers and
mask, which costs it nothing.  Inside one call -- from setting the
registers until the thread is parked again: microseconds, but
milliseconds when the daemon's other threads hold the GIL -- it would run
on with injected registers or be killed by the step's SIGTRAP: 9 of 53
daemons SIGKILLed at random moments of the uffd-wp setup killed their
target (3 of 27 before ``_park``, which only closed the windows between
calls).  Closing it needs stops that carry no signal (PTRACE_SYSCALL with
TRACESYSGOOD) and the call done without the GIL given up; left.
Targets under a seccomp filter are refused: a filter may kill the process
for a system call it does not expect.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import signal
import time

from migrated.errors import (AccessDenied, KernelUnsupported, MigratedError,
                             NoSuchProcess)
from migrated.kernel import procfs

ARCH = platform.machine()

# -- ptrace requests (include/uapi/linux/ptrace.h) ---------------------------
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_EVENT_STOP = 128
WAIT_ALL = 0x40000000       # __WALL: wait for any kind of child, threads too

# -- x86_64 system call numbers ------------------------------------------------
SYS_CLOSE = 3
SYS_GETPID = 39
SYS_USERFAULTFD = 323
SYS_PIDFD_GETFD = 438

SYSCALL_INSN = b"\x0f\x05"
# Bytes of an executable mapping read when looking for a `syscall`
# instruction: the whole [vdso] is 8 KiB; a library's text has one within
# its first pages.
INSN_SEARCH_BYTES = 64 << 10

# Poll interval while waiting for the thread to stop: the interrupt-stop
# usually arrives within microseconds; a thread in uninterruptible sleep (D)
# stops only when it leaves it, and we must wait for that -- giving up
# would leave it traced.
WAIT_POLL_FIRST_S = 0.00005
WAIT_POLL_MAX_S = 0.01

# struct user_regs_struct (arch/x86/include/asm/user_64.h): 27 u64.
REG_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
             "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
             "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
_ALL_SIGNALS_BUT_TRAP = ((1 << 64) - 1) & ~(1 << (signal.SIGTRAP - 1))


class UserRegs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in REG_NAMES]

    def copy(self) -> "UserRegs":
        out = UserRegs()
        ctypes.memmove(ctypes.byref(out), ctypes.byref(self), ctypes.sizeof(self))
        return out


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long


class InjectionError(MigratedError):
    """A system call could not be run inside the target (the target was
    restored and released)."""


def check_arch() -> None:
    if ARCH != "x86_64":
        raise KernelUnsupported(
            f"syscall injection (uffd-wp tracker) is implemented for x86_64 only, "
            f"not {ARCH}; use --tracker digest")


def _ptrace(req: int, pid: int, addr=None, data=None) -> int:
    rc = _libc.ptrace(req, pid, addr, data)
    if rc == -1:
        e = ctypes.get_errno()
        if e:
            raise OSError(e, f"ptrace({req:#x}, {pid}): {os.strerror(e)}")
    return rc


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """Copy ``target_fd`` of the process behind ``pidfd`` into ours
    (close-on-exec).  Needs PTRACE_MODE_ATTACH on it."""
    fd = _libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_long(pidfd),
                       ctypes.c_long(target_fd), ctypes.c_long(0))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"pidfd_getfd(fd {target_fd}): {os.strerror(e)}")
    return fd


def seccomp_mode(pid: int) -> int:
    """0 none, 1 strict, 2 filter (/proc/PID/status Seccomp)."""
    return int(procfs.read_status(pid).get("Seccomp", "0") or 0)


def tracer_pid(pid: int) -> int:
    return int(procfs.read_status(pid).get("TracerPid", "0") or 0)


def find_syscall_insn(pid: int) -> int:
    """Address of a `syscall` instruction in an executable mapping of
    ``pid``: the [vdso] first (always there, holds the fallback calls),
    then any r-x mapping.  Where the two bytes sit inside the surrounding
    code does not matter: the CPU decodes from the address we jump to."""
    maps = procfs.read_maps_text(pid).splitlines()
    cands = []
    for line in maps:
        parts = line.split(None, 5)
        if len(parts) < 5 or "x" not in parts[1] or "r" not in parts[1]:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        path = parts[5] if len(parts) > 5 else ""
        cands.append((path != "[vdso]", lo, hi))
    cands.sort()
    with procfs.translate(pid, "opening mem"):
        fd = os.open(procfs.proc_path(pid, "mem"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _, lo, hi in cands:
            try:
                data = os.pread(fd, min(hi - lo, INSN_SEARCH_BYTES), lo)
            except OSError:
                continue
            i = data.find(SYSCALL_INSN)
            if i >= 0:
                return lo + i
    finally:
        os.close(fd)
    raise InjectionError(f"process {pid}: no `syscall` instruction found in its "
                         "executable mappings")


class Injector:
    """One ptrace session on one thread of ``pid``; use as a context
    manager.  ``call(nr, *args)`` runs a system call in the target and
    returns its raw result (negative errno on failure)."""

    def __init__(self, pid: int, tid: int | None = None, *,
                 syscall_addr: int | None = None):
        check_arch()
        self.pid = pid
        self.tid = pid if tid is None else tid
        self._syscall_addr = syscall_addr
        self._saved: UserRegs | None = None
        self._saved_mask: ctypes.c_uint64 | None = None
        self._attached = False
        self._held_signal = 0      # a SIGSTOP that arrived mid-injection
        self._regs_dirty = False

    # -- lifetime ---------------------------------------------------------------

    def __enter__(self) -> "Injector":
        try:
            self._attach()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _attach(self) -> None:
        mode = seccomp_mode(self.pid)
        if mode:
            raise KernelUnsupported(
                f"process {self.pid} runs under seccomp ({'strict' if mode == 1 else 'filter'} "
                "mode): an injected system call could be refused or kill it; "
                "use --tracker digest")
        if self._syscall_addr is None:
            self._syscall_addr = find_syscall_insn(self.pid)
        try:
            _ptrace(PTRACE_SEIZE, self.tid, None, None)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise NoSuchProcess(self.pid, "ptrace seize") from e
            if e.errno == errno.EPERM:
                other = 0
                with contextlib.suppress(MigratedError, OSError, ValueError):
                    other = tracer_pid(self.pid)
                if other:
                    raise AccessDenied(self.pid, f"ptrace seize: already traced by "
                                                 f"process {other} (a debugger?)") from e
                raise AccessDenied(self.pid, "ptrace seize (needs CAP_SYS_PTRACE or "
                                             "kernel.yama.ptrace_scope <= 1)") from e
            raise
        self._attached = True
        _ptrace(PTRACE_INTERRUPT, self.tid, None, None)
        self._wait_interrupt_stop()
        regs = UserRegs()
        _ptrace(PTRACE_GETREGS, self.tid, None, ctypes.byref(regs))
        self._saved = regs
        mask = ctypes.c_uint64(0)
        _ptrace(PTRACE_GETSIGMASK, self.tid, ctypes.c_void_p(8), ctypes.byref(mask))
        self._saved_mask = mask

    def _release(self) -> None:
        """Restore registers and mask, detach.  Never raises for a target
        that died meanwhile."""
        if not self._attached:
            return
        self._attached = False
        try:
            if self._saved is not None and self._regs_dirty:
                _ptrace(PTRACE_SETREGS, self.tid, None, ctypes.byref(self._saved))
            if self._saved_mask is not None:
                _ptrace(PTRACE_SETSIGMASK, self.tid, ctypes.c_void_p(8),
                        ctypes.byref(self._saved_mask))
            _ptrace(PTRACE_DETACH, self.tid, None, ctypes.c_void_p(self._held_signal))
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise
            # ESRCH: gone, or not in a stop we could act on.  A live tracee
            # we could not detach must not stay traced: last resort.
            self._reap_if_dead()

    def _park(self) -> None:
        """Between calls: the thread's own registers and mask back, and the
        thread moved from the single-step trap into an interrupt-stop.

        If our process dies (SIGKILL, OOM) the kernel detaches the thread
        and it runs on from where it is stopped.  From the trap stop that
        meant the injected registers (SIGSEGV in the [vdso]) and the trap's
        SIGTRAP, still pending as the stop's signal, delivered with its
        default action: the target was killed (3 of 3 tracers killed
        between two calls).  And an attached tracer that died left every
        signal blocked for good.  Parked like this, a death costs the target
        nothing: an interrupt-stop carries no signal, and the registers
        and mask are its own.  (The call itself stays exposed: module doc.)"""
        if not self._attached:
            return
        try:
            if self._saved is not None and self._regs_dirty:
                _ptrace(PTRACE_SETREGS, self.tid, None, ctypes.byref(self._saved))
                self._regs_dirty = False
            if self._saved_mask is not None:
                _ptrace(PTRACE_SETSIGMASK, self.tid, ctypes.c_void_p(8),
                        ctypes.byref(self._saved_mask))
            # The interrupt is taken before the thread returns to user
            # space (and before any other signal): no code of it runs.
            _ptrace(PTRACE_INTERRUPT, self.tid, None, None)
            _ptrace(PTRACE_CONT, self.tid, None, None)   # the trap's SIGTRAP dropped
            self._wait_interrupt_stop()
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise
            self._reap_if_dead()

    def _reap_if_dead(self) -> None:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(self.tid, os.WNOHANG | WAIT_ALL)

    # -- waiting ------------------------------------------------------------------

    def _wait(self) -> int:
        """waitpid for our tracee, polling so a target that dies while we
        wait is noticed; returns the raw status."""
        delay = WAIT_POLL_FIRST_S
        while True:
            try:
                wpid, status = os.waitpid(self.tid, os.WNOHANG | WAIT_ALL)
            except ChildProcessError as e:
                self._attached = False
                raise NoSuchProcess(self.pid, "waiting for the ptrace stop") from e
            if wpid:
                if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                    self._attached = False
                    raise NoSuchProcess(self.pid, "during syscall injection")
                return status
            time.sleep(delay)
            delay = min(delay * 2, WAIT_POLL_MAX_S)

    def _wait_interrupt_stop(self) -> None:
        while True:
            status = self._wait()
            sig = os.WSTOPSIG(status)
            if status >> 16 == PTRACE_EVENT_STOP:
                return          # interrupt-stop (SIGTRAP) or group-stop
            # A signal-delivery-stop for a signal that was already on its
            # way: deliver it unchanged; our interrupt stays pending.
            _ptrace(PTRACE_CONT, self.tid, None, ctypes.c_void_p(sig))

    # -- calls --------------------------------------------------------------------

    def call(self, nr: int, *args: int) -> int:
        if not self._attached or self._saved is None:
            raise RuntimeError("Injector.call() outside its context")
        if len(args) > len(_ARG_REGS):
            raise ValueError("at most 6 system call arguments")
        regs = self._saved.copy()
        regs.rip = self._syscall_addr
        regs.rax = nr
        regs.orig_rax = (1 << 64) - 1      # -1: "not in a system call"
        for name, v in zip(_ARG_REGS, args):
            setattr(regs, name, v & ((1 << 64) - 1))
        # Clear the trap flag the saved eflags might carry.
        regs.eflags &= ~0x100
        block = ctypes.c_uint64(_ALL_SIGNALS_BUT_TRAP)
        _ptrace(PTRACE_SETSIGMASK, self.tid, ctypes.c_void_p(8), ctypes.byref(block))
        self._regs_dirty = True
        try:
            _ptrace(PTRACE_SETREGS, self.tid, None, ctypes.byref(regs))
            return self._step(nr)
        finally:
            self._park()

    def _step(self, nr: int) -> int:
        """Single-step the injected `syscall`; its result."""
        while True:
            _ptrace(PTRACE_SINGLESTEP, self.tid, None, None)
            status = self._wait()
            sig = os.WSTOPSIG(status)
            if status >> 16:
                continue        # a group-stop event: step again
            if sig == signal.SIGTRAP:
                break
            if sig == signal.SIGSTOP:
                self._held_signal = sig   # hand it back at detach
                continue
            # Any other signal-delivery-stop with everything else blocked is
            # a synchronous fault at the injected instruction (SIGSEGV,
            # SIGILL, SIGBUS): suppress it -- the registers are restored on
            # release -- and give up.
            raise InjectionError(
                f"process {self.pid}: injected system call {nr} faulted with "
                f"{signal.Signals(sig).name} at {self._syscall_addr:#x}; target restored")
        out = UserRegs()
        _ptrace(PTRACE_GETREGS, self.tid, None, ctypes.byref(out))
        expect = self._syscall_addr + len(SYSCALL_INSN)
        if out.rip != expect:
            raise InjectionError(
                f"process {self.pid}: after the injected system call rip is "
                f"{out.rip:#x}, expected {expect:#x}; target restored")
        res = out.rax
        return res - (1 << 64) if res >= 1 << 63 else res

    def call_ok(self, nr: int, *args: int, what: str = "") -> int:
        """call() raising InjectionError on a negative result."""
        res = self.call(nr, *args)
        if res < 0 and res > -4096:
            raise InjectionError(f"process {self.pid}: {what or f'system call {nr}'} "
                                 f"inside the target failed: {os.strerror(-res)}")
        return res
