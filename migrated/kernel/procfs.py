"""One small function per /proc file, with OSError translated at one place.

Every reader here goes through :func:`translate`, which turns the kernel's
errno into the exceptions of :mod:`migrated.errors` (ENOENT/ESRCH ->
NoSuchProcess, EPERM/EACCES -> AccessDenied).  Callers never see a bare
OSError for a vanished or forbidden process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from dataclasses import dataclass
from typing import Iterable, Iterator

from migrated.errors import AccessDenied, NoSuchProcess, ZombieProcess

PROC = "/proc"

# Errnos that mean "the process (or thread) is gone".  ESRCH comes from
# files like /proc/PID/mem once the mm is released; EINVAL/EIO are not in
# this set: they are real bugs or real holes and stay OSError.
_GONE = (errno.ENOENT, errno.ESRCH)
_DENIED = (errno.EPERM, errno.EACCES)


@contextlib.contextmanager
def translate(pid: int, what: str) -> Iterator[None]:
    """Map OSError raised inside the block onto migrated.errors types."""
    try:
        yield
    except OSError as e:
        if e.errno in _GONE:
            raise NoSuchProcess(pid, what) from e
        if e.errno in _DENIED:
            raise AccessDenied(pid, what) from e
        raise


def proc_path(pid: int, name: str = "") -> str:
    return f"{PROC}/{pid}/{name}" if name else f"{PROC}/{pid}"


def _read_bytes(pid: int, name: str) -> bytes:
    with translate(pid, f"reading {proc_path(pid, name)}"):
        with open(proc_path(pid, name), "rb", buffering=0) as f:
            chunks = []
            while True:
                b = f.read(1 << 16)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks)


# -- /proc/PID/stat ---------------------------------------------------------

# A kernel thread (include/linux/sched.h): no user memory, nothing to migrate.
PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class Stat:
    pid: int
    comm: str
    state: str          # one char: R S D T t Z X I ...
    ppid: int
    starttime: int      # clock ticks since boot (field 22)
    num_threads: int
    flags: int = 0      # the kernel's PF_* flags (field 9)

    @property
    def kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def parse_stat(text: str, pid: int = 0) -> Stat:
    """Parse one stat line.  comm may contain spaces and parentheses, so the
    fixed fields are taken after the LAST ')'."""
    lp = text.index("(")
    rp = text.rindex(")")
    comm = text[lp + 1:rp]
    rest = text[rp + 2:].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    return Stat(pid=int(text[:lp]) if not pid else pid, comm=comm,
                state=rest[0], ppid=int(rest[1]), starttime=int(rest[19]),
                num_threads=int(rest[17]), flags=int(rest[6]))


def read_stat(pid: int, tid: int | None = None) -> Stat:
    """/proc/PID/stat, or /proc/PID/task/TID/stat when ``tid`` is given."""
    name = f"task/{tid}/stat" if tid is not None else "stat"
    return parse_stat(_read_bytes(pid, name).decode("utf-8", "replace"))


def read_state(pid: int, tid: int | None = None) -> str:
    return read_stat(pid, tid).state


def read_starttime(pid: int) -> int:
    return read_stat(pid).starttime


def check_alive(pid: int, what: str = "") -> Stat:
    """Stat of a live, non-zombie process; raise the right error otherwise."""
    st = read_stat(pid)
    if st.state in ("Z", "X"):
        raise ZombieProcess(pid, what)
    return st


# -- tasks, cmdline, exe, status -------------------------------------------

def list_tasks(pid: int) -> list[int]:
    """Thread ids of ``pid`` (sorted)."""
    with translate(pid, f"listing {proc_path(pid, 'task')}"):
        return sorted(int(t) for t in os.listdir(proc_path(pid, "task")))


def read_task_states(pid: int) -> dict[int, str]:
    """{tid: state char} for every thread; threads that vanish between the
    listing and the read are left out (they exited)."""
    states: dict[int, str] = {}
    for tid in list_tasks(pid):
        try:
            states[tid] = read_state(pid, tid)
        except NoSuchProcess:
            if not os.path.exists(proc_path(pid)):
                raise
    return states


def read_cmdline(pid: int) -> list[str]:
    raw = _read_bytes(pid, "cmdline")
    if not raw:
        return []  # kernel thread or zombie
    return [a.decode("utf-8", "surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")]


def read_exe(pid: int) -> str:
    """Target of /proc/PID/exe ('' for kernel threads / zombies)."""
    try:
        with translate(pid, f"reading {proc_path(pid, 'exe')}"):
            return os.readlink(proc_path(pid, "exe"))
    except NoSuchProcess:
        # exe is ENOENT for zombies and kernel threads while stat still exists.
        check_alive(pid, "reading exe")
        return ""


def read_status(pid: int, tid: int | None = None) -> dict[str, str]:
    """/proc/PID/status (or /proc/PID/task/TID/status) as {key: raw value
    string}."""
    name = f"task/{tid}/status" if tid is not None else "status"
    out: dict[str, str] = {}
    for line in _read_bytes(pid, name).decode("utf-8", "replace").splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k] = v.strip()
    return out


def thread_runtime_ns(pid: int, tid: int) -> int:
    """Nanoseconds thread ``tid`` has run (/proc/PID/task/TID/schedstat;
    0 where the kernel does not keep it)."""
    fields = _read_bytes(pid, f"task/{tid}/schedstat").split()
    try:
        return int(fields[0])
    except (IndexError, ValueError):
        return 0


def sigstop_pending(pid: int) -> bool:
    """A SIGSTOP sent to ``pid`` has not taken hold yet (pending for the
    process, or for its main thread)."""
    status = read_status(pid)
    bit = 1 << (signal.SIGSTOP - 1)
    for key in ("ShdPnd", "SigPnd"):
        try:
            if int(status.get(key) or "0", 16) & bit:
                return True
        except ValueError:
            pass
    return False


def read_uids(pid: int) -> tuple[int, int, int, int]:
    """(real, effective, saved, filesystem) uid."""
    r, e, s, f = (int(x) for x in read_status(pid)["Uid"].split())
    return r, e, s, f


def read_maps_text(pid: int) -> str:
    return _read_bytes(pid, "maps").decode("utf-8", "surrogateescape")


def read_vma_flags(pid: int, starts: Iterable[int]) -> dict[int, frozenset[str] | None]:
    """The VmFlags of the mappings that start at ``starts`` (two-letter
    codes, fs/proc/task_mmu.c: "ui" userfaultfd minor, "um" missing, "uw"
    write-protect, ...), from one read of /proc/PID/smaps; None for a
    start no mapping has.  smaps walks every page table of the process
    (14-33 ms for 2 GiB here): one read for all of them, never one each."""
    text = _read_bytes(pid, "smaps")
    return {start: _vma_flags_in(text, start) for start in starts}


def _vma_flags_in(text: bytes, start: int) -> frozenset[str] | None:
    head = b"%x-" % start
    i = 0 if text.startswith(head) else text.find(b"\n" + head)
    if i < 0:
        return None
    j = text.find(b"\nVmFlags:", i)
    if j < 0:
        return frozenset()
    end = text.find(b"\n", j + 1)
    line = text[j + len(b"\nVmFlags:"):end if end >= 0 else len(text)]
    return frozenset(line.decode().split())


def write_clear_refs(pid: int, value: int) -> None:
    with translate(pid, f"writing {value} to {proc_path(pid, 'clear_refs')}"):
        with open(proc_path(pid, "clear_refs"), "w") as f:
            f.write(str(value))


def clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")
