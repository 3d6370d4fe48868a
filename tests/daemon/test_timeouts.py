"""--peer-timeout / --handshake-timeout reach every wait of a real daemon:
a peer that goes silent is dropped on the configured scale, not the
built-in one (30 s / 10 s)."""

from __future__ import annotations

import socket
import time

from migrated.runs import PAGE_SIZE
from migrated.wire import Hello, SourceConnection, Start, encode
from migrated.wire import limits as L

from .conftest import control_request


def _silent_after(port: int, handshake: bool) -> float:
    """Connect, optionally get as far as Accept, then say nothing: how long
    until the daemon closes the connection."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(60)
    t0 = time.monotonic()
    if handshake:
        conn = SourceConnection()
        s.sendall(conn.send(Hello(L.SUPPORTED_VERSIONS, "quiet", (), "quiet-1")))
        # (Start right behind Hello: the daemon reads it after its Welcome.)
        s.sendall(encode(Start(4242, ("x",), "/x", PAGE_SIZE, "digest", 0, {})))
        t0 = time.monotonic()
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
    dt = time.monotonic() - t0
    s.close()
    return dt


def test_configured_timeouts_apply(daemons):
    d = daemons("quick", None, ["--peer-timeout", "2", "--handshake-timeout", "2",
                                "--commit-timeout", "7"])
    info = control_request(d.control, {"op": "status"})["result"]
    assert info["timeouts"] == {"peer_timeout_s": 2.0, "handshake_timeout_s": 2.0,
                                "commit_timeout_s": 7.0, "keepalive_s": round(2 / 6, 3)}
    # Silent before Hello: the handshake deadline (2 s, not 10).
    assert 1.5 <= _silent_after(d.port, handshake=False) < 6.0
    # Silent after Accept: the peer timeout (2 s, not 30).
    assert 1.5 <= _silent_after(d.port, handshake=True) < 6.0
    assert "peer_timeout_s=2" in d.log()


def test_status_shows_the_timeouts(daemons):
    import subprocess

    from .conftest import PY, ROOT
    d = daemons("shows", None, ["--peer-timeout", "45"])
    out = subprocess.run([PY, "-m", "migrated.cli", "--control", d.control, "status"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "timeouts: peer 45 s, handshake 10 s, commit 120 s" in out.stdout, out.stdout
