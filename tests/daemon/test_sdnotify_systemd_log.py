"""sd_notify over a real datagram socket, the unit verified by systemd, and
the one-line-per-event log formats."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess

import pytest

from migrated.daemon.log import EventLog
from migrated.daemon.sdnotify import Notifier

from .conftest import ROOT


def test_notifier_sends_datagrams(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        rx.settimeout(5)
        n = Notifier(path)
        assert n.ready("0 sending")
        msg = rx.recv(4096).decode().split("\n")
        assert "READY=1" in msg and "STATUS=0 sending" in msg
        assert n.status("1 sending")
        assert rx.recv(4096) == b"STATUS=1 sending"
        n.close()
    assert not Notifier("").enabled and Notifier("").ready() is False


def test_notifier_abstract_address():
    name = f"migrated-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind("\0" + name)
        rx.settimeout(5)
        assert Notifier("@" + name).notify("WATCHDOG=1")
        assert rx.recv(100) == b"WATCHDOG=1"


def test_daemon_sends_ready_and_status(daemons, tmp_path):
    path = os.path.join(daemons.base, "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        rx.settimeout(20)
        d = daemons("n1", env={"NOTIFY_SOCKET": path})
        msg = rx.recv(4096).decode().split("\n")
        assert "READY=1" in msg and f"MAINPID={d.proc.pid}" in msg
        assert any(m.startswith("STATUS=0 sending, 0 receiving") for m in msg)
        d.stop()
        assert b"STOPPING=1" in rx.recv(4096)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_verifies(tmp_path):
    with open(os.path.join(ROOT, "systemd", "migrated.service")) as f:
        unit = f.read()
    settings = [l.strip() for l in unit.splitlines() if l.strip() and not l.startswith("#")]
    # Nothing may hide the targets' /proc entries from the daemon.
    assert not [l for l in settings if l.startswith(("ProtectProc=", "ProcSubset=",
                                                     "PrivatePIDs=", "PrivateUsers="))]
    for needed in ("Type=notify", "--thaw-journal", "CAP_SYS_PTRACE", "StateDirectory=migrated",
                   "RuntimeDirectory=migrated", "Restart=on-failure"):
        assert needed in unit
    exe = shutil.which("migrated") or os.path.join(os.path.dirname(os.sys.executable), "migrated")
    assert os.access(exe, os.X_OK), exe
    path = tmp_path / "migrated.service"
    path.write_text(unit.replace("/usr/local/bin/migrated", exe))
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # Warnings (unknown keys, bad values) do not change the exit code.
    assert (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr


def test_log_kv_and_json():
    buf = io.StringIO()
    log = EventLog("kv", buf)
    log.migration_event({"event": "round", "migration_id": "abc", "round": 3, "pages": 10,
                         "bytes": 40960, "duration_ms": 1.5, "dirty_rate": 2.0,
                         "bandwidth": 1e9, "pause_ms": 0.25}, "send")
    log.error("peer_rejected", peer="1.2.3.4:5", reason='evil" key=value\nnext')
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert "event=round mid=abc" in lines[0] and "round=3" in lines[0] and "role=send" in lines[0]
    assert "pause_ms=0.25" in lines[0]
    assert "mid=- " in lines[1] and 'reason="evil\\" key=value\\nnext"' in lines[1]
    # A value that ends in a newline is quoted too (a bare "^...$" match
    # let "refused\n" through: one event, two journal lines).
    buf = io.StringIO()
    EventLog("kv", buf).error("peer_rejected", peer="1.2.3.4:5", reason="refused\n")
    assert len(buf.getvalue().splitlines()) == 1, buf.getvalue()
    assert 'reason="refused\\n"' in buf.getvalue()
    buf = io.StringIO()
    EventLog("json", buf).info("commit", "m1", image_id="img")
    rec = json.loads(buf.getvalue())
    assert rec["event"] == "commit" and rec["mid"] == "m1" and rec["image_id"] == "img"
