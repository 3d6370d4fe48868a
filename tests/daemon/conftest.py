"""Fixtures for the daemon tests: throwaway certificates, daemons started
as subprocesses on temporary sockets, child processes reaped always."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from migrated.daemon import certs  # noqa: E402

PY = sys.executable
# A daemon has this long to answer on its control socket after start.
DAEMON_START_TIMEOUT_S = 20.0


@pytest.fixture(scope="session")
def certdir(tmp_path_factory):
    """A CA with nodes a, b (loopback SANs), c and a foreign CA with node x."""
    d = str(tmp_path_factory.mktemp("certs"))
    certs.make(d, ["a", "b", "c"], ["127.0.0.1", "localhost"])
    other = os.path.join(d, "other")
    certs.make(other, ["x"], ["127.0.0.1", "localhost"])
    return d


def open_dir() -> str:
    """A temp dir that uid nobody can traverse (pytest's tmp dirs are 0700)."""
    d = tempfile.mkdtemp(prefix="migrated-test-", dir="/tmp")
    os.chmod(d, 0o755)
    return d


def ctl(control: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "migrated.cli", "--control", control, *args],
                          capture_output=True, text=True, timeout=timeout)


def control_request(path: str, obj: dict, timeout: float = 10.0) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(obj).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


class DaemonProc:
    def __init__(self, base: str, name: str, certdir: str | None, extra: list[str] = (),
                 env: dict | None = None):
        self.base = base
        self.name = name
        self.control = os.path.join(base, f"{name}.sock")
        if "--control" in extra:            # a test's own control path wins
            self.control = list(extra)[list(extra).index("--control") + 1]
        self.state_dir = os.path.join(base, f"{name}-state")
        self.log_path = os.path.join(base, f"{name}.log")
        args = [PY, "-m", "migrated.daemon.main", "--listen", "127.0.0.1:0",
                "--control", os.path.join(base, f"{name}.sock"), "--state-dir", self.state_dir, "--node", name,
                # never the host's /etc/migrated/migrated.toml
                "--config", "/dev/null"]
        if certdir is None:
            args.append("--insecure")
        else:
            args += ["--tls-ca", os.path.join(certdir, "ca.pem"),
                     "--tls-cert", os.path.join(certdir, f"{name}.pem"),
                     "--tls-key", os.path.join(certdir, f"{name}.key")]
        args += list(extra)
        self.args = args
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self) -> "DaemonProc":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=self._log,
                                     env=self.env, cwd=ROOT)
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited {self.proc.returncode}:\n"
                                   + self.log())
            try:
                info = control_request(self.control, {"op": "status"}, timeout=2)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"daemon {self.name} did not start:\n" + self.log())
                time.sleep(0.05)
        self.port = int(info["result"]["listen"].rsplit(":", 1)[1])
        return self

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def daemons():
    """Factory: daemons(name, certdir|None, extra_args) -> started DaemonProc;
    all stopped (SIGTERM, then SIGKILL) at teardown."""
    base = open_dir()
    started: list[DaemonProc] = []

    def start(name: str, certdir: str | None = None, extra: list[str] = (),
              env: dict | None = None) -> DaemonProc:
        d = DaemonProc(base, name, certdir, list(extra), env)
        started.append(d)
        return d.start()

    start.base = base
    try:
        yield start
    finally:
        for d in started:
            d.stop()
        subprocess.run(["rm", "-rf", base], check=False)


@pytest.fixture
def children():
    """Factory of plain child processes (sleep), killed and reaped after,
    never left stopped."""
    procs: list[subprocess.Popen] = []

    def spawn(*args, **kw) -> subprocess.Popen:
        p = subprocess.Popen(list(args) or ["sleep", "600"], **kw)
        procs.append(p)
        return p

    try:
        yield spawn
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
            p.wait(10)


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_state(pid: int, want: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc_state(pid) == want:
            return True
        time.sleep(0.01)
    return proc_state(pid) == want
