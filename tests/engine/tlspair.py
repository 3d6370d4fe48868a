"""Throwaway TLS 1.3 socket pairs over loopback TCP (self-signed, in memory)."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import tempfile
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _self_signed(dirpath: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cpath, kpath = os.path.join(dirpath, "cert.pem"), os.path.join(dirpath, "key.pem")
    with open(cpath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(kpath, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cpath, kpath


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (client, server side)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        cli = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()
    return cli, conn


def tls_pair() -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """A connected TLS 1.3 pair over loopback TCP (client, server side)."""
    with tempfile.TemporaryDirectory() as d:
        cpath, kpath = _self_signed(d)
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.minimum_version = ssl.TLSVersion.TLSv1_3
        sctx.load_cert_chain(cpath, kpath)
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.minimum_version = ssl.TLSVersion.TLSv1_3
        cctx.load_verify_locations(cpath)
    raw_c, raw_s = tcp_pair()
    out: dict = {}

    def server() -> None:
        out["s"] = sctx.wrap_socket(raw_s, server_side=True)

    t = threading.Thread(target=server)
    t.start()
    c = cctx.wrap_socket(raw_c, server_hostname="localhost")
    t.join()
    return c, out["s"]
