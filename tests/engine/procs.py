"""Child processes for engine tests: the bundled workload, reaped always."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

# Startup of the workload (numpy import + fill): generous for a loaded box
# and for the lab VM, where Python runs under software emulation.
READY_TIMEOUT_S = 120.0


@dataclass
class Workload:
    proc: subprocess.Popen
    pid: int
    addr: int
    mib: int
    zero_addr: int
    zero_mib: int

    def state(self) -> str:
        with open(f"/proc/{self.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]


def _read_ready(proc: subprocess.Popen) -> str:
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise RuntimeError(f"workload {proc.pid} did not get ready: {buf!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"workload {proc.pid} exited: {proc.poll()}")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def reap(proc: subprocess.Popen) -> None:
    """Kill (works on a stopped child too) and reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    if proc.stdout:
        proc.stdout.close()


@contextlib.contextmanager
def workload(mib: int = 16, rate: float = 0.0, hot_mib: int | None = None,
             zero_mib: int = 0) -> Iterator[Workload]:
    argv = [sys.executable, "-m", "migrated.workload", "--mib", str(mib), "--rate", str(rate),
            "--zero-mib", str(zero_mib)]
    if hot_mib is not None:
        argv += ["--hot-mib", str(hot_mib)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, bufsize=0,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1",
                                 "OMP_NUM_THREADS": "1"})
    try:
        line = _read_ready(proc)
        f = dict(kv.split("=", 1) for kv in line.split()[1:])
        yield Workload(proc, proc.pid, int(f["addr"], 16), int(f["mib"]),
                       int(f["zero_addr"], 16), int(f["zero_mib"]))
    finally:
        reap(proc)
