"""Who may send what through the control socket: a kernel thread or a
thread id is named as such (not "shares its memory" / "does not exist"),
a PID its process left and another took while the daemon connected to the
peer is refused (it migrated and stopped root's process for uid nobody),
and one control-group member cannot lock root out of the socket."""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import socket
import subprocess
import threading
import time

import pytest

from migrated.daemon import control
from tests.cluster import Cluster

from .conftest import control_request
from .test_control import as_nobody

NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = grp.getgrnam("nogroup").gr_gid
WAIT_S = 30.0


def _cluster(**kw) -> Cluster:
    return Cluster(tls=False, **kw)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_kernel_thread_is_refused_as_one_before_admission():
    with _cluster() as c:
        d = c.daemon("n1")
        reply = control_request(d.control, {"op": "send", "pid": 2, "host": "127.0.0.1",
                                            "port": 1})
        assert "kernel thread" in reply.get("error", ""), reply
        assert control_request(d.control, {"op": "list"}) == {"result": []}   # no slot taken


def test_a_thread_id_names_its_process():
    with _cluster() as c:
        d = c.daemon("n1")
        p = subprocess.Popen(["python3", "-c", "import threading, time\n"
                              "threading.Thread(target=time.sleep, args=(600,)).start()\n"
                              "time.sleep(600)"])
        try:
            deadline = time.monotonic() + WAIT_S
            tids: list[int] = []
            while len(tids) < 2 and time.monotonic() < deadline:
                tids = sorted(int(t) for t in os.listdir(f"/proc/{p.pid}/task"))
                time.sleep(0.02)
            tid = [t for t in tids if t != p.pid][0]
            reply = control_request(d.control, {"op": "send", "pid": tid, "host": "127.0.0.1",
                                                "port": 1})
            err = reply.get("error", "")
            assert f"{tid} is a thread of process {p.pid}" in err, reply
        finally:
            p.kill()
            p.wait()


class _SlowDoor:
    """Accepts on a port and forwards to ``dst`` only after ``delay`` s: a
    distant peer, so the daemon's connect takes that long."""

    def __init__(self, dst: int, delay: float):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.dst, self.delay = dst, delay
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve(self) -> None:
        try:
            c, _ = self.srv.accept()
        except OSError:
            return
        time.sleep(self.delay)
        u = socket.create_connection(("127.0.0.1", self.dst))
        self.socks += [c, u]
        threading.Thread(target=self._pipe, args=(c, u), daemon=True).start()
        threading.Thread(target=self._pipe, args=(u, c), daemon=True).start()

    def close(self) -> None:
        for s in [self.srv, *self.socks]:
            s.close()


def _take_pid(pid: int) -> subprocess.Popen | None:
    """A root process at PID ``pid`` (just freed), or None if others keep
    taking it first."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = subprocess.Popen(["sleep", "600"])
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


def test_a_pid_reused_while_the_daemon_connects_is_refused():
    """uid nobody asks to migrate its own process; while the daemon connects
    to a slow peer, that process exits and root's next one takes its PID.
    The engine must refuse the process it finds there, not migrate it.
    (Over TLS: the handshake, through the slow door, comes before the
    engine takes hold of the process.)"""
    with Cluster(tls=True) as c:
        a = c.daemon("a", extra=["--control-group", "nogroup"])
        b = c.daemon("b")
        door = _SlowDoor(b.port, 2.0)
        mine = subprocess.Popen(["sleep", "600"], user=NOBODY, group=NOGROUP)
        victim = None
        try:
            req = {"op": "send", "pid": mine.pid, "host": "127.0.0.1", "port": door.port,
                   "options": {"then": "stop"}}
            reply = as_nobody(lambda: control_request(a.control, req), with_group=True)
            mid = reply["result"]["id"]
            n = mine.pid
            mine.kill()
            mine.wait()
            victim = _take_pid(n)
            if victim is None:
                pytest.skip(f"could not place a process at PID {n} (the machine is busy)")
            deadline = time.monotonic() + WAIT_S
            st = None
            while time.monotonic() < deadline:
                st = control_request(a.control, {"op": "status", "id": mid})["result"]
                if st["state"] in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.05)
            assert st is not None and st["state"] == "failed", st
            assert "reused" in (st.get("summary") or {}).get("error", ""), st
            assert _state(victim.pid) != "T"
            assert b.images() == []
        finally:
            door.close()
            if victim is not None:
                os.kill(victim.pid, signal.SIGCONT)     # never left stopped
                victim.kill()
                victim.wait()
            if mine.poll() is None:
                mine.kill()
                mine.wait()


def _hold_as_nobody(path: str, n: int, ready: int, release: int) -> int:
    """Fork a child that, as uid nobody, opens ``n`` control connections,
    writes to ``ready`` how many the daemon refused, and holds them until
    ``release`` is readable."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([NOGROUP])
            os.setgid(NOGROUP)
            os.setuid(NOBODY)
            socks, refused = [], 0
            for _ in range(n):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(WAIT_S)
                s.connect(path)
                socks.append(s)
            time.sleep(0.5)
            for s in socks:
                s.setblocking(False)
                try:
                    if b"too many control connections" in s.recv(4096):
                        refused += 1
                except BlockingIOError:
                    pass
            os.write(ready, str(refused).encode())
            os.read(release, 1)
        finally:
            os._exit(0)
    return pid


