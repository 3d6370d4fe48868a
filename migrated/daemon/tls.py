"""Mutual TLS 1.3 between daemons.

Both sides: TLS 1.3 only, a certificate is required from the peer and must
chain to the cluster CA (``--tls-ca``); a peer without one is dropped by
the handshake itself.  ``--allow-peer`` then narrows by the certificate's
CN or DNS subjectAltName, on both sides (who may send to us, whom we send
to).  The sender also checks that the receiver's certificate names the
host it dialled (DNS name or IP address SAN), as a browser would.

Handshakes are blocking and run in worker threads (see listener.py): the
loop never spends time on crypto or bulk data.
"""

from __future__ import annotations

import socket
import ssl

from migrated.errors import MigratedError

# A peer gets this long to complete TCP connect and the TLS handshake.
# Long enough for a congested WAN link, short enough that a silent or
# slow-loris peer ties up a handshake slot for seconds, not forever.
HANDSHAKE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
# TCP keepalive so a peer that vanishes (power, blackholed link) is noticed
# by the kernel even while we are blocked on a large send: first probe
# after 10 s idle, then every 5 s, declared dead after 3 missed probes.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3
# Unacknowledged data older than this aborts the connection (TCP_USER_TIMEOUT):
# covers the case keepalive does not (a send queue that never drains).
TCP_USER_TIMEOUT_MS = 30_000


class PeerRejected(MigratedError):
    """Handshake failed or the peer's certificate is not allowed."""


class PeerSilent(PeerRejected):
    """A plaintext peer that sent nothing in time (its socket is kept so
    the listener can answer with a protocol "timeout" error)."""


class PeerNotAllowed(PeerRejected):
    """A CA-signed peer outside --allow-peer.  ``sock`` is the still-open
    TLS socket (server side), so the caller can say why before closing."""

    def __init__(self, message: str, sock=None):
        super().__init__(message)
        self.sock = sock


