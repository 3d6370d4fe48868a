"""The control socket holds nothing for a client that misbehaves: one that
never reads its replies is dropped, a request nested past the parser's
depth gets an error reply, and a send that fails before its engine runs
still answers with every key `migratectl send --json` documents."""

from __future__ import annotations

import json
import socket
import time

import pytest

from migrated.cli.client import ControlClient, ControlError
from migrated.daemon import control
from tests.cluster import Cluster, Timeouts

from .conftest import control_request, ctl

CONTROL_IDLE_S = 2.0
# Connections root may hold at once (its reserve included).
ROOT_LIMIT = control.MAX_CLIENTS + control.ROOT_RESERVED_CLIENTS
SEND_JSON_KEYS = ("status", "image_id", "tracker", "rounds", "freeze_ms", "total_ms",
                  "bytes_sent")


def _cluster() -> Cluster:
    return Cluster(tls=False, timeouts=Timeouts(control_idle_s=CONTROL_IDLE_S))


def _ping(path: str) -> dict:
    """A ping that also reads a refusal: past the limit the daemon answers
    and closes at once, and a request sent after that close fails with
    EPIPE although the refusal is there to read (CI once failed so)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10.0)
        s.connect(path)
        try:
            s.sendall(b'{"op":"ping"}\n')
        except (BrokenPipeError, ConnectionResetError):
            pass                                # read what it said first
        buf = b""
        while b"\n" not in buf:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
    return json.loads(buf.split(b"\n", 1)[0]) if buf.strip() else {"error": "closed, no answer"}


def test_clients_that_never_read_their_replies_give_their_slots_back():
    """Clients that pipeline requests and never read (as many as root may
    open): once their replies fill
    the socket, each is dropped after the control idle timeout, and the
    daemon answers others again (before: never, not even root)."""
    with _cluster() as c:
        d = c.daemon("n1")
        hogs = []
        try:
            for _ in range(ROOT_LIMIT):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(d.control)
                s.setblocking(False)
                try:
                    s.send(b'{"op":"ping"}\n' * 20000)
                except BlockingIOError:
                    pass
                hogs.append(s)
            time.sleep(0.5)
            full = _ping(d.control)
            assert "too many control connections" in full.get("error", ""), full
            deadline = time.monotonic() + CONTROL_IDLE_S + 20
            reply = full
            while time.monotonic() < deadline:
                reply = _ping(d.control)
                if reply.get("result", {}).get("pong"):
                    break
                time.sleep(0.2)
            assert reply.get("result", {}).get("pong"), reply
        finally:
            for s in hogs:
                s.close()
        assert d.alive


def test_a_refused_client_reports_the_daemons_reason():
    """A client past the limit is answered and closed at once; one whose
    request went out after that close (EPIPE) used to report "lost the
    connection ... Broken pipe" instead of the daemon's reason."""
    with _cluster() as c:
        d = c.daemon("n1")
        held = []
        try:
            for _ in range(ROOT_LIMIT):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(d.control)
                held.append(s)
            with ControlClient(d.control, timeout=10.0) as client:
                # Wait for the refusal and the daemon's close, then write.
                client.sock.settimeout(10.0)
                line = client.sock.recv(1 << 16, socket.MSG_PEEK)
                assert b"too many control connections" in line, line
                time.sleep(0.5)
                with pytest.raises(ControlError) as err:
                    client.request({"op": "list"})
            assert "too many control connections" in str(err.value), err.value
        finally:
            for s in held:
                s.close()
        assert d.alive


def test_a_request_nested_past_the_parser_gets_an_error_reply():
    with _cluster() as c:
        d = c.daemon("n1")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(d.control)
            s.settimeout(10)
            s.sendall(b"[" * 50000 + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert b"bad request" in reply and b"RecursionError" in reply, reply
        assert control_request(d.control, {"op": "list"}) == {"result": []}


def test_send_json_has_every_key_when_the_peer_cannot_be_reached(children):
    with _cluster() as c:
        d = c.daemon("n1")
        target = children()
        r = ctl(d.control, "send", str(target.pid), "127.0.0.1:1", "--json")
        assert r.returncode != 0
        out = json.loads(r.stdout)
        assert out["status"] == "failed" and "127.0.0.1:1" in out["error"]
        missing = [k for k in SEND_JSON_KEYS if k not in out]
        assert not missing, (missing, out)
        assert out["rounds"] == [] and out["bytes_sent"] == 0 and out["total_ms"] >= 0


def test_send_json_prints_the_same_shape_when_the_daemon_refuses_or_is_down(tmp_path):
    """No migration to report on -- an unknown PID refused by the daemon, or
    no daemon at all: still one JSON object with the documented keys, and
    a non-zero exit."""
    with _cluster() as c:
        d = c.daemon("n1")
        cases = [(d.control, "4194311"), (str(tmp_path / "nobody.sock"), "1")]
        for control, pid in cases:
            r = ctl(control, "send", pid, "127.0.0.1:1", "--json")
            assert r.returncode == 1, r
            out = json.loads(r.stdout)
            assert out["status"] == "failed" and out["error"], out
            assert out["error"] in r.stderr
            missing = [k for k in SEND_JSON_KEYS if k not in out]
            assert not missing, (missing, out)
