"""Exception types shared by every layer.

Each carries a message meant for a human: what failed, on which PID or
peer, and what to do about it.
"""


class MigratedError(Exception):
    """Base of every error migrated raises on purpose."""


# -- kernel layer ---------------------------------------------------------

class ProcessError(MigratedError):
    def __init__(self, pid: int, message: str):
        super().__init__(message)
        self.pid = pid


class NoSuchProcess(ProcessError):
    """The target exited (or never existed)."""

    def __init__(self, pid: int, what: str = ""):
        msg = f"process {pid} does not exist (it exited?)"
        if what:
            msg = f"{what}: {msg}"
        super().__init__(pid, msg)


class ZombieProcess(ProcessError):
    def __init__(self, pid: int, what: str = ""):
        msg = f"process {pid} is a zombie: it has no memory left to migrate"
        if what:
            msg = f"{what}: {msg}"
        super().__init__(pid, msg)


class AccessDenied(ProcessError):
    def __init__(self, pid: int, what: str = ""):
        msg = (f"access to process {pid} denied{': ' + what if what else ''}; "
               "run as root or as the process owner with ptrace allowed "
               "(kernel.yama.ptrace_scope)")
        super().__init__(pid, msg)


class FreezeTimeout(ProcessError):
    pass


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
