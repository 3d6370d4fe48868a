"""The process the fault matrix migrates: it keeps writing to its memory,
keeps changing its layout, and on command exits, execs, starts threads or
forks -- the things a real target does at the worst moment.

Run as ``python tests/faults/victim.py [--mib N] [--rate PAGES_PER_S]
[--layout-ms MS] [--churn-threads PER_S] [--churn-forks PER_S]``.  It
prints ``ready PID GEN`` (GEN counts execs), then reads one command per
line on stdin and answers ``ok ...`` on stdout:

  exit [CODE]      exit now
  exec             execve itself again (same PID, new memory, GEN+1; it
                   prints a new ready line)
  threads N        start N sleeping threads
  written          -> ok PAGES_WRITTEN_SO_FAR

Parent side: :class:`Victim`.  Stdlib only (no numpy): it must start in
tens of milliseconds, many times per test run.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import select
import signal
import subprocess
import sys
import threading
import time

PAGE = mmap.PAGESIZE
# Main loop tick: writes and command checks happen this often.
TICK_S = 0.005
# Layout churn: mappings of 1..CHURN_SIZES pages, at most CHURN_RING kept
# (small, so the churn changes the layout without adding much data).
CHURN_SIZES = 7
CHURN_RING = 32
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # A crashed test run must not leave victims behind.
    with_libc = ctypes.CDLL(None, use_errno=True)
    with_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _thread_churn(rate: float, stop: threading.Event) -> None:
    period = 1.0 / rate
    while not stop.is_set():
        threading.Thread(target=time.sleep, args=(period * 3,), daemon=True).start()
        time.sleep(period)


def _fork_churn(rate: float, stop: threading.Event) -> None:
    period = 1.0 / rate
    while not stop.is_set():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        time.sleep(period)
        while True:   # reap whatever finished
            try:
                got, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if got == 0:
                break


def child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=8)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--layout-ms", type=float, default=0.0)
    ap.add_argument("--churn-threads", type=float, default=0.0)
    ap.add_argument("--churn-forks", type=float, default=0.0)
    ap.add_argument("--gen", type=int, default=0)
    a = ap.parse_args(argv)
    _die_with_parent()

    size = a.mib << 20
    npages = size // PAGE
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # Non-zero everywhere: no page may be skipped as a zero page.
    buf.write(bytes([0x5A]) * size)
    stop = threading.Event()
    if a.churn_threads:
        threading.Thread(target=_thread_churn, args=(a.churn_threads, stop), daemon=True).start()
    if a.churn_forks:
        threading.Thread(target=_fork_churn, args=(a.churn_forks, stop), daemon=True).start()

    out = sys.stdout
    out.write(f"ready {os.getpid()} {a.gen}\n")
    out.flush()
    stdin = sys.stdin.buffer.raw
    pending = b""
    written = 0
    pos = 0
    t_last = time.monotonic()
    debt = 0.0
    churn: list[mmap.mmap] = []
    churned = 0
    t_churn = time.monotonic()
    threads: list[threading.Thread] = []
    while True:
        now = time.monotonic()
        debt = min(debt + a.rate * (now - t_last), a.rate)   # at most 1 s of catch-up
        t_last = now
        n = int(debt)
        for _ in range(n):
            buf[pos * PAGE + 8] = (written & 0xFF) or 1
            pos = (pos + 1) % npages
            written += 1
        debt -= n
        if a.layout_ms and (now - t_churn) * 1000.0 >= a.layout_ms:
            # A new mapping of a varying size every period, the oldest of a
            # ring unmapped: the layout never returns to an earlier state
            # (mapping and unmapping one region alternates between two).
            t_churn = now
            churned += 1
            size = (churned % CHURN_SIZES + 1) * PAGE
            new = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            new.write(bytes([0x33]) * size)
            churn.append(new)
            if len(churn) > CHURN_RING:
                churn.pop(0).close()
        r, _, _ = select.select([stdin], [], [], TICK_S)
        if not r:
            continue
        chunk = os.read(stdin.fileno(), 4096)
        if not chunk:
            return 0                      # parent went away
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            words = line.decode().split()
            if not words:
                continue
            cmd = words[0]
            if cmd == "exit":
                out.write("ok\n")
                out.flush()
                os._exit(int(words[1]) if len(words) > 1 else 0)
            elif cmd == "exec":
                out.write("ok\n")
                out.flush()
                args = [sys.executable, os.path.abspath(__file__), "--mib", str(a.mib),
                        "--rate", str(a.rate), "--layout-ms", str(a.layout_ms),
                        "--gen", str(a.gen + 1)]
                os.execv(sys.executable, args)
            elif cmd == "threads":
                for _ in range(int(words[1])):
                    t = threading.Thread(target=stop.wait, daemon=True)
                    t.start()
                    threads.append(t)
                out.write(f"ok {len(threads)}\n")
            elif cmd == "written":
                out.write(f"ok {written}\n")
            else:
                out.write(f"err unknown command {cmd!r}\n")
            out.flush()


# -- parent side ---------------------------------------------------------------------

# A reply (or the ready line) must come within this; generous for a loaded box.
REPLY_TIMEOUT_S = 20.0


class VictimError(RuntimeError):
    pass


class Victim:
    """Parent-side handle: start, command, observe, and always reap."""

    def __init__(self, mib: int = 8, rate: float = 2000.0, layout_ms: float = 0.0,
                 churn_threads: float = 0.0, churn_forks: float = 0.0):
        args = [sys.executable, os.path.abspath(__file__), "--mib", str(mib),
                "--rate", str(rate), "--layout-ms", str(layout_ms),
                "--churn-threads", str(churn_threads), "--churn-forks", str(churn_forks)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0, close_fds=True)
        self.pid = self.proc.pid
        self.mib = mib
        self.gen = 0
        self._rbuf = b""
        try:
            self.wait_ready(0)
        except BaseException:
            self.close()
            raise

    def _readline(self, timeout: float = REPLY_TIMEOUT_S) -> str:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._rbuf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VictimError(f"victim {self.pid}: no answer within {timeout:g} s "
                                  f"(state {_state(self.pid)})")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise VictimError(f"victim {self.pid} exited ({self.proc.poll()})")
                self._rbuf += chunk
        line, _, self._rbuf = self._rbuf.partition(b"\n")
        return line.decode()

    def wait_ready(self, gen: int) -> None:
        line = self._readline()
        if line != f"ready {self.pid} {gen}":
            raise VictimError(f"victim {self.pid}: expected ready line of generation "
                              f"{gen}, got {line!r}")

    def cmd(self, *words, timeout: float = REPLY_TIMEOUT_S) -> str:
        self.proc.stdin.write((" ".join(map(str, words)) + "\n").encode())
        reply = self._readline(timeout)
        if not reply.startswith("ok"):
            raise VictimError(f"victim {self.pid}: {' '.join(map(str, words))}: {reply}")
        return reply[3:]

    def exec_now(self) -> None:
        """Make the victim execve itself; returns once the new program is
        up (same PID, new memory)."""
        self.cmd("exec")
        self.gen += 1
        self.wait_ready(self.gen)

    def send_cmd(self, *words) -> None:
        """Write a command without waiting for the answer (the victim may be
        stopped; it acts when it runs again)."""
        self.proc.stdin.write((" ".join(map(str, words)) + "\n").encode())

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def state(self) -> str | None:
        return _state(self.pid) if self.alive else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)   # works on a stopped process too
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def __enter__(self) -> "Victim":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