def test_one_user_cannot_lock_root_out_of_the_control_socket():
    with _cluster() as c:
        d = c.daemon("n1", extra=["--control-group", "nogroup"])
        ready_r, ready_w = os.pipe()
        rel_r, rel_w = os.pipe()
        child = _hold_as_nobody(d.control, control.MAX_CLIENTS, ready_w, rel_r)
        try:
            os.close(ready_w)
            refused = int(os.read(ready_r, 64) or b"-1")
            assert refused == control.MAX_CLIENTS - control.MAX_CLIENTS_PER_UID, refused
            # Root (and any other user) is still served.
            assert control_request(d.control, {"op": "ping"})["result"]["pong"]
        finally:
            os.write(rel_w, b"x")
            os.waitpid(child, 0)
            for fd in (ready_r, rel_r, rel_w):
                os.close(fd)


def test_root_has_connections_in_reserve():
    with _cluster() as c:
        d = c.daemon("n1", extra=["--control-group", "nogroup"])
        held = []
        try:
            for _ in range(control.MAX_CLIENTS):
                s = socket.socket(socket.AF_UNIX)
                s.connect(d.control)
                held.append(s)
            ready_r, ready_w = os.pipe()
            rel_r, rel_w = os.pipe()
            child = _hold_as_nobody(d.control, 1, ready_w, rel_r)
            os.close(ready_w)
            assert os.read(ready_r, 64) == b"1"          # everyone else is refused ...
            os.write(rel_w, b"x")
            os.waitpid(child, 0)
            for fd in (ready_r, rel_r, rel_w):
                os.close(fd)
            assert control_request(d.control, {"op": "ping"})["result"]["pong"]   # ... root not
        finally:
            for s in held:
                s.close()


def test_a_bandwidth_cap_below_the_slowest_link_rate_is_refused():
    # A batch must reach the destination within its idle timeout plus its
    # time at MIN_LINK_RATE; a slower cap could never finish a batch.
    from migrated.engine.transport import MIN_LINK_RATE
    with _cluster() as c:
        d = c.daemon("n1")
        p = subprocess.Popen(["sleep", "600"])
        try:
            for rate, ok in ((MIN_LINK_RATE - 1, False), (MIN_LINK_RATE, True)):
                reply = control_request(d.control, {"op": "send", "pid": p.pid,
                                                    "host": "127.0.0.1", "port": 1,
                                                    "options": {"max_bandwidth": rate}})
                if ok:
                    assert "result" in reply, reply
                else:
                    assert "below the slowest rate" in reply.get("error", ""), reply
            reply = control_request(d.control, {"op": "send", "pid": p.pid, "host": "127.0.0.1",
                                                "port": 1, "options": []})
            assert "options must be an object" in reply.get("error", ""), reply
        finally:
            p.kill()
            p.wait()
