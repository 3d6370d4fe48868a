"""A cluster CA and node certificates for operators without a PKI.

Layout of a certificate directory::

    ca.pem   ca.key          the cluster CA (keep ca.key off the nodes)
    NODE.pem NODE.key        one pair per node: --tls-cert / --tls-key

Keys are EC P-256, written 0600 with O_EXCL (an existing key is never
overwritten unless ``force``).  Node certificates carry both serverAuth
and clientAuth (every daemon both listens and connects), CN = node name
and subjectAltName = the node name plus any extra DNS names / IP addresses
(the sender checks the name or address it dialled against them).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migrated.errors import MigratedError

# Long enough that a lab or a small cluster does not trip over expiry,
# short enough that a leaked node key does not stay valid for decades.
DEFAULT_CA_DAYS = 3650
DEFAULT_NODE_DAYS = 825          # the CA/Browser forum's old ceiling
# Certificates become valid slightly in the past: clocks of nodes differ.
CLOCK_SKEW = datetime.timedelta(minutes=5)
# Node names become file names: keep them to a safe alphabet.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class CertError(MigratedError):
    pass


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name in ("ca",):
        raise CertError(f"bad node name {name!r}: use letters, digits, '.', '_', '-' "
                        "(max 63, not 'ca')")
    return name


def _write_private(path: str, data: bytes, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CertError(f"{path} already exists; remove it or pass --force") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_public(path: str, data: bytes, force: bool) -> None:
    if os.path.exists(path) and not force:
        raise CertError(f"{path} already exists; remove it or pass --force")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def init_ca(directory: str, name: str = "migrated cluster CA", *,
            days: int = DEFAULT_CA_DAYS, force: bool = False) -> tuple[str, str]:
    """Create ca.pem / ca.key in ``directory``; returns their paths."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert_path, key_path = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "migrated")])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, _key_pem(key), force)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM), force)
    return cert_path, key_path


def _load_ca(directory: str):
    cert_path, key_path = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    try:
        with open(cert_path, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
    except FileNotFoundError as e:
        raise CertError(f"{e.filename} not found; run `migratectl certs init-ca --dir "
                        f"{directory}` first") from None
    except ValueError as e:
        raise CertError(f"cannot load the CA in {directory}: {e}") from None
    return ca_cert, ca_key


def _san_entry(text: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9*][A-Za-z0-9.*_-]{0,252}", text):
        raise CertError(f"bad subjectAltName {text!r}: expected a DNS name or an IP address")
    return x509.DNSName(text)


def issue(directory: str, name: str, sans: list[str] | tuple[str, ...] = (), *,
          days: int = DEFAULT_NODE_DAYS, force: bool = False) -> tuple[str, str]:
    """Create NAME.pem / NAME.key signed by the CA in ``directory``."""
    check_name(name)
    ca_cert, ca_key = _load_ca(directory)
    cert_path = os.path.join(directory, f"{name}.pem")
    key_path = os.path.join(directory, f"{name}.key")
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for s in [name, *sans]:
        entry = _san_entry(s)
        if entry not in alt:
            alt.append(entry)
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "migrated")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + datetime.timedelta(days=days),
                                 ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(key_path, _key_pem(key), force)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM), force)
    return cert_path, key_path


def make(directory: str, nodes: list[str], sans: list[str] | tuple[str, ...] = (), *,
         force: bool = False) -> dict[str, tuple[str, str]]:
    """A CA (created if the directory has none) and one pair per node."""
    out: dict[str, tuple[str, str]] = {}
    for n in nodes:
        check_name(n)
    if not os.path.exists(os.path.join(directory, "ca.pem")):
        out["ca"] = init_ca(directory, force=force)
    for n in nodes:
        out[n] = issue(directory, n, sans, force=force)
    return out


def describe(path: str) -> dict:
    """Subject, names, validity of a PEM certificate (for `certs show`)."""
    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
                [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "names": names, "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "serial": f"{cert.serial_number:x}"}
