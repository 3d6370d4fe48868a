"""`migratectl certs` library: a key and its certificate are written as a
pair or not at all; operator mistakes are CertErrors that say what to do;
`make` gives each node only its own addresses (NODE=ADDR)."""

from __future__ import annotations

import json
import os
import ssl
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from migrated.daemon import certs, tls
from migrated.daemon.certs import CertError

from .conftest import ctl, proc_state
from .test_tls import handshake


def _pair_matches(d: str, name: str) -> bool:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(os.path.join(d, f"{name}.pem"), os.path.join(d, f"{name}.key"))
        return True
    except ssl.SSLError:
        return False


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _listing(d: str) -> list[str]:
    return sorted(os.listdir(d))


@pytest.fixture
def pki(tmp_path):
    d = str(tmp_path / "pki")
    certs.make(d, ["a"], ["127.0.0.1"])
    return d


def test_issue_over_a_lost_key_writes_nothing(pki):
    pem = _read(os.path.join(pki, "a.pem"))
    os.unlink(os.path.join(pki, "a.key"))
    with pytest.raises(CertError, match="a.pem already exists; nothing was written"):
        certs.issue(pki, "a", ["127.0.0.1"])
    # Before the fix a new a.key was left next to the old a.pem.
    assert not os.path.exists(os.path.join(pki, "a.key"))
    assert _read(os.path.join(pki, "a.pem")) == pem
    assert _listing(pki) == ["a.pem", "ca.key", "ca.pem"]
    # --force replaces the pair as a pair.
    certs.issue(pki, "a", ["127.0.0.1"], force=True)
    assert _pair_matches(pki, "a") and _read(os.path.join(pki, "a.pem")) != pem
    assert stat.S_IMODE(os.stat(os.path.join(pki, "a.key")).st_mode) == 0o600
    assert _listing(pki) == ["a.key", "a.pem", "ca.key", "ca.pem"]


def test_issue_with_only_the_key_left_writes_nothing(pki):
    key = _read(os.path.join(pki, "a.key"))
    os.unlink(os.path.join(pki, "a.pem"))
    with pytest.raises(CertError, match="a.key already exists"):
        certs.issue(pki, "a")
    assert _read(os.path.join(pki, "a.key")) == key
    assert not os.path.exists(os.path.join(pki, "a.pem"))


def test_init_ca_over_a_lost_ca_key_writes_nothing(pki):
    pem = _read(os.path.join(pki, "ca.pem"))
    os.unlink(os.path.join(pki, "ca.key"))
    with pytest.raises(CertError, match="ca.pem already exists"):
        certs.init_ca(pki)
    assert not os.path.exists(os.path.join(pki, "ca.key"))
    assert _read(os.path.join(pki, "ca.pem")) == pem
    certs.init_ca(pki, force=True)
    assert _pair_matches(pki, "ca")
    assert stat.S_IMODE(os.stat(os.path.join(pki, "ca.key")).st_mode) == 0o600


def test_a_ca_key_that_does_not_match_is_refused(pki):
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with open(os.path.join(pki, "ca.key"), "wb") as f:
        f.write(other)
    with pytest.raises(CertError, match="ca.key is not the key of .*ca.pem"):
        certs.issue(pki, "b")
    assert not os.path.exists(os.path.join(pki, "b.pem"))


def test_show_errors_are_cert_errors(pki, tmp_path):
    with pytest.raises(CertError, match="cannot read /nonexistent.pem: No such file"):
        certs.describe("/nonexistent.pem")
    with pytest.raises(CertError, match="a.key is a private key; `certs show` takes a cert"):
        certs.describe(os.path.join(pki, "a.key"))
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    with pytest.raises(CertError, match="junk.pem is not a PEM certificate"):
        certs.describe(str(junk))
    with pytest.raises(CertError, match="cannot read"):
        certs.describe(str(tmp_path))          # a directory


@pytest.mark.parametrize("days", [-1, 0, certs.MAX_DAYS + 1, 10**9, True])
def test_days_are_checked_before_anything_is_written(tmp_path, days):
    d = str(tmp_path / "pki")
    with pytest.raises(CertError, match="days"):
        certs.init_ca(d, days=days)
    assert not os.path.exists(os.path.join(d, "ca.key"))
    certs.init_ca(d)
    with pytest.raises(CertError, match="days"):
        certs.issue(d, "n", days=days)
    with pytest.raises(CertError, match="days"):
        certs.make(d, ["m"], days=days)
    assert _listing(d) == ["ca.key", "ca.pem"]


def test_init_ca_in_a_directory_that_cannot_be_made():
    with pytest.raises(CertError, match="cannot create the certificate directory /proc/nope"):
        certs.init_ca("/proc/nope")


