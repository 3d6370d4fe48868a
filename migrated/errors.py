"""Exception types shared by every layer.

Each carries a message meant for a human: what failed, on which PID or
peer, and what to do about it.
"""


class MigratedError(Exception):
    """Base of every error migrated raises on purpose."""


# -- kernel layer ---------------------------------------------------------

class ProcessError(MigratedError):
    def __init__(self, pid: int, message: str, what: str = ""):
        # ``what``: the step that met the error, said first.
        super().__init__(f"{what}: {message}" if what else message)
        self.pid = pid


class NoSuchProcess(ProcessError):
    """The target exited (or never existed)."""

    def __init__(self, pid: int, what: str = ""):
        super().__init__(pid, f"process {pid} does not exist (it exited?)", what)


class ZombieProcess(ProcessError):
    def __init__(self, pid: int, what: str = ""):
        super().__init__(pid, f"process {pid} is a zombie: it has no memory left to migrate",
                         what)


class AccessDenied(ProcessError):
    def __init__(self, pid: int, what: str = ""):
        msg = (f"access to process {pid} denied{': ' + what if what else ''}; "
               "run as root or as the process owner with ptrace allowed "
               "(kernel.yama.ptrace_scope)")
        super().__init__(pid, msg)


class FreezeTimeout(ProcessError):
    pass


class TargetTraced(ProcessError):
    """Another process (a debugger, strace) traces the target: its stops
    cannot be told from ours, and a tracer may swallow or undo our
    SIGSTOP, so we neither freeze it nor take its stop for a freeze."""

    def __init__(self, pid: int, tracer: int, what: str = ""):
        msg = (f"process {pid} is traced by process {tracer} (a debugger or strace): "
               "a freeze of it cannot be trusted -- the tracer may swallow or undo "
               "SIGSTOP, and a tracing stop looks like a freeze; detach the tracer "
               "and retry")
        super().__init__(pid, msg, what)
        self.tracer = tracer


class TargetSharesMemory(ProcessError):
    """Another process shares the target's address space (clone with
    CLONE_VM but not CLONE_THREAD, or a vfork child not yet exec'd): our
    SIGSTOP does not stop it, so it could write while we take the final
    delta."""

    def __init__(self, pid: int, others: list[int], what: str = ""):
        shown = ", ".join(map(str, others[:8])) + (" ..." if len(others) > 8 else "")
        msg = (f"process {pid} shares its memory with process(es) {shown} (clone with "
               "CLONE_VM, or a vfork child that has not exec'd yet): stopping it does not "
               "stop them, so the image could miss their writes; retry once they are "
               "gone, or migrate a process that does not share its address space")
        super().__init__(pid, msg, what)
        self.others = others


class TargetPinsMemory(ProcessError):
    """The target holds memory pinned for the kernel at addresses we cannot
    locate (RDMA, VFIO, iommufd; migrated/kernel/pins.py): the kernel
    writes there without a page fault, which the page-table trackers
    (uffd-wp, soft-dirty) never see."""

    def __init__(self, pid: int, problem: str, tracker: str, what: str = ""):
        super().__init__(pid, f"tracker {tracker} cannot see every write of process {pid}: "
                              f"{problem}; use --tracker digest (it compares content)", what)


class KernelUnsupported(MigratedError):
    """The running kernel lacks a feature the chosen path needs."""


# -- wire -----------------------------------------------------------------

class ProtocolError(MigratedError):
    """Anything malformed, oversized or out of state from a peer."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# -- image store ----------------------------------------------------------

class ImageError(MigratedError):
    pass


class QuotaExceeded(ImageError):
    pass


class ImageNotFound(ImageError):
    pass


class ImageWithdrawn(ImageError):
    """The source withdrew the migration: its image must not be published."""
