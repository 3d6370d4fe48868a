"""Certificates from `migratectl certs`, then real TLS 1.3 mutual handshakes
between loopback sockets using the daemon's own handshake functions."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading

import pytest

from migrated.daemon import certs, tls
from migrated.errors import MigratedError

from .conftest import ctl


def _paths(d, name):
    return os.path.join(d, f"{name}.pem"), os.path.join(d, f"{name}.key")


def server_ctx(d, name="a"):
    c, k = _paths(d, name)
    return tls.server_context(c, k, os.path.join(d, "ca.pem"))


def client_ctx(d, name="b", ca_dir=None):
    c, k = _paths(d, name)
    return tls.client_context(c, k, os.path.join(ca_dir or d, "ca.pem"))


def handshake(sctx, cctx, *, allow_server=(), allow_client=(), host="127.0.0.1"):
    """Run server_handshake in a thread against client_connect; returns
    (server outcome, client outcome): a peer name or the exception."""
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    out: dict = {}

    def serve():
        conn, _ = lsock.accept()
        try:
            s, who = tls.server_handshake(conn, sctx, list(allow_server), timeout=5)
            out["server"] = who
            # Echo one byte so the client learns whether it got in.
            s.sendall(b"k")
            s.close()
        except Exception as e:   # noqa: BLE001
            out["server"] = e
            if getattr(e, "sock", None) is not None:
                e.sock.close()
            conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        s, who = tls.client_connect(host, port, cctx, list(allow_client), timeout=5)
        try:
            data = s.recv(1)
            out["client"] = who if data == b"k" else ConnectionError("no data")
        except (OSError, ssl.SSLError) as e:
            out["client"] = e
        s.close()
    except Exception as e:   # noqa: BLE001
        out["client"] = e
    t.join(10)
    lsock.close()
    return out["server"], out["client"]


def test_certs_files_and_modes(tmp_path):
    d = str(tmp_path / "pki")
    r = ctl("/nonexistent", "certs", "make", "--dir", d, "--nodes", "n1,n2", "--san", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    for name in ("ca", "n1", "n2"):
        assert os.path.isfile(os.path.join(d, f"{name}.pem"))
        mode = stat.S_IMODE(os.stat(os.path.join(d, f"{name}.key")).st_mode)
        assert mode == 0o600, (name, oct(mode))
    info = certs.describe(os.path.join(d, "n1.pem"))
    assert "CN=n1" in info["subject"] and "n1" in info["names"] and "127.0.0.1" in info["names"]
    # Keys are never overwritten silently.
    r = ctl("/nonexistent", "certs", "issue", "--dir", d, "--name", "n1")
    assert r.returncode != 0 and "already exists" in r.stderr
    r = ctl("/nonexistent", "certs", "issue", "--dir", d, "--name", "../evil")
    assert r.returncode != 0 and "bad node name" in r.stderr
    # EC P-256, both server and client auth.
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    with open(os.path.join(d, "n2.pem"), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    assert cert.public_key().curve.name == "secp256r1"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku


def test_init_ca_then_issue(tmp_path):
    d = str(tmp_path / "pki")
    assert ctl("/x", "certs", "init-ca", "--dir", d, "--name", "Test CA").returncode == 0
    assert ctl("/x", "certs", "issue", "--dir", d, "--name", "solo",
               "--san", "localhost,10.9.8.7").returncode == 0
    names = certs.describe(os.path.join(d, "solo.pem"))["names"]
    assert set(names) >= {"solo", "localhost", "10.9.8.7"}


def test_mutual_tls13_accepted(certdir):
    s, c = handshake(server_ctx(certdir, "a"), client_ctx(certdir, "b"))
    assert s == "b" and c == "a"


def test_context_versions(certdir):
    for ctx in (server_ctx(certdir), client_ctx(certdir)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_client_without_certificate_rejected(certdir):
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(os.path.join(certdir, "ca.pem"))
    s, c = handshake(server_ctx(certdir), cctx)
    assert isinstance(s, tls.PeerRejected), s
    assert "certificate" in str(s).lower() or "handshake" in str(s).lower()
    assert isinstance(c, Exception)


def test_client_cert_from_other_ca_rejected(certdir):
    other = os.path.join(certdir, "other")
    # Client x (foreign CA) trusts our CA, so only the server can refuse it.
    c, k = _paths(other, "x")
    cctx = tls.client_context(c, k, os.path.join(certdir, "ca.pem"))
    s, cl = handshake(server_ctx(certdir), cctx)
    assert isinstance(s, tls.PeerRejected) and "certificate" in str(s)
    assert isinstance(cl, Exception)


def test_server_cert_from_other_ca_rejected(certdir):
    other = os.path.join(certdir, "other")
    c, k = _paths(other, "x")
    # Server x trusts our CA, so only the client can refuse it.
    sctx = tls.server_context(c, k, os.path.join(certdir, "ca.pem"))
    s, cl = handshake(sctx, client_ctx(certdir, "b"))
    assert isinstance(cl, tls.PeerRejected) and "certificate" in str(cl)
    assert isinstance(s, Exception)


def test_allow_peer_enforced_both_ways(certdir):
    s, c = handshake(server_ctx(certdir, "a"), client_ctx(certdir, "b"), allow_server=["c"])
    assert isinstance(s, tls.PeerRejected) and "not in --allow-peer" in str(s)
    assert isinstance(c, Exception)
    s, c = handshake(server_ctx(certdir, "a"), client_ctx(certdir, "c"), allow_server=["c", "z"])
    assert s == "c" and c == "a"
    s, c = handshake(server_ctx(certdir, "a"), client_ctx(certdir, "b"), allow_client=["b"])
    assert isinstance(c, tls.PeerRejected) and "'a'" in str(c)


def test_allow_peer_ignores_the_case_of_names(tmp_path):
    """DNS names are case-insensitive: --allow-peer alpha admits a node
    whose certificate says Alpha, on both sides, over real TLS 1.3."""
    d = str(tmp_path / "pki")
    certs.make(d, ["Alpha", "beta"], ["127.0.0.1"])
    s, c = handshake(server_ctx(d, "Alpha"), client_ctx(d, "beta"), allow_client=["alpha"])
    assert (s, c) == ("beta", "Alpha")
    s, c = handshake(server_ctx(d, "Alpha"), client_ctx(d, "beta"), allow_server=["BETA"])
    assert (s, c) == ("beta", "Alpha")
    s, c = handshake(server_ctx(d, "Alpha"), client_ctx(d, "beta"), allow_client=["alpha2"])
    assert isinstance(c, tls.PeerRejected) and "not in --allow-peer" in str(c)


def test_allow_peer_matching_rules():
    cert = {"subject": ((("commonName", "Node-1"),),),
            "subjectAltName": (("DNS", "node-1.Example"), ("IP Address", "10.0.0.1"))}
    assert tls.check_allowed(cert, ["NODE-1"]) == "Node-1"
    assert tls.check_allowed(cert, ["node-1.example"]) == "Node-1"
    with pytest.raises(tls.PeerRejected):
        tls.check_allowed(cert, ["10.0.0.1"])        # IP SANs are not names
    # Only ASCII letters fold (RFC 4343): KELVIN SIGN is not 'k'.
    kcert = {"subject": ((("commonName", "\u212aube"),),)}
    with pytest.raises(tls.PeerRejected):
        tls.check_allowed(kcert, ["kube"])
    assert tls.check_allowed(cert, []) == "Node-1"


def test_sender_checks_dialled_name(certdir, tmp_path):
    d = str(tmp_path / "pki")
    certs.make(d, ["noip"])          # no 127.0.0.1 SAN
    certs.issue(d, "cl", ["127.0.0.1"])
    s, c = handshake(server_ctx(d, "noip"), client_ctx(d, "cl"))
    assert isinstance(c, tls.PeerRejected) and "127.0.0.1" in str(c)


def test_handshake_timeout_on_silent_client(certdir):
    lsock = socket.create_server(("127.0.0.1", 0))
    idle = socket.create_connection(lsock.getsockname())
    conn, _ = lsock.accept()
    try:
        with pytest.raises(tls.PeerRejected, match="timed out"):
            tls.server_handshake(conn, server_ctx(certdir), [], timeout=0.3)
    finally:
        conn.close()
        idle.close()
        lsock.close()


def test_connect_refused_is_clear():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(MigratedError, match=f"cannot connect to peer 127.0.0.1:{port}"):
        tls.client_connect("127.0.0.1", port, None, [], timeout=2)


@pytest.mark.parametrize("tls_end", ["dest", "source"])
def test_tls_against_insecure_says_so_at_both_ends(tls_end):
    """One daemon with TLS, the other run with --insecure: the errors said
    "WRONG_VERSION_NUMBER" and "Connection reset by peer".  Now the end
    that can tell names the mismatch and what to do."""
    from tests.cluster import Cluster
    from tests.engine.procs import workload
    with Cluster(tls=True) as c, workload(mib=4, rate=10) as w:
        a = c.daemon("a", tls=(tls_end == "source"))
        b = c.daemon("b", tls=(tls_end == "dest"))
        mid = a.send(w.pid, "127.0.0.1", b.port, then="resume")
        st = a.wait_done(mid, 60)
        assert st["status"] == "failed", st
        # The operator who ran send reads the source's error; both logs say it.
        assert "or both with --insecure" in st["error"], st["error"]
        for d in (a, b):
            assert "or both with --insecure" in d.log_text(), d.log_tail()


@pytest.mark.parametrize("host", ["x" * 64, "a..b", "\udcff"])
def test_a_host_name_no_resolver_takes_is_refused_as_such(host):
    """getaddrinfo raised UnicodeError (IDNA) for these, which the daemon
    reported as "internal error: UnicodeError" with a traceback (found by
    fuzzing the control socket's send request)."""
    with pytest.raises(MigratedError, match="cannot resolve peer .*not a valid host name"):
        tls.client_connect(host, 1, None, [], timeout=2)