def _base_context(purpose: int, cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose == ssl.Purpose.CLIENT_AUTH
                         else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise MigratedError(f"cannot load TLS certificate {cert} / key {key}: {e}") from None
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise MigratedError(f"cannot load TLS CA {ca}: {e}") from None
    # No resumption tickets: every connection proves its certificate anew.
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    return _base_context(ssl.Purpose.CLIENT_AUTH, cert, key, ca)


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = _base_context(ssl.Purpose.SERVER_AUTH, cert, key, ca)
    ctx.check_hostname = True
    return ctx


def peer_names(cert: dict | None) -> list[str]:
    """CN(s) and DNS subjectAltNames of a certificate from getpeercert()."""
    if not cert:
        return []
    names: list[str] = []
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                names.append(v)
    for kind, v in cert.get("subjectAltName", ()):
        if kind == "DNS":
            names.append(v)
    return list(dict.fromkeys(names))


# DNS compares names ignoring the case of ASCII letters only (RFC 4343);
# str.lower() would also fold non-ASCII look-alikes (KELVIN SIGN -> 'k').
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _fold(name: str) -> str:
    return name.translate(_ASCII_LOWER)


def check_allowed(cert: dict | None, allow: list[str]) -> str:
    """The peer's name (CN) if allowed; PeerRejected otherwise.  Names are
    DNS names, so the comparison ignores case (as the sender's check of
    the dialled host does); IP address SANs are not matched."""
    names = peer_names(cert)
    who = names[0] if names else "?"
    wanted = {_fold(a) for a in allow}
    if allow and not any(_fold(n) in wanted for n in names):
        raise PeerRejected(f"peer certificate {who!r} (names {', '.join(names) or 'none'}) "
                           f"is not in --allow-peer ({', '.join(allow)})")
    return who


def tune_socket(sock: socket.socket) -> None:
    """Keepalive, user timeout, no Nagle: every blocking migration socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    for name, val in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                      ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", TCP_USER_TIMEOUT_MS)):
        if hasattr(socket, name):
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), val))
    for level, opt, val in opts:
        try:
            sock.setsockopt(level, opt, val)
        except OSError:
            pass


def server_handshake(sock: socket.socket, ctx: ssl.SSLContext | None, allow: list[str],
                     timeout: float | None = None) -> tuple[socket.socket, str]:
    """Blocking: TLS-accept on ``sock`` within ``timeout`` (default
    HANDSHAKE_TIMEOUT_S); returns (tls socket, peer name).  ``ctx`` None
    means --insecure (plaintext)."""
    if timeout is None:
        timeout = HANDSHAKE_TIMEOUT_S
    sock.setblocking(True)
    sock.settimeout(timeout)
    tune_socket(sock)
    if ctx is None:
        # Plaintext has no handshake to bound, so a peer stays a pending
        # handshake (not a migration slot) until its first bytes arrive:
        # idle connections must not use up --max-migrations.
        try:
            if not sock.recv(1, socket.MSG_PEEK):
                raise PeerRejected("closed before sending anything")
        except OSError as e:
            raise PeerSilent(f"sent nothing within {timeout:g} s: {_reason(e)}") from None
        return sock, "insecure"
    try:
        tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls.do_handshake()
    except (ssl.SSLError, OSError) as e:
        raise PeerRejected(f"TLS handshake failed: {_reason(e)}") from None
    try:
        who = check_allowed(tls.getpeercert(), allow)
    except PeerRejected as e:
        raise PeerNotAllowed(str(e), tls) from None
    return tls, who


def client_connect(host: str, port: int, ctx: ssl.SSLContext | None, allow: list[str], *,
                   timeout: float | None = None,
                   on_socket=None) -> tuple[socket.socket, str]:
    """Blocking: connect and TLS-handshake to a peer daemon within
    ``timeout`` each (default CONNECT_TIMEOUT_S).  ``on_socket`` is called
    with the raw socket before connecting, so that a cancel from another
    thread can shut it down and unblock us."""
    if timeout is None:
        timeout = CONNECT_TIMEOUT_S
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MigratedError(f"cannot resolve peer {host}: {e.strerror}") from None
    except UnicodeError as e:
        # The IDNA encoding getaddrinfo applies first refuses a label over 63
        # characters, an empty one ("a..b") or a lone surrogate: a name no
        # resolver could answer, not an internal error of ours.
        reason = str(e.__cause__ or e)
        raise MigratedError(f"cannot resolve peer {host}: not a valid host name "
                            f"({reason})") from None
    last: Exception | None = None
    sock = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_ | socket.SOCK_CLOEXEC, proto)
        if on_socket is not None:
            on_socket(sock)
        sock.settimeout(timeout)
        try:
            sock.connect(addr)
            break
        except OSError as e:
            last = e
            sock.close()
            sock = None
    if sock is None:
        reason = "timed out" if isinstance(last, TimeoutError) else getattr(last, "strerror", None) or str(last)
        raise MigratedError(f"cannot connect to peer {host}:{port}: {reason} "
                            "(is migrated running there and the port open?)")
    tune_socket(sock)
    if ctx is None:
        return sock, "insecure"
    try:
        tls = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        # wrap_socket moved the fd into the new object: a cancel must now
        # shut *it* down to wake the handshake.
        if on_socket is not None:
            on_socket(tls)
        tls.do_handshake()
    except (ssl.SSLError, OSError) as e:
        _close_quietly(sock)
        raise PeerRejected(f"TLS handshake with {host}:{port} failed: {_reason(e)}") from None
    try:
        who = check_allowed(tls.getpeercert(), allow)
    except PeerRejected:
        _close_quietly(tls)
        raise
    return tls, who


# OpenSSL's reasons when the other end does not speak TLS at all.
_NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST",
                    "PACKET_LENGTH_TOO_LONG")


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate rejected: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        reason = e.reason or str(e)
        if any(r in reason.upper() for r in _NOT_TLS_REASONS):
            reason += (" -- the peer does not speak TLS: is it run with --insecure? "
                       "Run both daemons with TLS, or both with --insecure")
        return reason
    if isinstance(e, TimeoutError):
        return "timed out"
    return getattr(e, "strerror", None) or str(e)


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
