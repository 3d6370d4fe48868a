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


def test_the_idle_timeout_error_reads_as_english(daemons):
    """The error a silent source gets names what did not come in words
    (it said "sent no the next message within 2 s")."""
    import struct

    import msgpack
    d = daemons("idle-words", None, ["--peer-timeout", "2"])
    s = socket.create_connection(("127.0.0.1", d.port))
    s.settimeout(30)
    conn = SourceConnection()
    s.sendall(conn.send(Hello(L.SUPPORTED_VERSIONS, "quiet", (), "quiet-2")))
    s.sendall(encode(Start(4242, ("x",), "/x", PAGE_SIZE, "digest", 0, {})))
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    data = data[len(L.PREAMBLE):]
    bodies = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        bodies.append(msgpack.unpackb(data[4:4 + n]))
        data = data[4 + n:]
    err = bodies[-1]
    assert err["type"] == "error" and err["code"] == "timeout", bodies
    assert err["message"].endswith("sent no message within 2 s"), err["message"]


def test_status_shows_the_timeouts(daemons):
    import subprocess

    from .conftest import PY, ROOT
    d = daemons("shows", None, ["--peer-timeout", "45"])
    out = subprocess.run([PY, "-m", "migrated.cli", "--control", d.control, "status"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "timeouts: peer 45 s, handshake 10 s, commit 120 s" in out.stdout, out.stdout


def test_the_handshake_timeout_holds_after_tls_too(daemons, certdir):
    """A CA-signed peer that completes TLS and then sends no Hello: the
    handshake timeout (2 s) ends it, not the peer timeout (20 s) -- each
    receive blocked for the peer timeout before its deadline was looked at
    (a receive slot held for 30 s against --handshake-timeout 2)."""
    import os
    import ssl

    d = daemons("b", certdir, ["--peer-timeout", "20", "--handshake-timeout", "2"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(certdir, "ca.pem"))
    ctx.load_cert_chain(os.path.join(certdir, "a.pem"), os.path.join(certdir, "a.key"))
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", d.port)),
                        server_hostname="127.0.0.1")
    s.settimeout(60)
    t0 = time.monotonic()
    try:
        while s.recv(65536):
            pass
    except (OSError, ssl.SSLError):
        pass
    took = time.monotonic() - t0
    s.close()
    assert took < 10.0, took        # 2 s and change; 20 s before


def test_a_silent_destination_fails_the_send_at_the_handshake_timeout(daemons, certdir):
    """The source side: a destination that completes TLS and never answers
    Hello fails the send after --handshake-timeout, not --peer-timeout."""
    import os
    import ssl
    import subprocess
    import threading

    from .conftest import PY, ROOT

    a = daemons("a", certdir, ["--peer-timeout", "20", "--handshake-timeout", "2"])
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_verify_locations(os.path.join(certdir, "ca.pem"))
    sctx.load_cert_chain(os.path.join(certdir, "b.pem"), os.path.join(certdir, "b.key"))
    sctx.verify_mode = ssl.CERT_REQUIRED
    srv = socket.create_server(("127.0.0.1", 0))
    held: list = []

    def serve() -> None:
        try:
            c, _ = srv.accept()
            held.append(sctx.wrap_socket(c, server_side=True))   # then silence
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    target = subprocess.Popen(["sleep", "600"])
    try:
        t0 = time.monotonic()
        r = subprocess.run([PY, "-m", "migrated.cli", "--control", a.control, "send",
                            str(target.pid), f"127.0.0.1:{srv.getsockname()[1]}",
                            "--then", "resume"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        took = time.monotonic() - t0
        assert r.returncode != 0
        assert took < 12.0, (took, r.stderr)     # 2 s and change; 20 s before
    finally:
        target.kill()
        target.wait()
        srv.close()
        for s in held:
            s.close()
