"""A blocking byte transport for the engine's worker threads.

The engine streams pages from a worker thread over a plain blocking socket
(or ``ssl.SSLSocket``) so the page stream is never throttled by an event
loop.  :class:`BlockingTransport` is the seam the daemon hands over
(docs/ARCHITECTURE.md, "Engine <-> daemon seam"):

- ``send(parts)`` writes every part or raises: one ``sendmsg`` per group of
  up to ``IOV_MAX`` parts with partial sends resumed where they stopped; an
  SSLSocket has no sendmsg, so small parts are coalesced into one record and
  large ones written as they are;
- ``recv(n)`` returns up to n bytes, ``b""`` at EOF;
- ``splice_into(fd, offset, n)`` moves n bytes from a plain socket into a
  file at ``offset`` through a pipe (splice(2)): the kernel hands the
  socket's pages to the file's page cache, one copy instead of a receive
  copy plus a write copy (``can_splice`` says whether the socket allows it;
  a TLS socket does not);
- a timeout on either raises :class:`TransportTimeout` naming the peer;
- over TLS one thread at a time is inside the SSL object (see
  BlockingTransport: the socket is non-blocking and every wait happens
  outside the lock that guards it);
- ``max_bandwidth`` (bytes/s) paces sends with a token bucket;
- ``close()`` (and ``shutdown()``) first shut the socket down in both
  directions so a thread blocked in recv/send on it wakes up at once --
  this is how cancel interrupts a migration, as in QEMU.

:class:`Channel` glues a sans-IO connection (migrated.wire) to a transport:
``send_event(ev)`` and ``next_event(timeout)``; it can send keepalives from a
small timer thread while the engine is busy without talking.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import mmap
import os
import select
import socket
import ssl
import threading
import time
from typing import Any, Callable, Sequence

import xxhash

from migrated.errors import MigratedError, ProtocolError
from migrated.image.store import pwrite_all
from migrated.threads import Thread
from migrated.wire import events as ev
from migrated.wire import limits as L
from migrated.wire.events import DeferredData, Pages

# sendmsg accepts at most IOV_MAX (1024 on Linux) buffers per call.
IOV_MAX = 1024

# Parts smaller than this are joined before an SSL write: each SSLSocket
# write is at least one TLS record (header + MAC); joining a 40-byte frame
# header with its neighbours avoids a record per header.  Large parts are
# written directly (no copy).
SSL_COALESCE_BYTES = 64 * 1024

# A TLS send of more than one record's worth is written with the socket
# corked (TCP_CORK) and uncorked at its end.  SSLSocket writes each 16 KiB
# record with its own write(2) and the socket has Nagle off (see
# BlockingTransport), so uncorked every record left as a segment of its
# own; corked, the kernel fills full-size segments and the receiver takes
# a quarter of the packets.  Round 0 over loopback TLS: 379 against 351
# MiB/s (medians of ten alternating runs), the receiver's CPU lower too.
# Uncorking sends the tail at once; the kernel would anyway after 200 ms.
TLS_CORK_BYTES = 2 ** 14

# Bytes asked for per recv: a 4 MiB page batch arrives in a few calls; the
# connection's receive buffer is bounded by the wire limits anyway.
RECV_CHUNK = 1024 * 1024

# Room asked of a sans-IO connection's receive buffer before each recv_into:
# one largest Pages frame (4 MiB + header).  A buffer with room for a whole
# frame past what is buffered rarely has to move a partial frame around.
RECV_BUFFER_HINT = 4 * 1024 * 1024 + 64 * 1024 + 4

# Pipe between socket and file for splice_into: each splice moves at most
# this much (one pipe buffer per socket page fragment).  1 MiB is the
# default /proc/sys/fs/pipe-max-size, so any user may ask for it.
SPLICE_PIPE_BYTES = 1024 * 1024
F_SETPIPE_SZ = 1031          # fcntl.F_SETPIPE_SZ, spelled out for Python < 3.10

# Token-bucket depth in seconds of the configured rate: allows short bursts
# (a frame header plus part of a batch) while keeping the average exact.
BUCKET_DEPTH_S = 0.05

# Largest single write while rate-limited: a big batch is cut into pieces
# this size so pacing is smooth instead of one long burst and a long sleep.
PACED_WRITE_BYTES = 256 * 1024


# After a cancel, the engine gets this long to notice the flag between
# messages and tell the peer (Cancel); then the transport is shut down so a
# worker blocked on a stalled peer wakes up too.
CANCEL_GRACE_S = 1.0


class CancelLatch:
    """How both engines are cancelled from another thread: the first reason
    wins, and the transport is shut down after CANCEL_GRACE_S unless the
    engine finished (``disarm``) first."""

    def __init__(self, transport: "BlockingTransport",
                 goodbye: "Callable[[str], object] | None" = None):
        """``goodbye(reason)``: tells the peer, best effort and bounded,
        before the shutdown -- an engine stuck receiving a large frame over
        TLS never reaches its own goodbye, and the peer heard only EOF."""
        self._transport = transport
        self._goodbye = goodbye
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.reason: str | None = None

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason or "cancelled"
            self._timer = threading.Timer(CANCEL_GRACE_S, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        goodbye = self._goodbye
        try:
            if goodbye is not None and self.reason is not None:
                goodbye(self.reason)
        except Exception:  # noqa: BLE001 -- best effort: the shutdown follows
            pass
        finally:
            self._transport.shutdown()

    def disarm(self) -> None:
        """The engine finished: no shutdown, no last words (dropping the
        goodbye also drops its hold on the engine: no reference cycle)."""
        with self._lock:
            self._goodbye = None
            if self._timer is not None:
                self._timer.cancel()


class _Quiet(Exception):
    """A receive given a shorter wait than the transport's timeout got no
    data within it (BlockingTransport.recv_into; the caller's deadline
    decides what that means)."""


class TransportError(MigratedError):
    """The connection to the peer failed (reset, closed, shut down)."""

    def __init__(self, peer: str, message: str):
        super().__init__(message)
        self.peer = peer


class TransportTimeout(TransportError):
    """The peer stayed silent (or did not drain) for longer than the timeout."""


class WaitExpired(TransportTimeout):
    """Channel.next_event's ``timeout`` ran out with no message (and no
    frame under way): the caller knows what it waited for and says so."""


class TransportClosed(TransportError):
    """The transport was shut down locally (cancel) or the peer closed it."""


def _same_host(sock: socket.socket) -> bool:
    """Whether the peer runs on this machine: the other end of a unix
    socket, or of a connection to a loopback address or from our own."""
    try:
        if sock.family == socket.AF_UNIX:
            return True
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        peer, ours = sock.getpeername()[0], sock.getsockname()[0]
        ip = ipaddress.ip_address(peer.split("%", 1)[0])
    except (OSError, ValueError, IndexError, TypeError):
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback or peer == ours


def _peer_name(sock: socket.socket) -> str:
    try:
        addr = sock.getpeername()
    except OSError:
        return "peer"
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr) or "peer"


class TokenBucket:
    """Pace writes to ``rate`` bytes/s on average (thread-safe enough for one
    writer; ``wake`` interrupts a sleeping writer)."""

    def __init__(self, rate: float, clock=time.monotonic):
        if rate <= 0:
            raise ValueError("max_bandwidth must be positive")
        self.rate = float(rate)
        self.capacity = max(self.rate * BUCKET_DEPTH_S, 4096.0)
        self.tokens = self.capacity
        self.clock = clock
        self.last = clock()
        self._wake = threading.Event()

    def consume(self, n: int) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            # Interruptible sleep: close() sets the event.
            self._wake.wait(-self.tokens / self.rate)

    def empty(self) -> None:
        """From now on, no credit: what was saved up while idle is gone.
        The source empties it as each round starts, so that no round can
        carry more than ``rate`` times its length (a full bucket let short
        rounds, the frozen final delta among them, open with a burst: 1.4x
        the cap for a 260 KiB final delta at 4 MiB/s)."""
        self.tokens = 0.0
        self.last = self.clock()

    def wake(self) -> None:
        self._wake.set()


class BlockingTransport:
    """Wraps a connected blocking socket or SSLSocket (see module doc).

    Over TLS the receiving thread reads while others send (keepalives, the
    destination's backlog reports).  OpenSSL does not allow two threads in
    one SSL object at once: an SSL_write racing an SSL_read corrupts the
    connection's state, and the read then reports a spurious end of stream
    (CPython's SSLSocket takes no lock of its own).  So an SSLSocket is
    made non-blocking, every call into it (read, write, pending) is made
    under ``_ssl_lock`` and returns at once, and the wait the call asks for
    (readable or writable) happens outside the lock, with poll, at most
    ``timeout`` seconds at a time.  A writer waiting for room never holds
    up the reader -- which would deadlock two peers that both send."""

    def __init__(self, sock: socket.socket, *, timeout: float = 30.0,
                 max_bandwidth: float | None = None, peer: str | None = None):
        self.sock = sock
        self.timeout = float(timeout)
        self.peer = peer or _peer_name(sock)
        self.is_ssl = isinstance(sock, ssl.SSLSocket)
        self.same_host = _same_host(sock)
        self.bucket = TokenBucket(max_bandwidth) if max_bandwidth else None
        self.bytes_sent = 0
        self.bytes_received = 0
        self._lock = threading.Lock()       # close/shutdown
        self._send_lock = threading.Lock()  # one writer at a time (keepalives)
        self._ssl_lock = threading.Lock()   # one thread at a time in the SSL object
        self._shut = False
        self._closed = False
        # A TLS send that failed part way (see _cut): later sends raise this.
        self._cut_by: TransportError | None = None
        self._pipe: tuple[int, int] | None = None    # splice_into's (read, write) ends
        self._splicing = False
        self.can_splice = (not self.is_ssl and hasattr(os, "splice")
                           and sock.type == socket.SOCK_STREAM
                           and sock.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX))
        # Over TLS the socket is non-blocking and this class does the waiting
        # (class doc); a plain socket blocks, with the timeout.
        sock.settimeout(0.0 if self.is_ssl else self.timeout)
        self._tcp = (sock.family in (socket.AF_INET, socket.AF_INET6)
                     and sock.type == socket.SOCK_STREAM)
        if self._tcp:
            # No Nagle: the small messages that end a round or the freeze
            # (RoundEnd, FinalEnd, CommitRequest, Release) must not wait for
            # the ACK of the batch before them -- with delayed ACKs that
            # is some 40 ms, spent with the target frozen.  The page batches
            # go out in full-size segments anyway.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- sending ----------------------------------------------------------------

    def send(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write all of ``parts`` in order, or raise."""
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        if not views:
            return
        with self._send_lock:
            self._check_open("send")
            self._check_uncut()
            try:
                if self.bucket is not None:
                    self._send_paced(views)
                elif self.is_ssl:
                    self._send_ssl(views)
                else:
                    self._sendmsg_all(views)
            except (socket.timeout, TimeoutError) as e:
                raise self._cut(TransportTimeout(
                    self.peer, f"sending to {self.peer} timed out after {self.timeout:g} s: "
                    "the peer stopped reading (stalled or link down)")) from e
            except (OSError, ssl.SSLError, ValueError) as e:
                raise self._cut(self._failure("sending to", e)) from e

    def _cut(self, err: TransportError) -> TransportError:
        """A TLS send failed part way: OpenSSL keeps the unsent rest of its
        record and accepts only that same write again.  Any other write --
        a keepalive's, a goodbye's -- fails with "bad length" and leaves
        the SSL object failed for good: its reads then return nothing,
        though the peer's last words (a Cancel or an Error sent before it
        left) are in our socket.  So later sends fail at once, as this one
        did, without going near the SSL object.  (A plain socket keeps no
        such state: its later sends just fail on their own.)"""
        if self.is_ssl and self._cut_by is None:
            self._cut_by = err
        return err

    def _check_uncut(self) -> None:
        cut = self._cut_by
        if cut is not None:
            raise type(cut)(cut.peer, f"{cut} (an earlier send failed; nothing more "
                            "can be sent on this connection)")

    def restart_pacing(self) -> None:
        """Under --max-bandwidth: pace from now on as if the link had been
        busy until now (TokenBucket.empty); nothing without a cap."""
        if self.bucket is not None:
            with self._send_lock:
                self.bucket.empty()

    def send_now(self, parts: Sequence[bytes | bytearray | memoryview], wait: float) -> bool:
        """Write a small message within ``wait`` seconds or not at all
        (False): another thread's send holds the lock, or the socket has no
        room.  A TLS write cut short by the wait leaves the stream
        unusable: only for last words before a shutdown."""
        data = b"".join(bytes(p) for p in parts)
        if not self._send_lock.acquire(timeout=wait):
            return False
        try:
            if self._shut or self._closed or self._cut_by is not None:
                return False
            if self.is_ssl:
                view = memoryview(data)
                while view:
                    n = self._ssl_call("write", view, wait=wait)
                    self.bytes_sent += n
                    view = view[n:]
                return True
            if not self._wait_for(select.POLLOUT, wait):
                return False
            n = self.sock.send(data, socket.MSG_DONTWAIT)
            self.bytes_sent += n
            return n == len(data)
        except (_Quiet, OSError, ssl.SSLError, ValueError) as e:
            self._cut(TransportTimeout(self.peer, f"sending to {self.peer} timed out after "
                                                  f"{wait:g} s") if isinstance(e, _Quiet)
                      else self._failure("sending to", e))
            return False
        finally:
            self._send_lock.release()

    def _sendmsg_all(self, views: list[memoryview]) -> None:
        i = 0
        while i < len(views):
            group = views[i:i + IOV_MAX]
            sent = self.sock.sendmsg(group)
            self.bytes_sent += sent
            # Skip whole parts already sent; trim the first partial one.
            while group and sent >= len(group[0]):
                sent -= len(group[0])
                group.pop(0)
                i += 1
            if sent:
                views[i] = views[i][sent:]

    def _send_ssl(self, views: list[memoryview]) -> None:
        corked = sum(map(len, views)) > TLS_CORK_BYTES and self._set_cork(True)
        try:
            self._send_records(views)
        finally:
            if corked:
                self._set_cork(False)

    def _set_cork(self, on: bool) -> bool:
        """Cork or uncork a TCP socket; False where that cannot be done
        (not TCP, or already closed: the send reports that itself)."""
        if not self._tcp:
            return False
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(on))
        except OSError:
            return False
        return True

    def _send_records(self, views: list[memoryview]) -> None:
        small: list[memoryview] = []
        small_n = 0
        for v in views:
            if len(v) >= SSL_COALESCE_BYTES:
                if small:
                    self._ssl_write(b"".join(small))
                    small, small_n = [], 0
                self._ssl_write(v)
                continue
            small.append(v)
            small_n += len(v)
            if small_n >= SSL_COALESCE_BYTES:
                self._ssl_write(b"".join(small))
                small, small_n = [], 0
        if small:
            self._ssl_write(b"".join(small))

    def _ssl_write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            # Until it succeeds, a write is retried with the same buffer
            # (OpenSSL's rule after a want-write); reads may run between.
            n = self._ssl_call("write", view)
            self.bytes_sent += n
            view = view[n:]

    def _ssl_call(self, op: str, *args, wait: float | None = None):
        """``op`` ("read" or "write") on the SSL object under the lock; when
        it wants the socket readable or writable, wait for that outside the
        lock (at most ``timeout`` seconds: TimeoutError) and call again.  A
        read returns 0 at the end of the stream, a ragged one included (as
        SSLSocket does with suppress_ragged_eofs)."""
        while True:
            with self._ssl_lock:
                try:
                    return self._ssl_once(op, *args)
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    if op == "read":
                        return 0
                    raise
            limit = self.timeout if wait is None else min(wait, self.timeout)
            if not self._wait_for(events, limit):
                if limit < self.timeout:
                    raise _Quiet()
                raise TimeoutError(f"TLS {op} waited {self.timeout:g} s")

    def _ssl_once(self, op: str, *args):
        """One non-blocking call into the SSL object (caller holds the lock).
        The SSL object itself where the SSLSocket still has one (SSLSocket's
        own methods add two Python calls and two checks per 16 KiB record);
        once closed, SSLSocket's methods say so."""
        obj = getattr(self.sock, "_sslobj", None)
        if obj is not None:
            return getattr(obj, op)(*args)
        if op == "read":
            return self.sock.recv_into(args[1], args[0])
        return self.sock.send(*args)

    def _wait_for(self, events: int, timeout: float) -> bool:
        """Whether the socket became ready for ``events`` within ``timeout``
        seconds.  A poll object of its own: the reading and a sending
        thread may wait at once, and one poll object cannot be polled by
        two threads."""
        fd = self.sock.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "the connection was closed")
        poller = select.poll()
        poller.register(fd, events)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def _send_paced(self, views: list[memoryview]) -> None:
        assert self.bucket is not None
        for v in views:
            for off in range(0, len(v), PACED_WRITE_BYTES):
                piece = v[off:off + PACED_WRITE_BYTES]
                self.bucket.consume(len(piece))
                self._check_open("send")
                if self.is_ssl:
                    self._ssl_write(piece)
                else:
                    self.sock.sendall(piece)
                    self.bytes_sent += len(piece)

    # -- receiving ----------------------------------------------------------------

    def recv(self, n: int = RECV_CHUNK) -> bytes:
        """Up to ``n`` bytes; ``b""`` when the peer closed the connection."""
        self._check_open("receive")
        if self.is_ssl:
            buf = bytearray(n)
            got = self.recv_into(buf)
            return bytes(buf[:got])
        try:
            data = self.sock.recv(n)
        except (OSError, ValueError) as e:
            self._receive_failed(e)
            return b""
        self.bytes_received += len(data)
        return data

    def recv_into(self, buf, wait: float | None = None) -> int:
        """recv straight into ``buf``; 0 when the peer closed the connection.

        Over TLS one read returns at most one record (16 KiB): records that
        already arrived are read on in the same call, so the caller's
        per-read work is paid per buffer, not per record.  ``wait`` (TLS):
        when the records that came held no data (a session ticket), wait at
        most this long for more, then raise _Quiet -- a caller with a
        deadline shorter than the timeout keeps it."""
        self._check_open("receive")
        try:
            if self.is_ssl:
                mv = memoryview(buf).cast("B")
                try:
                    n = self._ssl_call("read", len(mv), mv, wait=wait)
                    if n:
                        n += self._ssl_drain(mv, n)
                finally:
                    mv.release()
            else:
                n = self.sock.recv_into(buf)
        except (OSError, ValueError) as e:
            self._receive_failed(e)
            return 0
        self.bytes_received += n
        return n

    def splice_into(self, fd: int, offset: int, nbytes: int,
                    deadline: float | None = None) -> None:
        """Move the next ``nbytes`` of the stream into file ``fd`` at
        ``offset`` (see module doc), or raise.  Errors of the socket are
        TransportErrors (a silent peer: TransportTimeout after the timeout;
        bytes not all there by ``deadline``, a time.monotonic() value:
        TransportTimeout too -- without it a peer sending a byte now and
        then would hold us for as long as it likes); errors of the file
        stay OSError (ENOSPC, EIO), as from a write."""
        self._check_open("receive")
        with self._lock:
            if self._closed:
                raise TransportClosed(self.peer, f"cannot receive from {self.peer}: the "
                                      "connection was closed")
            # close() from another thread leaves the pipe to us meanwhile:
            # its descriptors must not be reused under a splice.
            self._splicing = True
        try:
            self._splice_into(fd, offset, nbytes, deadline)
        finally:
            with self._lock:
                self._splicing = False
                if self._closed:
                    self._drop_pipe()

    def _splice_into(self, fd: int, offset: int, nbytes: int,
                     deadline: float | None) -> None:
        if self._pipe is None:
            self._pipe = self._new_pipe()
        rd, wr = self._pipe
        left = nbytes
        t0 = time.monotonic()
        while left:
            wait = self.timeout
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise TransportTimeout(
                        self.peer, f"{self.peer} sent only {nbytes - left} of {nbytes} bytes "
                        f"of page data in {time.monotonic() - t0:.1f} s, past the batch's "
                        "deadline: the peer is trickling, or the link is too slow for "
                        "the peer timeout (raise --peer-timeout)")
            try:
                # fileno() each time: -1 once closed from another thread
                # (EBADF below), never a stale number reused by a new file.
                k = os.splice(self.sock.fileno(), wr, min(left, SPLICE_PIPE_BYTES),
                              flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                # The socket is non-blocking under its timeout: wait for it
                # (past the deadline, the check above says what happened).
                if not self.wait_readable(wait) and wait >= self.timeout:
                    self._receive_failed(TimeoutError())
                continue
            except OSError as e:
                self._receive_failed(e)
                k = 0                       # shut down by us: reads as the end
            if not k:
                if self._shut:
                    raise TransportClosed(self.peer, f"receiving from {self.peer}: the "
                                          "connection was shut down")
                raise PeerClosed(self.peer, f"{self.peer} closed the connection inside "
                                 f"a page batch ({left} of {nbytes} bytes missing)")
            self.bytes_received += k
            left -= k
            try:
                while k:
                    w = os.splice(rd, fd, k, offset_dst=offset, flags=os.SPLICE_F_MOVE)
                    if not w:
                        raise OSError(errno.EIO, "splice into the file wrote nothing")
                    offset += w
                    k -= w
            except OSError:
                self._drop_pipe()           # it may still hold bytes
                raise

    def _new_pipe(self) -> tuple[int, int]:
        rd, wr = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(wr, F_SETPIPE_SZ, SPLICE_PIPE_BYTES)
        except OSError:
            pass        # a smaller pipe only means more splice calls
        return rd, wr

    def _drop_pipe(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            for end in pipe:
                os.close(end)

    def wait_readable(self, timeout: float) -> bool:
        """Whether the socket became readable (or hit EOF) within ``timeout``
        seconds; reads nothing.  (Bytes already decrypted inside an
        SSLSocket do not count: see ``readable_now``.)  A closed socket
        counts as readable: the next receive says what happened."""
        try:
            return self._wait_for(select.POLLIN, timeout)
        except OSError:
            return True

    def _receive_failed(self, e: BaseException) -> None:
        """Raise what a failed receive means; return only when we shut the
        socket down ourselves (a cancel): then it reads as end of stream."""
        if isinstance(e, TimeoutError):           # socket.timeout is TimeoutError
            raise TransportTimeout(
                self.peer, f"no data from {self.peer} for {self.timeout:g} s: "
                "the peer is stalled or the link is down") from e
        if not self._shut:
            raise self._failure("receiving from", e) from e

    def _ssl_drain(self, mv: memoryview, have: int) -> int:
        """Read on the TLS records that already arrived (after a first read
        of ``have`` bytes into ``mv``), up to the first read that would
        wait; one record per read.  The lock is taken per record, so a
        sender waits at most one record's decryption."""
        end = len(mv)
        got = 0
        while have + got < end:
            with self._ssl_lock:
                try:
                    k = self._ssl_once("read", end - have - got, mv[have + got:])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLEOFError,
                        ssl.SSLZeroReturnError):
                    k = 0       # nothing more now; an end shows in the next read
            if not k:
                break
            got += k
        return got

    def pending(self) -> int:
        """Bytes already decrypted inside the SSL object (0 over plain TCP):
        readable without the socket showing it."""
        if not self.is_ssl:
            return 0
        with self._ssl_lock:
            try:
                return self.sock.pending()
            except (OSError, ValueError):
                return 0

    def readable_now(self) -> bool:
        """Whether a receive would return at once (data, or the end)."""
        return self.pending() > 0 or self.wait_readable(0)

    # -- closing ------------------------------------------------------------------

    def shutdown(self) -> None:
        """Wake every thread blocked on this transport (thread-safe,
        idempotent); later sends raise TransportClosed, recvs return b""."""
        with self._lock:
            if self._shut:
                return
            self._shut = True
        if self.bucket is not None:
            self.bucket.wake()
        try:
            # The plain socket method on purpose: SSLSocket.shutdown drops
            # its SSL object under a thread that may be inside SSL_read.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._splicing:
                self._drop_pipe()
        # Not while another thread is inside the SSL object (its calls
        # return at once, see the class doc).
        with self._ssl_lock:
            try:
                self.sock.close()
            except OSError:
                pass

    def set_timeout(self, timeout: float) -> None:
        self.timeout = float(timeout)
        if self.is_ssl:
            return      # non-blocking; the waits use self.timeout (class doc)
        try:
            self.sock.settimeout(self.timeout)
        except OSError:
            pass

    @property
    def closed(self) -> bool:
        return self._shut

    def _check_open(self, what: str) -> None:
        if self._shut:
            raise TransportClosed(self.peer, f"cannot {what} {self.peer}: the connection was shut down")

    def _failure(self, what: str, e: BaseException) -> TransportError:
        if self._shut:
            return TransportClosed(self.peer, f"{what} {self.peer}: the connection was shut down")
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return TransportError(self.peer, f"{what} {self.peer} failed: {reason}")


class PeerClosed(TransportError):
    """The peer closed the connection in the middle of the protocol."""


# Bytes/s below which a frame no longer counts as arriving: 1 Mbit/s.
# A frame gets the idle timeout plus its length at this rate from its
# first bytes (Channel.next_event), whether its page data is spliced from
# the socket or the frame is read whole (TLS): a 4 MiB batch gets 32 s
# more, so a link capped at --max-bandwidth of about 64 KiB/s or more is
# slow, not a trickling peer.
MIN_LINK_RATE = 128 * 1024


class Channel:
    """A sans-IO connection driven over a BlockingTransport.

    ``conn`` is a migrated.wire SourceConnection or DestConnection: it has
    ``send(event) -> bytes``, optionally ``send_parts(event) -> list`` (no
    copy of page data), ``receive_data(bytes)`` and ``next_event()`` which
    returns the ``need_data`` sentinel when it wants more bytes.

    A Pages event whose data is still in the socket (a DestConnection made
    with ``direct_pages`` over a transport that ``can_splice``) comes with
    its ``DeferredData`` bound to this channel: the image writer's
    ``fill_into(fd, stretches)`` then splices the bytes from the socket to
    their places in the file, takes their digest from the file -- what is
    checked is what was stored -- and reports it to the connection, which
    fails the migration on a mismatch.
    """

    def __init__(self, conn: Any, transport: BlockingTransport, need_data: Any,
                 keepalive_event: Any = None):
        self.conn = conn
        self.transport = transport
        self.need_data = need_data
        self.keepalive_event = keepalive_event
        self._conn_lock = threading.Lock()   # the state machine is not thread-safe
        self._last_send = time.monotonic()
        self._ka_stop = threading.Event()
        self._ka_thread: threading.Thread | None = None
        self._ka_error: BaseException | None = None
        self._eof = False
        self.direct_bytes = 0     # page data moved socket -> file (_fill_deferred)
        # A deferred batch's data must be in within this long after its
        # head (None: the transport's timeout), as a frame read whole must
        # within next_event's timeout; the deadline of the one under way.
        self.frame_timeout: float | None = None
        self._deferred_deadline: float | None = None
        # When the first bytes of the frame being received (read whole)
        # came; None between frames (see next_event's frame_allowance).
        self._frame_since: float | None = None

    # -- sending ----------------------------------------------------------------

    def send_event(self, event: Any) -> None:
        with self._conn_lock:
            send_parts = getattr(self.conn, "send_parts", None)
            parts = send_parts(event) if send_parts is not None else [self.conn.send(event)]
            # Sending under the same lock keeps the frame order equal to the
            # state machine's order when the keepalive thread also sends.
            self.transport.send(parts)
            self._last_send = time.monotonic()

    def try_send_event(self, event: Any, wait: float) -> bool:
        """send_event bounded by ``wait`` (CancelLatch's last words): False
        when another send holds the connection, the state machine refuses
        the event, or the socket takes too long."""
        if not self._conn_lock.acquire(timeout=wait):
            return False
        try:
            send_parts = getattr(self.conn, "send_parts", None)
            parts = send_parts(event) if send_parts is not None else [self.conn.send(event)]
            return self.transport.send_now(parts, wait)
        except (MigratedError, ProtocolError):
            return False
        finally:
            self._conn_lock.release()

    # -- receiving ----------------------------------------------------------------

    def next_event(self, timeout: float | None = None, *,
                   frame_allowance: bool = False) -> Any:
        """The next event from the peer.  Waits at most ``timeout`` seconds
        in total (default: the transport's timeout per silent stretch).
        Raises PeerClosed at EOF, TransportTimeout on silence.

        ``frame_allowance``: ``timeout`` bounds the wait for the next frame
        to begin; a frame under way when it ends may go on until its own
        deadline (``_frame_deadline``: the idle timeout plus its length at
        MIN_LINK_RATE from its first bytes), as the page data of a spliced
        batch may.  For idle waits only: a fixed deadline (the handshake,
        the publish window) must not be stretched by a frame."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._conn_lock:
                ev = self.conn.next_event()
                if ev is self.need_data:
                    self._note_frame()      # bytes of the next one came with the last
            if ev is not self.need_data:
                self._frame_since = None
                if type(ev) is Pages and type(ev.data) is DeferredData:
                    # The idle timeout, plus the batch's time at the slowest
                    # rate we still call a link (a 4 MiB batch over 1 Mbit/s
                    # takes 32 s): a slow link is not a trickling peer.
                    self._deferred_deadline = time.monotonic() + (
                        self._frame_idle_s() + ev.data.nbytes / MIN_LINK_RATE)
                    ev.data.bind(self._fill_deferred)
                return ev
            if self._eof:
                raise PeerClosed(self.transport.peer,
                                 f"{self.transport.peer} closed the connection mid-migration")
            if deadline is not None:
                now = time.monotonic()
                until = deadline
                if now >= deadline:
                    frame_by = self._frame_deadline() if frame_allowance else None
                    if frame_by is None or now >= frame_by:
                        cls = TransportTimeout if frame_by is not None else WaitExpired
                        raise cls(self.transport.peer, self._timeout_message(timeout, frame_by))
                    until = frame_by
                # A receive blocks up to the transport's own timeout (the peer
                # timeout): a shorter deadline -- the handshake's -- is kept
                # by waiting for bytes first (a silent peer held a slot for
                # 30 s against --handshake-timeout 2).
                left = until - now
                if left < self.transport.timeout:
                    if not self.transport.readable_now() \
                            and not self.transport.wait_readable(left):
                        continue
                    self._pull(left)
                    continue
            self._pull()

    def _frame_idle_s(self) -> float:
        return self.transport.timeout if self.frame_timeout is None else self.frame_timeout

    def _frame_deadline(self) -> float | None:
        """When the frame being received must be complete (its first bytes
        plus the idle timeout plus its length at MIN_LINK_RATE); None
        between frames.  Bounded by the frame's declared length, itself
        bounded by the state's frame limit: a peer trickling bytes inside
        one frame is cut within ~100 s at most (9 MiB layout)."""
        n = getattr(self.conn, "pending_frame_bytes", None)
        if n is None or self._frame_since is None:
            return None
        return self._frame_since + self._frame_idle_s() + n / MIN_LINK_RATE

    def _timeout_message(self, timeout: float, frame_by: float | None) -> str:
        peer = self.transport.peer
        n = getattr(self.conn, "pending_frame_bytes", None)
        if frame_by is None or n is None:
            return f"no message from {peer} within {timeout:g} s"
        took = time.monotonic() - (self._frame_since or 0.0)
        return (f"{peer} did not complete a {n}-byte frame in {took:.1f} s (the idle timeout "
                f"plus {MIN_LINK_RATE // 1024} KiB/s for its length): the peer is trickling, "
                "or the link is too slow for the peer timeout (raise --peer-timeout)")

    def _note_frame(self) -> None:
        """After bytes came (caller holds the connection lock): the start
        of a frame, if one began."""
        if self._frame_since is None and \
                getattr(self.conn, "pending_frame_bytes", None) is not None:
            self._frame_since = time.monotonic()

    def _fill_deferred(self, data: Any, fd: int, stretches: list[tuple[int, int, int]]) -> None:
        """Put a deferred batch in place (class doc).  ``stretches``: (file
        offset, first byte, end byte) of each piece of the data, in order."""
        prefix = memoryview(data.prefix)
        have = len(prefix)
        for off, a, b in stretches:
            if a < have:                    # bytes read with the message's head
                k = min(b, have)
                pwrite_all(fd, prefix[a:k], off)
                off, a = off + k - a, k
            if a < b:
                try:
                    self.transport.splice_into(fd, off, b - a, self._deferred_deadline)
                except PeerClosed as e:
                    # As the connection says of any frame cut short (the
                    # peer may still read our Error).
                    raise ProtocolError("malformed", "peer closed the connection in the "
                                        f"middle of a frame ({e})") from None
        h = xxhash.xxh3_128()
        for off, a, b in stretches:
            # Mapped, not read: hashing the page cache in place costs no copy.
            m = mmap.mmap(fd, b - a, mmap.MAP_SHARED, mmap.PROT_READ, offset=off)
            try:
                h.update(m)
            finally:
                m.close()
        with self._conn_lock:
            self.conn.deferred_done(h.digest())
        self.direct_bytes += data.nbytes

    def _pull(self, wait: float | None = None) -> None:
        """One recv into the connection (zero-copy when it offers a buffer).
        ``wait``: see BlockingTransport.recv_into (nothing read when it
        runs out)."""
        get_buffer = getattr(self.conn, "get_buffer", None)
        if get_buffer is not None:
            with self._conn_lock:
                buf = get_buffer(RECV_BUFFER_HINT)
            try:
                n = self.transport.recv_into(buf, wait)
            except _Quiet:
                return
            finally:
                buf.release()
            with self._conn_lock:
                if n:
                    self.conn.buffer_updated(n)
                    self._note_frame()
                else:
                    self._eof = True
                    self.conn.receive_data(b"")
            return
        data = self.transport.recv(RECV_CHUNK)
        if not data:
            self._eof = True
        with self._conn_lock:
            self.conn.receive_data(data)
            self._note_frame()

    def poll_event(self) -> Any:
        """An event already buffered or readable without blocking, else the
        need_data sentinel.  Used between batches to notice Error/Cancel."""
        with self._conn_lock:
            ev = self.conn.next_event()
        if ev is not self.need_data or self._eof:
            if ev is not self.need_data:
                self._frame_since = None
            return ev
        if not self.transport.readable_now():
            return self.need_data
        self._pull()
        with self._conn_lock:
            ev = self.conn.next_event()
        if ev is not self.need_data:
            self._frame_since = None
        return ev

    # -- keepalives ---------------------------------------------------------------

    def start_keepalive(self, interval: float) -> None:
        """Send a keepalive event whenever nothing was sent for ``interval``
        seconds, until stop_keepalive().  Errors are kept, not raised: the
        main thread notices a dead link on its own next send."""
        if self.keepalive_event is None or self._ka_thread is not None:
            return
        self._ka_stop.clear()

        def loop() -> None:
            while not self._ka_stop.wait(interval / 2):
                if time.monotonic() - self._last_send < interval:
                    continue
                ka = self.keepalive_event
                try:
                    self.send_event(ka() if callable(ka) else ka)
                except BaseException as e:  # noqa: BLE001 -- reported by the owner
                    self._ka_error = e
                    return

        self._ka_thread = Thread(target=loop, name="migrated-keepalive", daemon=True)
        self._ka_thread.start()

    def stop_keepalive(self, timeout: float | None = None) -> None:
        """Stop the keepalive thread; wait for it at most ``timeout`` seconds
        (it may be inside a send to a stalled peer: shutting the transport
        down wakes it)."""
        t = self._ka_thread
        if t is None:
            return
        self._ka_stop.set()
        t.join(timeout)
        self._ka_thread = None


def clip_text(text: str) -> str:
    """``text`` cut to the protocol's MAX_TEXT_BYTES (UTF-8), marked "..."."""
    b = text.encode("utf-8", "replace")
    if len(b) <= L.MAX_TEXT_BYTES:
        return text
    return b[:L.MAX_TEXT_BYTES - 3].decode("utf-8", "ignore") + "..."


def say_goodbye(channel: Channel, status: str, code: str, message: str,
                cause: BaseException, timeout: float) -> None:
    """Tell the peer why a migration ends (Cancel for a cancel, else Error
    with ``code``), if the link still works; bounded by ``timeout``, never
    raises.  Either engine calls it on its failure path."""
    transport = channel.transport
    if transport.closed or (isinstance(cause, TransportError)
                            and not isinstance(cause, TransportTimeout)):
        return   # the link is gone: nothing can be said (a silent peer may
        #          still read: try, bounded by ``timeout``)
    channel.stop_keepalive(timeout)
    try:
        transport.set_timeout(timeout)
        if status == "cancelled" and code == "cancelled":
            channel.send_event(ev.Cancel(clip_text(message)))
        else:
            channel.send_event(ev.Error(code if code in ev.ERROR_CODES else "internal",
                                        clip_text(message)))
    except Exception:  # noqa: BLE001 -- best effort
        pass