def test_make_per_node_addresses(tmp_path):
    d = str(tmp_path / "pki")
    out = certs.make(d, ["n1=127.0.0.1", "n2=127.0.0.2+n2.example", "n3"], ["localhost"])
    assert list(out) == ["ca", "n1", "n2", "n3"]
    names = {n: certs.describe(os.path.join(d, f"{n}.pem"))["names"] for n in ("n1", "n2", "n3")}
    assert names["n1"] == ["n1", "localhost", "127.0.0.1"]
    assert names["n2"] == ["n2", "n2.example", "localhost", "127.0.0.2"]
    assert names["n3"] == ["n3", "localhost"]
    # The old forms still work: plain names, --san shared by every node.
    d2 = str(tmp_path / "pki2")
    certs.make(d2, ["a", "b"], ["127.0.0.1"])
    assert "127.0.0.1" in certs.describe(os.path.join(d2, "b.pem"))["names"]


@pytest.mark.parametrize("nodes,match", [
    (["n1="], "no address after '='"),
    (["n1=10.0.0.1", "n1=10.0.0.2"], "named twice"),
    (["n1=not an address"], "bad subjectAltName"),
    (["bad name=10.0.0.1"], "bad node name"),
])
def test_make_checks_every_node_before_writing(tmp_path, nodes, match):
    d = str(tmp_path / "pki")
    with pytest.raises(CertError, match=match):
        certs.make(d, ["ok", *nodes])
    assert not os.path.exists(d) or _listing(d) == []
    with pytest.raises(CertError, match="no nodes"):
        certs.make(d, [])


def test_make_refuses_before_writing_any_node(tmp_path):
    d = str(tmp_path / "pki")
    certs.make(d, ["b"])
    with pytest.raises(CertError, match="b.pem.*already exists"):
        certs.make(d, ["a", "b", "c"])
    assert _listing(d) == ["b.key", "b.pem", "ca.key", "ca.pem"]


def test_shared_addresses_names_the_foot_gun():
    assert certs.shared_addresses(["n1", "n2"], ["10.0.0.1", "10.0.0.2"]) == \
        ["10.0.0.1", "10.0.0.2"]
    assert certs.shared_addresses(["n1=10.0.0.1", "n2=10.0.0.2"]) == []
    assert certs.shared_addresses(["n1", "n2"], ["127.0.0.1", "localhost"]) == []
    assert certs.shared_addresses(["n1"], ["10.0.0.1"]) == []


def test_per_node_certificates_tell_nodes_apart_over_tls(tmp_path):
    """The reviewer's F6A over real TLS 1.3: node3 dials node1's address
    (127.0.0.1) but node2 answers.  With shared --san the handshake passed;
    with NODE=ADDR node2's certificate does not name 127.0.0.1."""
    shared = str(tmp_path / "shared")
    certs.make(shared, ["node1", "node2", "node3"], ["127.0.0.1", "127.0.0.2"])
    per = str(tmp_path / "per")
    certs.make(per, ["node1=127.0.0.1", "node2=127.0.0.2", "node3=127.0.0.3"])

    def ctx(d, name, server):
        make = tls.server_context if server else tls.client_context
        return make(os.path.join(d, f"{name}.pem"), os.path.join(d, f"{name}.key"),
                    os.path.join(d, "ca.pem"))

    srv, cli = handshake(ctx(shared, "node2", True), ctx(shared, "node3", False))
    assert (srv, cli) == ("node3", "node2")            # the old recipe's defect
    srv, cli = handshake(ctx(per, "node2", True), ctx(per, "node3", False))
    assert isinstance(cli, tls.PeerRejected) and "127.0.0.1" in str(cli), cli
    srv, cli = handshake(ctx(per, "node1", True), ctx(per, "node3", False))
    assert (srv, cli) == ("node3", "node1")


def test_per_node_recipe_with_real_daemons(tmp_path, daemons, children):
    """F6A end to end: node2 listening on node1's address is refused by a
    sending node3; node1 there is accepted."""
    per = str(tmp_path / "per")
    certs.make(per, ["node1=127.0.0.1", "node2=127.0.0.2", "node3=127.0.0.3"])
    node2 = daemons("node2", per)          # all listen on 127.0.0.1
    node3 = daemons("node3", per)
    target = children()
    r = ctl(node3.control, "send", str(target.pid), f"127.0.0.1:{node2.port}", "--json",
            "--then", "resume")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["status"] == "failed", out
    assert "127.0.0.1" in out["error"] and "certificate" in out["error"], out
    assert proc_state(target.pid) != "T"
    node1 = daemons("node1", per)
    r = ctl(node3.control, "send", str(target.pid), f"127.0.0.1:{node1.port}", "--json",
            "--then", "resume")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["status"] == "completed", out


def test_make_warns_when_an_address_goes_to_every_node(tmp_path):
    # The README's old recipe (--san per address) put every node's address
    # into every certificate: a sender could not tell the nodes apart.
    import subprocess
    import sys
    d = str(tmp_path / "pki")
    r = subprocess.run([sys.executable, "-m", "migrated.cli", "certs", "make", "--dir", d,
                        "--nodes", "node1,node2", "--san", "10.0.0.1", "--san", "10.0.0.2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "warning: 10.0.0.1 goes into more than one node's certificate" in r.stderr
    d2 = str(tmp_path / "pki2")
    r = subprocess.run([sys.executable, "-m", "migrated.cli", "certs", "make", "--dir", d2,
                        "--nodes", "node1=10.0.0.1,node2=10.0.0.2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
