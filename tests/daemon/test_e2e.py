"""End to end through the daemons: two `migrated` on loopback with
throwaway certificates, `migratectl send` against a real workload."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import time

import pytest

from .conftest import PY, ROOT, control_request, ctl, proc_state, wait_state

# Workload start-up (numpy import + filling its memory) on a loaded box.
WORKLOAD_READY_S = 30.0


@contextlib.contextmanager
def workload(mib: int, rate: int):
    p = subprocess.Popen([PY, "-m", "migrated.workload", "--mib", str(mib), "--rate", str(rate)],
                         stdout=subprocess.PIPE, cwd=ROOT,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    try:
        r, _, _ = select.select([p.stdout], [], [], WORKLOAD_READY_S)
        assert r, "workload did not start"
        line = p.stdout.readline().decode()
        assert line.startswith("ready"), line
        yield p
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)   # works on a stopped process too
        p.wait(10)
        p.stdout.close()


@pytest.fixture
def pair(daemons, certdir):
    a = daemons("a", certdir)
    b = daemons("b", certdir)
    return a, b


def send(a, pid, port, *extra, timeout=120):
    r = ctl(a.control, "send", str(pid), f"127.0.0.1:{port}", "--json", *extra, timeout=timeout)
    assert r.stdout.strip(), r.stderr
    return r.returncode, json.loads(r.stdout)


def wait_for(fn, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_send_completes(pair):
    a, b = pair
    with workload(16, 500) as w:
        rc, s = send(a, w.pid, b.port, "--then", "resume")
        assert rc == 0 and s["status"] == "completed", s
        assert s["image_id"] and s["rounds"] and s["freeze_ms"] is not None
        assert s["bytes_sent"] >= 16 << 20
        # Two daemons agree on "backlog": the destination reported its disk.
        assert s["dest_reports"] >= 1 and s["dest_wait_ms"] >= 0
        for r in s["rounds"]:
            assert {"round", "pages", "bytes", "duration_ms", "dirty_rate", "bandwidth",
                    "pause_ms"} <= set(r)
        assert wait_state(w.pid, "S") or proc_state(w.pid) == "R"
        # The receiving daemon lists the same migration, completed, same image.
        got = control_request(b.control, {"op": "status", "id": s["migration_id"]})["result"]
        assert got["role"] == "receive" and got["state"] == "completed"
        assert got["image_id"] == s["image_id"]
        assert os.path.isdir(os.path.join(b.state_dir, "images", s["image_id"]))
    mid = s["migration_id"]
    for d in (a, b):
        lines = [l for l in d.log().splitlines() if f"mid={mid}" in l]
        events = {l.split("event=")[1].split()[0] for l in lines}
        assert {"start", "round", "freeze", "commit", "end"} <= events, (d.name, events)
    # The sender's status keeps the rounds.
    st = control_request(a.control, {"op": "status", "id": mid})["result"]
    assert st["state"] == "completed" and len(st["round_list"]) == len(s["rounds"])


def test_send_table_on_terminal_output(pair):
    a, b = pair
    with workload(8, 200) as w:
        r = ctl(a.control, "send", str(w.pid), f"127.0.0.1:{b.port}", "--then", "resume")
        assert r.returncode == 0, r.stdout + r.stderr + "\nSRC\n" + a.log() + "\nDST\n" + b.log()
        assert "round" in r.stdout and "dirty MiB/s" in r.stdout and "status: completed" in r.stdout


def test_cancel_mid_migration_then_migrate_again(pair):
    a, b = pair
    with workload(32, 500) as w:
        r = control_request(a.control, {"op": "send", "pid": w.pid, "host": "127.0.0.1",
                                        "port": b.port,
                                        "options": {"max_bandwidth": 2 << 20, "then": "resume"}})
        mid = r["result"]["id"]
        wait_for(lambda: control_request(a.control, {"op": "status", "id": mid})
                 ["result"]["state"] == "running", what="running")
        t0 = time.monotonic()
        assert ctl(a.control, "cancel", mid).returncode == 0
        st = wait_for(lambda: (lambda x: x if x["state"] == "cancelled" else None)(
            control_request(a.control, {"op": "status", "id": mid})["result"]),
            what="cancelled")
        assert time.monotonic() - t0 < 10
        assert st["summary"]["status"] == "cancelled"
        assert proc_state(w.pid) != "T"
        # The destination dropped its partial image and says so.
        wait_for(lambda: control_request(b.control, {"op": "status", "id": mid})
                 .get("result", {}).get("state") in ("cancelled", "failed"), what="dest end")
        assert not os.listdir(os.path.join(b.state_dir, "images"))
        rc, s = send(a, w.pid, b.port, "--then", "resume")
        assert rc == 0 and s["status"] == "completed", s


def test_daemon_killed_while_target_frozen_is_thawed_on_restart(daemons, certdir):
    """Issue 5: SIGKILL the source daemon during a freeze; the restarted
    daemon thaws the target from its journal."""
    a = daemons("a", certdir)
    b = daemons("b", certdir)
    with workload(32, 0) as w:
        # Stop-and-copy at 2 MiB/s: frozen for ~16 s, plenty to kill it.
        r = control_request(a.control, {"op": "send", "pid": w.pid, "host": "127.0.0.1",
                                        "port": b.port,
                                        "options": {"max_rounds": 0, "max_bandwidth": 2 << 20,
                                                    "then": "resume"}})
        assert "result" in r, r
        assert wait_state(w.pid, "T", timeout=20)
        journal = os.path.join(a.state_dir, "frozen", f"{w.pid}.json")
        assert os.path.exists(journal)
        a.proc.kill()
        a.proc.wait()
        time.sleep(0.3)
        assert proc_state(w.pid) == "T"          # nobody thawed it yet
        a.start()                                 # same state dir
        assert wait_state(w.pid, "S", timeout=5) or proc_state(w.pid) == "R"
        assert not os.path.exists(journal)
        assert "journal_thawed" in a.log()
        # The destination noticed and kept no complete image.
        wait_for(lambda: not [m for m in control_request(b.control, {"op": "list"})["result"]
                              if m["state"] not in ("failed", "cancelled")], timeout=40,
                 what="destination gives up")
        assert not os.listdir(os.path.join(b.state_dir, "images"))
        # And the pair still migrates it.
        rc, s = send(a, w.pid, b.port, "--then", "resume")
        assert rc == 0 and s["status"] == "completed", s


def test_allow_peer_enforced_by_receiver(daemons, certdir, children):
    a = daemons("a", certdir)
    b = daemons("b", certdir, extra=["--allow-peer", "c"])
    target = children()
    rc, s = send(a, target.pid, b.port, "--then", "resume")
    assert rc == 1 and s["status"] == "failed"
    assert "does not accept migrations from this peer" in s["error"], s
    assert proc_state(target.pid) != "T"
    assert "peer_rejected" in b.log() and "not in --allow-peer" in b.log()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS:")).split()[1])


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# Idle connections opened by the flood test, and how much the daemon's RSS
# may grow meanwhile (a thread per connection would cost far more).
FLOOD_CONNECTIONS = 400
FLOOD_RSS_GROWTH_KIB = 32 * 1024


def test_idle_connection_flood_is_bounded(pair):
    a, b = pair
    from migrated.daemon.listener import MAX_PENDING_HANDSHAKES, MAX_PENDING_PER_ADDR
    rss0 = rss_kib(b.proc.pid)
    idle = []
    try:
        for _ in range(FLOOD_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", b.port)))
        refused = FLOOD_CONNECTIONS - MAX_PENDING_PER_ADDR
        wait_for(lambda: b.log().count("event=peer_refused") >= refused, what="refusals")
        assert thread_count(b.proc.pid) < MAX_PENDING_HANDSHAKES + 16
        assert rss_kib(b.proc.pid) - rss0 < FLOOD_RSS_GROWTH_KIB
    finally:
        for s in idle:
            s.close()
    assert b.proc.poll() is None
    with workload(4, 0) as w:
        rc, s = send(a, w.pid, b.port, "--then", "resume")
        assert rc == 0, s


def test_sigterm_cancels_and_thaws(daemons, certdir):
    a = daemons("a", certdir)
    b = daemons("b", certdir)
    with workload(32, 0) as w:
        r = control_request(a.control, {"op": "send", "pid": w.pid, "host": "127.0.0.1",
                                        "port": b.port,
                                        "options": {"max_rounds": 0, "max_bandwidth": 2 << 20,
                                                    "then": "resume"}})
        assert "result" in r
        assert wait_state(w.pid, "T", timeout=20)
        assert a.stop(signal.SIGTERM) == 0
        assert proc_state(w.pid) != "T"
        assert "daemon shutting down" in a.log()


def test_receiver_busy_is_reported_to_sender(daemons, certdir):
    a = daemons("a", certdir)
    b = daemons("b", certdir, extra=["--max-migrations", "1"])
    with workload(16, 0) as w1, workload(4, 0) as w2:
        r = control_request(a.control, {"op": "send", "pid": w1.pid, "host": "127.0.0.1",
                                        "port": b.port,
                                        "options": {"max_bandwidth": 2 << 20, "then": "resume"}})
        mid = r["result"]["id"]
        wait_for(lambda: control_request(b.control, {"op": "status"})["result"]["receiving"] == 1,
                 what="first migration received")
        rc, s = send(a, w2.pid, b.port, "--then", "resume")
        assert rc == 1 and s["status"] == "failed" and "busy" in s["error"], s
        assert proc_state(w2.pid) != "T"
        control_request(a.control, {"op": "cancel", "id": mid})
    assert "peer_refused" in b.log()


def test_cancel_while_frozen(pair):
    a, b = pair
    with workload(32, 0) as w:
        r = control_request(a.control, {"op": "send", "pid": w.pid, "host": "127.0.0.1",
                                        "port": b.port,
                                        "options": {"max_rounds": 0, "max_bandwidth": 2 << 20,
                                                    "then": "resume"}})
        mid = r["result"]["id"]
        assert wait_state(w.pid, "T", timeout=20)
        assert ctl(a.control, "cancel", mid).returncode == 0
        assert wait_for(lambda: proc_state(w.pid) != "T", timeout=5, what="thaw")
        st = wait_for(lambda: (lambda x: x if x["state"] == "cancelled" else None)(
            control_request(a.control, {"op": "status", "id": mid})["result"]), what="end")
        assert "cancelled by operator" in st["summary"]["error"]
        assert not os.listdir(os.path.join(a.state_dir, "frozen"))
        rc, s = send(a, w.pid, b.port, "--then", "resume")
        assert rc == 0 and s["status"] == "completed", s
