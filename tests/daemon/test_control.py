"""The control socket: file permissions, SO_PEERCRED authorisation, bounded
requests, and a daemon (subprocess) answering migratectl."""

from __future__ import annotations

import json
import os
import socket
import stat
import time


from .conftest import control_request, ctl

NOBODY = 65534
NOGROUP = 65534
OTHER_GID = 4242        # a gid no file here belongs to


def as_nobody(fn, *, with_group: bool) -> dict:
    """Run fn() in a forked child that dropped to uid nobody; return what it
    returned (a JSON-able dict) or {"exc": ...}."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # child
        try:
            os.close(r)
            os.setgroups([NOGROUP] if with_group else [])
            # Without the group, even the primary gid must not be nogroup.
            os.setgid(NOGROUP if with_group else OTHER_GID)
            os.setuid(NOBODY)
            try:
                out = fn()
            except OSError as e:
                out = {"exc": type(e).__name__, "errno": e.errno}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def requests(path: str, *reqs: dict) -> list[dict]:
    out = []
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        f = s.makefile("rwb")
        for req in reqs:
            f.write(json.dumps(req).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                out.append(msg)
                if "event" not in msg:
                    break
    return out


def test_socket_mode_root_only(daemons):
    d = daemons("n1")
    st = os.stat(d.control)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == 0
    res = as_nobody(lambda: control_request(d.control, {"op": "list"}), with_group=True)
    assert res.get("exc") == "PermissionError"


def test_parent_dir_created_0755(daemons):
    sub = os.path.join(daemons.base, "run", "migrated")
    d = daemons("n1", extra=["--control", os.path.join(sub, "control.sock")])
    assert stat.S_IMODE(os.stat(sub).st_mode) == 0o755
    assert control_request(os.path.join(sub, "control.sock"), {"op": "list"}) == {"result": []}
    assert d.proc.poll() is None


def test_group_socket_and_peercred_denial(daemons, children):
    d = daemons("n1", extra=["--control-group", "nogroup"])
    st = os.stat(d.control)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOGROUP and st.st_uid == 0
    # Without the group, nobody cannot even connect.
    res = as_nobody(lambda: control_request(d.control, {"op": "list"}), with_group=False)
    assert res.get("exc") == "PermissionError"
    # With it, nobody connects, but may not act on a root process.
    root_proc = children()
    req = {"op": "send", "pid": root_proc.pid, "host": "127.0.0.1", "port": 1, "follow": True}
    res = as_nobody(lambda: control_request(d.control, req), with_group=True)
    assert "error" in res and "permission denied" in res["error"], res
    assert f"process {root_proc.pid} belongs to uid 0" in res["error"]
    # ... but may on its own process (it gets as far as connecting).
    own = children("sleep", "600", user=NOBODY, group=NOGROUP)
    req = {"op": "send", "pid": own.pid, "host": "127.0.0.1", "port": 1, "follow": True}
    res = as_nobody(lambda: requests(d.control, req)[-1], with_group=True)
    assert res.get("result", {}).get("status") == "failed", res
    assert "cannot connect" in res["result"]["error"]
    # Root sees nobody's migration; nobody does not see root's.
    listed = control_request(d.control, {"op": "list"})["result"]
    assert [m["owner_uid"] for m in listed] == [NOBODY]
    r = control_request(d.control, {"op": "send", "pid": root_proc.pid, "host": "127.0.0.1",
                                    "port": 1})
    mine = r["result"]["id"]
    res = as_nobody(lambda: control_request(d.control, {"op": "list"}), with_group=True)
    assert [m["owner_uid"] for m in res["result"]] == [NOBODY]
    res = as_nobody(lambda: control_request(d.control, {"op": "cancel", "id": mine}),
                    with_group=True)
    assert "no migration" in res["error"]


def test_bad_requests(daemons):
    d = daemons("n1")
    assert "unknown op" in control_request(d.control, {"op": "format-disk"})["error"]
    assert "pid must be" in control_request(d.control, {"op": "send", "pid": "1",
                                                        "host": "h", "port": 1})["error"]
    assert "does not exist" in control_request(d.control, {"op": "send", "pid": 2**22 + 7,
                                                           "host": "h", "port": 1})["error"]
    assert "unknown send option" in control_request(
        d.control, {"op": "send", "pid": os.getpid(), "host": "h", "port": 1,
                    "options": {"rm_rf": True}})["error"]
    assert "no migration" in control_request(d.control, {"op": "status", "id": "nope"})["error"]
    # A trailing newline is not part of a name ("$" matched before it, and
    # the tracker name reached the log as a second line).
    assert "bad tracker name" in control_request(
        d.control, {"op": "send", "pid": os.getpid(), "host": "h", "port": 1,
                    "options": {"tracker": "auto\n"}})["error"]
    assert "no migration" in control_request(d.control, {"op": "status", "id": "nope\n"})["error"]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(d.control)
        s.sendall(b"not json\n")
        assert b"bad request" in s.recv(4096)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(d.control)
        try:
            s.sendall(b'{"op": "list", "pad": "' + b"x" * 200_000 + b'"}\n')
        except (BrokenPipeError, ConnectionResetError):
            pass    # the daemon answered and hung up before reading all of it
        reply = b""
        try:
            while chunk := s.recv(4096):
                reply += chunk
        except ConnectionResetError:
            pass    # after the answer: it closed with our bytes unread
        assert b"request too long" in reply
    assert d.proc.poll() is None   # still serving
    assert control_request(d.control, {"op": "list"}) == {"result": []}


def test_an_option_no_float_holds_gets_an_answer(daemons):
    """An integer option past any float (JSON has no size limit) raised
    OverflowError out of the control handler: no reply, the connection cut,
    a traceback in the log (found by fuzzing the control socket)."""
    d = daemons("n1")
    for key in ("max_bandwidth", "timeout_s"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(d.control)
            s.sendall(b'{"op": "send", "pid": %d, "host": "h", "port": 1, "options": {"%s": 1%s}}\n'
                      % (os.getpid(), key.encode(), b"0" * 400))
            reply = json.loads(s.recv(65536) or b"{}")
        assert "no float holds it" in reply.get("error", ""), (key, reply)
    assert d.proc.poll() is None
    assert "Traceback" not in d.log()

def test_migratectl_list_status_against_daemon(daemons):
    d = daemons("n1", extra=["--max-migrations", "3"])
    r = ctl(d.control, "list")
    assert r.returncode == 0 and "no migrations" in r.stdout
    r = ctl(d.control, "list", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = ctl(d.control, "status", "--json")
    info = json.loads(r.stdout)
    assert info["node"] == "n1" and info["max_migrations"] == 3 and info["tls"] is False
    r = ctl(d.control, "status")
    assert r.returncode == 0 and "node n1" in r.stdout and "INSECURE" in r.stdout
    r = ctl(d.control, "status", "nope")
    assert r.returncode == 1 and "no migration nope" in r.stderr
    r = ctl(os.path.join(daemons.base, "absent.sock"), "list")
    assert r.returncode == 1 and "is migrated running?" in r.stderr
    # --control also after the command, and then it wins over the outer one.
    absent = os.path.join(daemons.base, "absent.sock")
    r = ctl(absent, "status", "--json", "--control", d.control)
    assert r.returncode == 0 and json.loads(r.stdout)["node"] == "n1"
    r = ctl(d.control, "list", "--control", absent)
    assert r.returncode == 1 and absent in r.stderr


def silent_peer():
    """A TCP listener that never accepts: TLS handshakes to it hang."""
    s = socket.create_server(("127.0.0.1", 0), backlog=16)
    return s, s.getsockname()[1]


def wait_status(control, mid, want, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = control_request(control, {"op": "status", "id": mid})["result"]
        if st["state"] == want:
            return st
        time.sleep(0.05)
    raise AssertionError(f"{mid} never reached {want}: {st}")


def test_busy_limit_and_cancel_while_connecting(daemons, certdir, children):
    d = daemons("a", certdir, extra=["--max-migrations", "1"])
    srv, port = silent_peer()
    try:
        t1, t2 = children(), children()
        r = control_request(d.control, {"op": "send", "pid": t1.pid, "host": "127.0.0.1",
                                        "port": port})
        mid = r["result"]["id"]
        r2 = control_request(d.control, {"op": "send", "pid": t2.pid, "host": "127.0.0.1",
                                         "port": port})
        assert "busy" in r2["error"] and "--max-migrations 1" in r2["error"]
        again = control_request(d.control, {"op": "send", "pid": t1.pid, "host": "127.0.0.1",
                                            "port": port})
        assert "error" in again
        t0 = time.monotonic()
        r = ctl(d.control, "cancel", mid)
        assert r.returncode == 0, r.stderr
        st = wait_status(d.control, mid, "cancelled", timeout=5)
        assert time.monotonic() - t0 < 5     # not the 10 s handshake timeout
        assert "cancelled by operator" in st["summary"]["error"]
        r = ctl(d.control, "cancel", mid)
        assert r.returncode == 1 and "already finished" in r.stderr
        # The slot is free again.
        r2 = control_request(d.control, {"op": "send", "pid": t2.pid, "host": "127.0.0.1",
                                         "port": port})
        assert "result" in r2
        control_request(d.control, {"op": "cancel", "id": r2["result"]["id"]})
    finally:
        srv.close()
    assert "event=cancel" in d.log() and f"mid={mid}" in d.log()
