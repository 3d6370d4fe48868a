"""Daemons as subprocesses, for the tests that treat `migrated` as a black
box: the fault matrix (tests/faults), hostile peers (tests/hostile), the
soak (tests/soak) and their longer runs in benchmarks/.

    with Cluster(tls=True) as c:
        a = c.daemon("a")                 # started, answering on its control socket
        b = c.daemon("b", state_dir=c.tmpfs("b-state", "64M"))
        mid = a.send(pid, "127.0.0.1", b.port, then="resume")
        result = a.wait_done(mid)
        b.images(mid)                     # complete images of that migration

- Certificates: a throwaway cluster CA (``c.certdir``) with a cert per
  daemon, plus ``c.foreign_cert(name)`` from another CA and
  ``c.node_cert(name)`` for names no daemon uses (hostile TLS clients).
- Namespaces: ``Cluster(hosts=TwoHosts(...))`` and ``c.daemon("a", ns="a")``
  runs the daemon inside that network namespace (``ip netns exec``).
- Logs: every daemon writes to ``<base>/<name>.log``; ``d.follow()`` gives a
  :class:`LogFollower` that parses the key=value lines (``event=``,
  ``mid=``...) and waits for one to match.
- Process figures: :func:`rss_kib`, :func:`fd_count`, :func:`proc_state`.
- Short timeouts: ``timeouts=FAST_TIMEOUTS`` starts the daemon through this
  file's launcher, which lowers the daemon's named timeout constants before
  ``migrated.daemon.main.main`` runs (the daemon has no flags for them yet),
  so a silent peer costs a few seconds in a test instead of 30.

Only PIDs this module started are ever signalled; every daemon is stopped
(SIGCONT first, in case a test left it stopped, then SIGTERM, then SIGKILL)
and every tmpfs unmounted when the cluster closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PY = sys.executable
# A daemon has this long to answer on its control socket after it starts
# (imports + certificate loading on a loaded 2-core box).
DAEMON_START_TIMEOUT_S = 30.0
# How often waiting loops look again (log files, /proc, control status).
POLL_S = 0.01
# A control request gets this long for its answer.
CONTROL_TIMEOUT_S = 10.0
# Terminal states of a migration in `status`.
DONE_STATES = ("completed", "failed", "cancelled")


# -- timeouts ---------------------------------------------------------------------

@dataclass(frozen=True)
class Timeouts:
    """The daemon's waits, shortened for tests (seconds)."""
    io_s: float = 3.0          # one recv/send on a migration socket
    idle_s: float = 3.0        # silence tolerated between messages
    handshake_s: float = 3.0   # TLS handshake, Hello..Accept
    connect_s: float = 3.0     # TCP connect to the peer
    keepalive_s: float = 0.5   # keepalive period while busy (<< idle_s)
    commit_s: float = 8.0      # CommitRequest -> Committed
    control_idle_s: float = 60.0   # a control client silent or not reading


FAST_TIMEOUTS = Timeouts()

# (module, attribute, Timeouts field or a function of it).  Every name must
# exist: a renamed constant fails the launcher loudly instead of silently
# leaving a 30 s timeout in a test that counts on 3 s.
_TIMEOUT_PATCHES: list[tuple[str, str, Callable[[Timeouts], Any]]] = [
    ("migrated.wire.limits", "IDLE_TIMEOUT_S", lambda t: t.idle_s),
    ("migrated.wire.limits", "HANDSHAKE_TIMEOUT_S", lambda t: t.handshake_s),
    ("migrated.wire.limits", "KEEPALIVE_INTERVAL_S", lambda t: t.keepalive_s),
    ("migrated.wire.limits", "COMMIT_TIMEOUT_S", lambda t: t.commit_s),
    ("migrated.daemon.manager", "IO_TIMEOUT_S", lambda t: t.io_s),
    ("migrated.daemon.control", "IDLE_TIMEOUT_S", lambda t: t.control_idle_s),
    ("migrated.daemon.tls", "HANDSHAKE_TIMEOUT_S", lambda t: t.handshake_s),
    ("migrated.daemon.tls", "CONNECT_TIMEOUT_S", lambda t: t.connect_s),
    ("migrated.daemon.tls", "TCP_USER_TIMEOUT_MS", lambda t: int(t.io_s * 1000)),
    ("migrated.daemon.tls", "KEEPALIVE_IDLE_S", lambda t: max(1, int(t.idle_s / 2))),
    ("migrated.daemon.tls", "KEEPALIVE_INTERVAL_S", lambda t: 1),
    ("migrated.daemon.tls", "KEEPALIVE_COUNT", lambda t: 2),
]


