"""Hostile peers against a mutual-TLS daemon (issue 5 items 4 and 5).

The destination runs with ``--allow-peer src``.  A client without a
certificate, one with a certificate from another CA, one with a
certificate our CA signed for a name not allowed, a plaintext client and
one that never starts its handshake: each must be dropped in (or right
after) the TLS handshake -- it never gets a single protocol byte -- within
a bounded time, with a ``peer_rejected`` line in the daemon's log; and the
legitimate source ``src`` keeps migrating to the same daemon all along.
"""

from __future__ import annotations

import socket
import ssl
import time

from migrated.wire import limits as L
from tests.cluster import FAST_TIMEOUTS, wait_until

from .peer import hello
from .bounds import CLOSE_WITHIN_S, RSS_LIMIT_KIB


def _client_ctx(env, cert: tuple[str, str] | None, ca: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(ca or env.cluster.ca)
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def _try(env, ctx: ssl.SSLContext | None, payload: bytes | None = None) -> dict:
    """Connect, handshake (if ctx), send a Hello, read until closed.  What
    happened, and when."""
    t0 = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", env.dst.port), timeout=CLOSE_WITHIN_S)
    local_port = raw.getsockname()[1]
    got = b""
    err = None
    sock = raw
    try:
        if ctx is not None:
            sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        if payload is None:
            from migrated.wire import SourceConnection
            payload = SourceConnection().send(hello("hostile-tls"))
        if payload:
            sock.sendall(payload)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except (ssl.SSLError, OSError) as e:
        err = f"{type(e).__name__}: {e}"
    finally:
        sock.close()
    return {"got": got, "error": err, "elapsed": time.monotonic() - t0, "port": local_port}


def _rejected_in_log(env, port: int) -> str:
    def find():
        for line in env.dst.log_text().splitlines():
            if "event=peer_rejected" in line and f":{port} " in line + " ":
                return line
        return None
    return wait_until(find, 5.0, f"peer_rejected for port {port}")


def _answers(got: bytes) -> list:
    from migrated.wire.frames import FrameReader
    fr = FrameReader()
    fr.feed(got)
    out = []
    while (ev := fr.next_frame(L.MAX_FRAME, lambda t: None)) is not None:
        out.append(ev)
    return out


def _check_dropped(env, r: dict, auth_error_ok: bool = False) -> str:
    if auth_error_ok and r["got"]:
        # An authenticated but unwanted peer may be told why: one Error
        # "auth", nothing else (never a Welcome).
        evs = _answers(r["got"])
        assert [type(e).__name__ for e in evs] == ["Error"] and evs[0].code == "auth", evs
    else:
        assert not r["got"], f"the peer got protocol bytes: {r}"
    assert r["elapsed"] <= CLOSE_WITHIN_S, f"dropped only after {r['elapsed']:.1f} s: {r}"
    line = _rejected_in_log(env, r["port"])
    assert env.dst.alive
    assert env.dst.rss_kib() < RSS_LIMIT_KIB
    return line


def test_client_without_certificate_is_dropped(tls_env):
    r = _try(tls_env, _client_ctx(tls_env, None))
    line = _check_dropped(tls_env, r)
    assert "handshake" in line, line


def test_certificate_from_another_ca_is_dropped(tls_env):
    cert, key, ca = tls_env.cluster.foreign_cert("mallory")
    r = _try(tls_env, _client_ctx(tls_env, (cert, key)))
    line = _check_dropped(tls_env, r)
    assert "handshake" in line, line


def test_ca_signed_certificate_not_allowed_is_dropped(tls_env):
    r = _try(tls_env, _client_ctx(tls_env, tls_env.cluster.node_cert("intruder")))
    line = _check_dropped(tls_env, r, auth_error_ok=True)
    assert "allow-peer" in line and "intruder" in line, line


def test_plaintext_client_is_dropped(tls_env):
    r = _try(tls_env, None)
    _check_dropped(tls_env, r)


def test_client_that_never_starts_tls_is_dropped(tls_env):
    r = _try(tls_env, None, payload=b"")
    _check_dropped(tls_env, r)
    assert r["elapsed"] >= FAST_TIMEOUTS.handshake_s * 0.5, r   # it was the timeout


def test_allowed_peer_still_migrates(tls_env):
    tls_env.legit.stop()
    res = tls_env.legit.results
    assert not tls_env.legit.errors, tls_env.legit.errors
    assert res and all(r.get("status") == "completed" for r in res), res
