"""A cluster CA and node certificates for operators without a PKI.

Layout of a certificate directory::

    ca.pem   ca.key          the cluster CA (keep ca.key off the nodes)
    NODE.pem NODE.key        one pair per node: --tls-cert / --tls-key

Keys are EC P-256, written 0600.  A pair is written as a pair: both paths
are checked before any key is generated, both files go to temporary names
in the same directory, and only then are they renamed into place (without
``force`` by a hard link that fails if the name exists, so an existing file
is never replaced) -- a refused or failed run leaves neither a new key nor
a new certificate, never a key that does not match its certificate.

Node certificates carry both serverAuth and clientAuth (every daemon both
listens and connects), CN = node name and subjectAltName = the node name
plus any extra DNS names / IP addresses (the sender checks the name or
address it dialled against them).  ``make`` takes per-node addresses
(``node1=10.0.0.1,node2=10.0.0.2+node2.example``) so that one node's
certificate is not valid for another node's address.
"""

from __future__ import annotations

import datetime
import errno
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
# Upper bound on --days: a century is already absurd for a cluster CA, and
# far larger values overflow the date arithmetic (and X.509's year 9999).
MAX_DAYS = 36500
# Certificates become valid slightly in the past: clocks of nodes differ.
CLOCK_SKEW = datetime.timedelta(minutes=5)
# Node names become file names: keep them to a safe alphabet.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# In `make`'s per-node form NODE=ADDR+ADDR, '=' ends the node name and '+'
# separates its addresses (',' already separates nodes; none of the three
# can occur in a DNS name or an IPv4/IPv6 address).
NODE_ADDR_SEP = "="
ADDR_SEP = "+"
# Temporary names tried next to a file being written (.NAME.tmp.PID.N): a
# few suffice, more only happen with stale files of a crashed run.
_TMP_TRIES = 100


class CertError(MigratedError):
    pass


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name in ("ca",):
        raise CertError(f"bad node name {name!r}: use letters, digits, '.', '_', '-' "
                        "(max 63, not 'ca')")
    return name