def _apply_timeouts(t: Timeouts) -> None:
    """In the daemon's process, before main(): lower every timeout."""
    import functools
    import importlib
    for modname, attr, value in _TIMEOUT_PATCHES:
        mod = importlib.import_module(modname)
        if not hasattr(mod, attr):
            raise SystemExit(f"cluster launcher: {modname}.{attr} no longer exists; "
                             "update tests/cluster.py _TIMEOUT_PATCHES")
        setattr(mod, attr, value(t))
    # Defaults bound when the functions/classes were defined.
    tls = importlib.import_module("migrated.daemon.tls")
    tls.client_connect.__kwdefaults__["timeout"] = t.connect_s
    tls.server_handshake.__defaults__ = (t.handshake_s,)
    dest = importlib.import_module("migrated.engine.dest")
    dest.DestLimits = functools.partial(dest.DestLimits, idle_timeout_s=t.idle_s,
                                        handshake_timeout_s=t.handshake_s)


def _launcher_main(argv: list[str]) -> int:
    """``python tests/cluster.py daemon [--timeouts JSON] -- DAEMON ARGS``"""
    if not argv or argv[0] != "daemon":
        print(__doc__, file=sys.stderr)
        return 2
    argv = argv[1:]
    timeouts = None
    if argv and argv[0] == "--timeouts":
        timeouts = Timeouts(**json.loads(argv[1]))
        argv = argv[2:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if timeouts is not None:
        _apply_timeouts(timeouts)
    from migrated.daemon.main import main
    return main(argv)


# -- /proc figures -------------------------------------------------------------

def proc_state(pid: int) -> str | None:
    """One-letter state of ``pid`` (R, S, T, Z...), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    return int(proc_status(pid)["VmRSS"].split()[0])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def wait_until(fn: Callable[[], Any], timeout: float, what: str = "condition",
               poll: float = POLL_S) -> Any:
    """The first truthy value of ``fn()`` within ``timeout`` s, else raise."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def wait_not_stopped(pid: int, timeout: float) -> bool:
    """True once ``pid`` is not in state T/t (or is gone) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        st = proc_state(pid)
        if st not in ("T", "t"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)


# -- logs ------------------------------------------------------------------------

_KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_kv(line: str) -> dict[str, Any]:
    """A daemon log line (key=value, values bare or JSON-quoted) as a dict;
    JSON log lines are accepted too."""
    line = line.strip()
    if line.startswith("{"):
        try:
            return json.loads(line)
        except ValueError:
            return {}
    out: dict[str, Any] = {}
    for k, v in _KV.findall(line):
        if v.startswith('"'):
            try:
                v = json.loads(v)
            except ValueError:
                pass
        out[k] = v
    return out


class LogFollower:
    """Reads a daemon's log file from a starting offset onwards."""

    def __init__(self, path: str, from_start: bool = False):
        self.path = path
        self.offset = 0 if from_start else (os.path.getsize(path) if os.path.exists(path) else 0)
        self._partial = b""
        self.seen: list[dict] = []

    def poll(self) -> list[dict]:
        """New complete lines since the last call, parsed."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        got = [parse_kv(l.decode(errors="replace")) for l in lines if l.strip()]
        self.seen.extend(got)
        return got

    def wait(self, pred: Callable[[dict], bool], timeout: float,
             what: str = "a log line", abort: Callable[[], str | None] | None = None) -> dict:
        """The first line (already seen or new) matching ``pred``.  ``abort``
        returning a reason stops the wait early (TimeoutError)."""
        for rec in self.seen:
            if pred(rec):
                return rec
        deadline = time.monotonic() + timeout
        while True:
            for rec in self.poll():
                if pred(rec):
                    return rec
            if abort is not None:
                reason = abort()
                if reason:
                    raise TimeoutError(f"gave up waiting for {what}: {reason}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {what} in {self.path} within {timeout:g} s")
            time.sleep(POLL_S)


def event_is(event: str, mid: str | None = None, **fields: Any) -> Callable[[dict], bool]:
    """Predicate for LogFollower.wait: event name, migration id, fields."""
    def pred(rec: dict) -> bool:
        if rec.get("event") != event:
            return False
        if mid is not None and rec.get("mid") != mid:
            return False
        return all(str(rec.get(k)) == str(v) for k, v in fields.items())
    return pred


# -- control socket ----------------------------------------------------------------

class ControlError(RuntimeError):
    pass


def control_request(path: str, obj: dict, timeout: float = CONTROL_TIMEOUT_S) -> Any:
    """One request on a daemon's control socket; the ``result`` (or
    ControlError with the daemon's ``error``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(obj).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ControlError(f"{path}: connection closed without an answer")
            buf += chunk
    reply = json.loads(buf.split(b"\n", 1)[0])
    if "error" in reply:
        raise ControlError(reply["error"])
    return reply.get("result")


# -- daemons ------------------------------------------------------------------------

class Daemon:
    """One `migrated` subprocess (see the module doc)."""

    def __init__(self, cluster: "Cluster", name: str, *, ns: str | None = None,
                 host: str | None = None, port: int = 0, state_dir: str | None = None,
                 tls: bool | None = None, extra: Iterable[str] = (),
                 timeouts: Timeouts | None = None, cert: str | None = None):
        self.cluster = cluster
        self.name = name
        self.ns = ns
        self.host = host or cluster.host_ip(ns)
        self.requested_port = port
        self.state_dir = state_dir or os.path.join(cluster.base, f"{name}-state")
        self.control = os.path.join(cluster.base, f"{name}.sock")
        self.log_path = os.path.join(cluster.base, f"{name}.log")
        self.tls = cluster.tls if tls is None else tls
        self.extra = list(extra)
        self.timeouts = timeouts if timeouts is not None else cluster.timeouts
        self.cert = cert or name
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.starts = 0
        self._logf = None

    # -- lifetime --------------------------------------------------------------

    def argv(self) -> list[str]:
        # Once a port was picked, restarts keep it (peers and proxies dial it).
        port = self.port or self.requested_port
        args = ["--listen", f"{self.host}:{port}", "--control", self.control,
                "--state-dir", self.state_dir, "--node", self.name,
                "--config", "/dev/null"]          # never the host's /etc/migrated
        if self.tls:
            cert, key = self.cluster.node_cert(self.cert)
            args += ["--tls-ca", self.cluster.ca, "--tls-cert", cert, "--tls-key", key]
        else:
            args.append("--insecure")
        args += self.extra
        if self.timeouts is not None:
            launcher = [PY, os.path.abspath(__file__), "daemon", "--timeouts",
                        json.dumps(dataclasses.asdict(self.timeouts)), "--"]
        else:
            launcher = [PY, "-m", "migrated.daemon.main"]
        cmd = launcher + args
        if self.ns is not None:
            cmd = self.cluster.hosts.cmd(self.cluster.ns_name(self.ns), cmd)
        return cmd

    def start(self) -> "Daemon":
        if self.alive:
            raise RuntimeError(f"daemon {self.name} is already running (PID {self.pid})")
        if self._logf is None:
            self._logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=self._logf, stderr=self._logf,
                                     stdin=subprocess.DEVNULL, cwd=ROOT,
                                     env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
        self.starts += 1
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited with status "
                                   f"{self.proc.returncode} at start:\n{self.log_tail()}")
            try:
                info = control_request(self.control, {"op": "status"}, timeout=2)
                if info.get("pid") == self.proc.pid:
                    break
            except (OSError, ValueError, ControlError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"daemon {self.name} did not answer within "
                                   f"{DAEMON_START_TIMEOUT_S:g} s:\n{self.log_tail()}")
            time.sleep(0.02)
        self.port = int(info["listen"].rsplit(":", 1)[1])
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Signal our own daemon process (never anything else)."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is None:
            return
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGCONT (a test may have stopped it), SIGTERM, then SIGKILL."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def restart(self) -> "Daemon":
        """Kill if needed, start again on the same state dir and port."""
        if self.alive:
            self.kill()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._logf is not None:
            self._logf.close()
            self._logf = None

    # -- figures ---------------------------------------------------------------

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def fd_count(self) -> int:
        return fd_count(self.pid)

    def thread_count(self) -> int:
        return thread_count(self.pid)

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def follow(self, from_start: bool = False) -> LogFollower:
        return LogFollower(self.log_path, from_start)

    # -- control -----------------------------------------------------------------

    def request(self, obj: dict, timeout: float = CONTROL_TIMEOUT_S) -> Any:
        return control_request(self.control, obj, timeout)

    def send(self, pid: int, host: str, port: int, **options: Any) -> str:
        """Start a migration; its id (the migration id both daemons log)."""
        res = self.request({"op": "send", "pid": pid, "host": host, "port": port,
                            "options": options})
        return res["id"]

    def status(self, ident: str, timeout: float = CONTROL_TIMEOUT_S) -> dict | None:
        """Full status of a migration, None if this daemon does not know it."""
        try:
            return self.request({"op": "status", "id": ident}, timeout)
        except ControlError as e:
            if "no migration" in str(e):
                return None
            raise

    def list(self) -> list[dict]:
        return self.request({"op": "list"})

    def active(self) -> list[dict]:
        return [m for m in self.list() if m.get("state") not in DONE_STATES]

    def wait_done(self, ident: str, timeout: float = 60.0) -> dict:
        """Poll until the migration is finished; its full status."""
        def done():
            st = self.status(ident)
            return st if st is not None and st.get("state") in DONE_STATES else None
        return wait_until(done, timeout, f"migration {ident} to end on {self.name}", poll=0.02)

    def wait_idle(self, timeout: float = 30.0) -> None:
        wait_until(lambda: not self.active(), timeout, f"{self.name} to be idle", poll=0.05)

    def migrate(self, pid: int, peer: "Daemon", timeout: float = 60.0, **options: Any) -> dict:
        """Send ``pid`` to ``peer`` and wait: the summary (status, image_id...)."""
        mid = self.send(pid, peer.host, peer.port, **options)
        st = self.wait_done(mid, timeout)
        s = dict(st.get("summary") or {})
        s.setdefault("migration_id", mid)
        s.setdefault("status", st.get("state"))
        return s

    # -- the image store -------------------------------------------------------------

    def store(self):
        from migrated.image import ImageStore
        return ImageStore(self.state_dir, min_free_bytes=0, create=False)

    def images(self, migration_id: str | None = None) -> list[dict]:
        """Complete images in the state dir (of one migration if given)."""
        try:
            rows = self.store().list()
        except FileNotFoundError:
            return []
        if migration_id is not None:
            rows = [r for r in rows if r.get("migration_id") == migration_id]
        return rows

    def partials(self) -> list[str]:
        try:
            return os.listdir(os.path.join(self.state_dir, "partial"))
        except FileNotFoundError:
            return []

    def journal(self) -> list[str]:
        """Frozen-PID journal records left in the state dir."""
        try:
            return [n for n in os.listdir(os.path.join(self.state_dir, "frozen"))
                    if n.endswith(".json")]
        except FileNotFoundError:
            return []

    def remove_images(self) -> None:
        store = self.store()
        for r in self.images():
            with contextlib.suppress(Exception):
                store.remove(r["image_id"])


