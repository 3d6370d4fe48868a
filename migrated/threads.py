"""Threads whose names reach the kernel.

CPython (before 3.14) names a thread only for Python: ``top -H``,
``ps -L``, ``perf`` and /proc/PID/task/TID/comm show every thread of the
daemon as its program name.  An operator who sees the daemon busy cannot
tell whether the page reader, the sending thread, the image writer or a
digest is the one working.  ``Thread`` is threading.Thread that, when it
starts running, gives the kernel its name (shortened to the kernel's 15
bytes: "migrated-" and "image-writer-" become "mig-" and "mig-writer-").
"""

from __future__ import annotations

import threading

# What the kernel keeps of a thread's name (TASK_COMM_LEN - 1).
KERNEL_NAME_BYTES = 15

_SHORTER = (("migrated-", "mig-"), ("image-writer-", "mig-writer-"))


def kernel_name(name: str) -> str:
    """The name the kernel is given for a thread named ``name``."""
    for long, short in _SHORTER:
        if name.startswith(long):
            name = short + name[len(long):]
            break
    raw = name.encode("ascii", "replace")[:KERNEL_NAME_BYTES]
    return raw.decode("ascii")


def name_this_thread(name: str) -> None:
    """Give the calling thread ``name`` in the kernel (best effort: a
    thread that cannot be renamed runs all the same)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(kernel_name(name))
    except OSError:
        pass


class Thread(threading.Thread):
    """threading.Thread that names itself in the kernel when it starts."""

    def run(self) -> None:
        name_this_thread(self.name)
        super().run()