def check_days(days: int, what: str = "days") -> int:
    """Validity in days: a whole number from 1 to MAX_DAYS."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise CertError(f"bad {what} {days!r}: a certificate must be valid for 1 to "
                        f"{MAX_DAYS} days (pass --days N with N >= 1)")
    return days


def _ensure_dir(directory: str) -> None:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise CertError(f"cannot create the certificate directory {directory}: "
                        f"{e.strerror or e}; choose a --dir whose parent exists and is "
                        "writable") from None
    if not os.path.isdir(directory):
        raise CertError(f"{directory} is not a directory; choose another --dir")


def _refuse_existing(paths: list[str], force: bool) -> None:
    """Before anything is generated: without ``force`` none of ``paths``
    may exist (a lone certificate whose key was lost is still refused:
    replacing only the key would leave a pair that does not match)."""
    if force:
        return
    there = [p for p in paths if os.path.lexists(p)]
    if there:
        raise CertError(f"{there[0] if len(there) == 1 else 'each of ' + ', '.join(there)} "
                        "already exists; nothing was written: remove "
                        f"{'it' if len(there) == 1 else 'them'} or pass --force to replace "
                        "the pair")


def _write_tmp(final: str, data: bytes, mode: int) -> str:
    """``data`` in a new file next to ``final`` (O_EXCL, ``mode`` from the
    start, fsynced); returns its name."""
    base = os.path.join(os.path.dirname(final) or ".", f".{os.path.basename(final)}.tmp")
    for n in range(_TMP_TRIES):
        tmp = f"{base}.{os.getpid()}.{n}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            break
        except FileExistsError:
            continue
    else:
        raise CertError(f"cannot pick a temporary name next to {final}; remove stale "
                        f"{base}.* files")
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp)
        raise
    os.close(fd)
    return tmp


def _write_pair(cert_path: str, cert_pem: bytes, key_path: str, key_pem: bytes,
                force: bool) -> None:
    """Put a certificate and its key in place together (module doc)."""
    tmps: list[str] = []
    placed: list[str] = []
    try:
        tmps.append(_write_tmp(key_path, key_pem, 0o600))
        tmps.append(_write_tmp(cert_path, cert_pem, 0o644))
        for tmp, final in zip(tmps, (key_path, cert_path)):
            if force:
                os.replace(tmp, final)
            else:
                _place_new(tmp, final)
            placed.append(final)
        _fsync_dir(os.path.dirname(key_path) or ".")
    except FileExistsError as e:
        if not force:
            for p in placed:
                _unlink_quiet(p)
        raise CertError(f"{e.filename2 or e.filename} appeared while writing; nothing was "
                        "written: remove it or pass --force") from None
    except OSError as e:
        if not force:
            for p in placed:
                _unlink_quiet(p)
        raise CertError(f"cannot write {cert_path} / {key_path}: {e.strerror or e}; check "
                        "the directory is writable and has space") from None
    finally:
        for tmp in tmps:
            _unlink_quiet(tmp)


def _place_new(tmp: str, final: str) -> None:
    """Rename ``tmp`` to ``final`` unless ``final`` exists (FileExistsError).
    link() checks and creates in one step, so a file that appeared since
    the check is kept; a filesystem without hard links gets a rename
    after a last check instead."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP):
            raise
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), tmp, None,
                                  final) from None
        os.rename(tmp, final)
        return
    _unlink_quiet(tmp)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def init_ca(directory: str, name: str = "migrated cluster CA", *,
            days: int = DEFAULT_CA_DAYS, force: bool = False) -> tuple[str, str]:
    """Create ca.pem / ca.key in ``directory``; returns their paths."""
    check_days(days)
    if not name or len(name) > 64:
        raise CertError(f"bad CA name {name!r}: 1 to 64 characters")
    _ensure_dir(directory)
    cert_path, key_path = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    _refuse_existing([cert_path, key_path], force)
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
    _write_pair(cert_path, cert.public_bytes(serialization.Encoding.PEM),
                key_path, _key_pem(key), force)
    return cert_path, key_path


