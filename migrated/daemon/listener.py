"""The peer listener: accept on the loop, handshake and stream in threads.

``loop.sock_accept`` on a non-blocking listening socket takes connections
without ever blocking the loop; each accepted socket is handed, raw, to a
worker thread that does the blocking TLS handshake (bounded by
``tls.HANDSHAKE_TIMEOUT_S``) and then, if the manager admits the session,
runs DestMigration over a BlockingTransport in that same thread.

Two bounds keep a flood of idle or slow connections from exhausting
threads, file descriptors or memory: at most ``MAX_PENDING_HANDSHAKES``
connections may be in their handshake at once (and
``MAX_PENDING_PER_ADDR`` from one address, so a single host cannot take
every slot), and at most ``--max-migrations`` admitted sessions.  Excess
connections are closed at once with a log line.  A connection we refuse
after its handshake began (busy, silent, not allowed) is told why and
stays counted as pending until it is closed, at most REFUSE_LINGER_S later.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time

from migrated.daemon import tls
from migrated.daemon.manager import Busy
from migrated.threads import Thread

# Connections in their TLS handshake at once.  Each holds a thread (a few
# tens of KiB resident) and a socket for at most HANDSHAKE_TIMEOUT_S; 64
# absorbs bursts from a whole cluster while keeping an idle-connection
# flood to a fixed, small cost.
MAX_PENDING_HANDSHAKES = 64
# Of those, from one peer address: a real peer opens one connection per
# migration; more than this many half-open ones is a fault or an attack.
MAX_PENDING_PER_ADDR = 8
# Kernel accept queue.  Connections past it wait in SYN retries, costing
# us nothing.
LISTEN_BACKLOG = 128
# After EMFILE/ENFILE/ENOMEM from accept, back off this long instead of
# spinning on a listening socket that stays readable.
ACCEPT_BACKOFF_S = 0.2


# A refused peer gets this long, in all, to take our error before we close:
# the send and the drain after it share one deadline, so a peer that
# trickles bytes cannot stretch it (the thread and the socket are ours
# until then, and the connection still counts as a pending handshake).
REFUSE_LINGER_S = 1.0
# What we read and discard from a refused peer before closing anyway: one
# largest handshake frame.  More is not a peer finishing its Hello.
REFUSE_DRAIN_BYTES = 256 * 1024


def refuse(sock: socket.socket, code: str, message: str) -> None:
    """Tell a peer why we refuse it, in protocol terms (an Error frame:
    "busy", "auth", "timeout"), so its operator reads why; then close.
    Best effort, and bounded: at most REFUSE_LINGER_S in all and
    REFUSE_DRAIN_BYTES read, whatever the peer does."""
    deadline = time.monotonic() + REFUSE_LINGER_S
    try:
        from migrated.wire import DestConnection, Error
        data = DestConnection().send(Error(code, message))
        sock.settimeout(REFUSE_LINGER_S)
        sock.sendall(data)          # (the timeout bounds the whole sendall)
        # Half-close and drain what the peer already sent, so the close does
        # not turn into a reset that destroys our frame in flight.
        socket.socket.shutdown(sock, socket.SHUT_WR)
        budget = REFUSE_DRAIN_BYTES
        while budget > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            got = sock.recv(min(65536, budget))
            if not got:
                break
            budget -= len(got)
    except Exception:   # noqa: BLE001 -- the peer sees a closed connection instead
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


def _fmt(addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    return str(addr)


class PeerListener:
    def __init__(self, host: str, port: int, manager, log):
        self.host, self.port = host, port
        self.manager = manager
        self.log = log
        self.sock: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self._lock = threading.Lock()
        self._pending: dict[socket.socket, str] = {}     # socket -> peer ip
        self.rejected = 0
        self.handshake_timeout = tls.HANDSHAKE_TIMEOUT_S

    @property
    def address(self) -> tuple[str, int]:
        assert self.sock is not None
        a = self.sock.getsockname()
        return a[0], a[1]

    def open(self) -> None:
        infos = socket.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_ | socket.SOCK_CLOEXEC, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(LISTEN_BACKLOG)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"cannot listen on {_fmt(addr)}: {e.strerror}") from None
        sock.setblocking(False)
        self.sock = sock

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.error("accept_failed", error=e.strerror,
                                   reason="out of file descriptors or memory; backing off")
                    await asyncio.sleep(ACCEPT_BACKOFF_S)
                continue
            self._admit(conn, addr)

    def _admit(self, conn: socket.socket, addr) -> None:
        ip = addr[0] if isinstance(addr, tuple) else str(addr)
        with self._lock:
            total = len(self._pending)
            from_ip = sum(1 for v in self._pending.values() if v == ip)
            refuse = None
            if total >= MAX_PENDING_HANDSHAKES:
                refuse = f"{total} handshakes already pending (limit {MAX_PENDING_HANDSHAKES})"
            elif from_ip >= MAX_PENDING_PER_ADDR:
                refuse = (f"{from_ip} handshakes already pending from this address "
                          f"(limit {MAX_PENDING_PER_ADDR})")
            else:
                self._pending[conn] = ip
        if refuse:
            self.rejected += 1
            self.log.warning("peer_refused", peer=_fmt(addr), reason=refuse)
            conn.close()
            return
        Thread(target=self._session, args=(conn, addr), daemon=True,
               name=f"peer-{_fmt(addr)}").start()

    def _session(self, conn: socket.socket, addr) -> None:
        peer = _fmt(addr)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                with self._lock:
                    self._pending.pop(conn, None)

        try:
            try:
                sock, who = tls.server_handshake(conn, self.manager.server_ctx,
                                                 self.manager.allow_peer,
                                                 timeout=self.handshake_timeout)
            except tls.PeerRejected as e:
                self.rejected += 1
                self.log.warning("peer_rejected", peer=peer, reason=str(e))
                if isinstance(e, tls.PeerSilent):
                    refuse(conn, "timeout", f"{self.manager.node}: {e}")
                if isinstance(e, tls.PeerNotAllowed) and e.sock is not None:
                    refuse(e.sock, "auth", f"{self.manager.node} does not accept migrations "
                           f"from this peer: {e}")
                conn.close()
                return
            try:
                m = self.manager.admit_receive(peer, who)
            except Busy as e:
                # Still a pending handshake while we say why (refuse is
                # bounded): a flood of refused peers meets the same limits
                # as a flood of slow ones.
                self.rejected += 1
                self.log.warning("peer_refused", peer=peer, peer_name=who, reason=str(e))
                refuse(sock, "busy", str(e))
                return
            # Admitted: from here --max-migrations bounds it.
            release()
            self.log.info("peer_connected", m.id, role="receive", peer=peer, peer_name=who)
            self.manager.run_receive(m, sock)
        except Exception as e:   # noqa: BLE001 -- never let a session kill the thread pool
            self.log.error("session_error", peer=peer, error=f"{type(e).__name__}: {e}")
            try:
                conn.close()
            except OSError:
                pass
        finally:
            release()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with self._lock:
            pending = list(self._pending)
        for c in pending:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.sock is not None:
            self.sock.close()
            self.sock = None