# -- the cluster -----------------------------------------------------------------------

class Cluster:
    """A temp dir, throwaway certificates, daemons, tmpfs mounts; all
    cleaned up by close() / the with block."""

    def __init__(self, *, tls: bool = True, timeouts: Timeouts | None = None,
                 hosts=None, base: str | None = None, names: Iterable[str] = ()):
        self.tls = tls
        self.timeouts = timeouts
        self.hosts = hosts                   # tests.netns.TwoHosts (entered) or None
        self.base = base or tempfile.mkdtemp(prefix="migrated-cluster-", dir="/tmp")
        os.chmod(self.base, 0o755)
        self.daemons: list[Daemon] = []
        self._mounts: list[str] = []
        self._certdir: str | None = None
        self._foreign: str | None = None
        self._names = list(names)

    # -- certificates ---------------------------------------------------------------

    def _sans(self) -> list[str]:
        sans = ["127.0.0.1", "localhost"]
        if self.hosts is not None:
            sans += [self.hosts.a_ip, self.hosts.b_ip]
        return sans

    @property
    def certdir(self) -> str:
        if self._certdir is None:
            from migrated.daemon import certs
            d = os.path.join(self.base, "certs")
            certs.init_ca(d)
            self._certdir = d
        return self._certdir

    @property
    def ca(self) -> str:
        return os.path.join(self.certdir, "ca.pem")

    def node_cert(self, name: str) -> tuple[str, str]:
        """(cert, key) for ``name`` signed by the cluster CA (made on first use)."""
        d = self.certdir
        cert, key = os.path.join(d, f"{name}.pem"), os.path.join(d, f"{name}.key")
        if not os.path.exists(cert):
            from migrated.daemon import certs
            certs.issue(d, name, self._sans())
        return cert, key

    def foreign_cert(self, name: str) -> tuple[str, str, str]:
        """(cert, key, ca) from another CA the cluster does not trust."""
        from migrated.daemon import certs
        if self._foreign is None:
            self._foreign = os.path.join(self.base, "foreign-certs")
            certs.init_ca(self._foreign, "some other CA")
        cert = os.path.join(self._foreign, f"{name}.pem")
        if not os.path.exists(cert):
            certs.issue(self._foreign, name, self._sans())
        return cert, os.path.join(self._foreign, f"{name}.key"), \
            os.path.join(self._foreign, "ca.pem")

    # -- hosts --------------------------------------------------------------------------

    def ns_name(self, ns: str) -> str:
        assert self.hosts is not None, "Cluster(hosts=TwoHosts(...)) for namespaces"
        return {"a": self.hosts.a, "b": self.hosts.b}[ns]

    def host_ip(self, ns: str | None) -> str:
        if ns is None:
            return "127.0.0.1"
        return {"a": self.hosts.a_ip, "b": self.hosts.b_ip}[ns]

    # -- daemons ------------------------------------------------------------------------

    def daemon(self, name: str, start: bool = True, **kw: Any) -> Daemon:
        d = Daemon(self, name, **kw)
        self.daemons.append(d)
        return d.start() if start else d

    def tmpfs(self, name: str, size: str) -> str:
        """A tmpfs of ``size`` (mount syntax, e.g. 64M) at <base>/<name>."""
        path = os.path.join(self.base, name)
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                        "tmpfs", path], check=True, capture_output=True)
        self._mounts.append(path)
        return path

    def close(self) -> None:
        for d in self.daemons:
            with contextlib.suppress(Exception):
                d.close()
        for m in reversed(self._mounts):
            subprocess.run(["umount", "-l", m], capture_output=True)
        self._mounts.clear()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tmpfs_available() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def fill_disk(path: str, leave: int = 0, name: str = "filler") -> str:
    """Fill the filesystem holding ``path`` until at most ``leave`` bytes are
    free; returns the filler file (remove it to undo)."""
    filler = os.path.join(path, name)
    chunk = b"\xa5" * (1 << 20)
    with open(filler, "ab") as f:
        while True:
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                f.write(chunk[:max(4096, min(len(chunk), free - leave))])
                f.flush()
            except OSError:
                break
    return filler


if __name__ == "__main__":
    sys.exit(_launcher_main(sys.argv[1:]))