def _load_ca(directory: str):
    cert_path, key_path = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    path = cert_path
    try:
        with open(cert_path, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        path = key_path
        with open(key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
    except FileNotFoundError as e:
        raise CertError(f"{e.filename} not found; run `migratectl certs init-ca --dir "
                        f"{directory}` first") from None
    except OSError as e:
        raise CertError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, TypeError) as e:
        raise CertError(f"cannot load the CA from {path}: {e}") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if ca_key.public_key().public_bytes(*spki) != ca_cert.public_key().public_bytes(*spki):
        raise CertError(f"{key_path} is not the key of {cert_path}; restore the CA's own "
                        "key or make a new CA (init-ca --force) and reissue every node")
    return ca_cert, ca_key


def _san_entry(text: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9*][A-Za-z0-9.*_-]{0,252}", text):
        raise CertError(f"bad subjectAltName {text!r}: expected a DNS name or an IP address")
    return x509.DNSName(text)


def _alt_names(name: str, sans) -> list[x509.GeneralName]:
    alt: list[x509.GeneralName] = []
    for s in [name, *sans]:
        entry = _san_entry(s)
        if entry not in alt:
            alt.append(entry)
    return alt


def issue(directory: str, name: str, sans: list[str] | tuple[str, ...] = (), *,
          days: int = DEFAULT_NODE_DAYS, force: bool = False) -> tuple[str, str]:
    """Create NAME.pem / NAME.key signed by the CA in ``directory``."""
    check_name(name)
    check_days(days)
    alt = _alt_names(name, sans)
    ca_cert, ca_key = _load_ca(directory)
    cert_path = os.path.join(directory, f"{name}.pem")
    key_path = os.path.join(directory, f"{name}.key")
    _refuse_existing([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise CertError(f"the CA in {directory} expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
                        "make a new one (init-ca --force) and reissue every node")
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "migrated")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
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
    _write_pair(cert_path, cert.public_bytes(serialization.Encoding.PEM),
                key_path, _key_pem(key), force)
    return cert_path, key_path


def parse_nodes(nodes: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """``make``'s node list: each item ``NODE`` or ``NODE=ADDR[+ADDR...]``
    (ADDR a DNS name or an IP address only this node's certificate gets).
    Returns {node: its own addresses}, in order; a node named twice is an
    error."""
    out: dict[str, list[str]] = {}
    for item in nodes:
        name, sep, addrs = item.strip().partition(NODE_ADDR_SEP)
        name = name.strip()
        check_name(name)
        own = [a.strip() for a in addrs.split(ADDR_SEP) if a.strip()] if sep else []
        if sep and not own:
            raise CertError(f"bad node {item!r}: no address after '{NODE_ADDR_SEP}' "
                            f"(write {name}{NODE_ADDR_SEP}10.0.0.1 or just {name})")
        for a in own:
            _san_entry(a)
        if name in out:
            raise CertError(f"node {name!r} is named twice in --nodes")
        out[name] = own
    if not out:
        raise CertError("no nodes given (--nodes NODE[=ADDR[+ADDR...]],...)")
    return out


def shared_addresses(nodes: list[str] | tuple[str, ...],
                     sans: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The non-loopback IP addresses ``make`` would put into more than one
    node's certificate: a sender that dials such an address cannot tell
    those nodes apart (a CLI can warn and suggest NODE=ADDR)."""
    per_node = parse_nodes(nodes)
    if len(per_node) < 2:
        return []
    seen: dict[str, int] = {}
    for own in per_node.values():
        for a in dict.fromkeys([*own, *sans]):
            seen[a] = seen.get(a, 0) + 1
    out = []
    for a, n in seen.items():
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        if n > 1 and not ip.is_loopback:
            out.append(a)
    return out


def make(directory: str, nodes: list[str] | tuple[str, ...],
         sans: list[str] | tuple[str, ...] = (), *,
         force: bool = False, days: int = DEFAULT_NODE_DAYS) -> dict[str, tuple[str, str]]:
    """A CA (created if the directory has none) and one pair per node.
    ``nodes`` items are ``NODE`` or ``NODE=ADDR[+ADDR...]`` (parse_nodes):
    a node's certificate names the node, its own addresses and every one
    of ``sans`` (names shared by all, e.g. localhost for a loopback test).
    Everything is checked before anything is written."""
    per_node = parse_nodes(nodes)
    check_days(days)
    for n, own in per_node.items():
        _alt_names(n, [*own, *sans])
    _ensure_dir(directory)
    ca_pem = os.path.join(directory, "ca.pem")
    new_ca = not os.path.exists(ca_pem)
    planned = [os.path.join(directory, f"{n}.{ext}") for n in per_node for ext in ("pem", "key")]
    if new_ca:
        planned.append(os.path.join(directory, "ca.key"))
    else:
        _load_ca(directory)
    _refuse_existing(planned, force)
    out: dict[str, tuple[str, str]] = {}
    if new_ca:
        out["ca"] = init_ca(directory, force=force)
    for n, own in per_node.items():
        out[n] = issue(directory, n, [*own, *sans], force=force, days=days)
    return out


def describe(path: str) -> dict:
    """Subject, names, validity of a PEM certificate (for `certs show`)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CertError(f"cannot read {path}: {e.strerror or e}; pass the path of a "
                        ".pem certificate") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        what = "a private key" if b"PRIVATE KEY" in data else "not a PEM certificate"
        raise CertError(f"{path} is {what}; `certs show` takes a certificate "
                        "(NODE.pem or ca.pem)") from None
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
