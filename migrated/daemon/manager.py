"""Migrations in flight: one worker thread each, status kept on the loop.

The engine runs in a worker thread over a blocking socket (the page stream
never goes through the event loop).  What the loop keeps per migration is
small: its state, the latest figures, the rounds so far, the summary.
Worker threads report through ``loop.call_soon_threadsafe``; the registry
itself is guarded by a lock because admissions happen in threads too (a
receive is admitted after its TLS handshake, in the handshake thread).

Cancel works from every state: before the socket connects (shut the raw
socket down, which aborts connect), during the handshake (same), while the
engine runs (``engine.cancel`` -- it thaws the target -- and, if the engine
has not returned after ``CANCEL_FORCE_S``, the transport is closed under
it), and it is a no-op once finished.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from migrated.daemon.config import OPTION_INT_MAX
from migrated.engine.transport import MIN_LINK_RATE
from migrated.errors import MigratedError
from migrated.threads import Thread

# A finished migration stays visible to `status` / `list` until this many
# newer ones finished (bounded memory on a long-running daemon).
MAX_FINISHED_KEPT = 100
# After cancel() asks the engine to stop, give it this long to thaw the
# target and say goodbye to the peer before its socket is closed under it.
CANCEL_FORCE_S = 5.0
# The daemon's own deadline is the engine's --timeout plus this margin: the
# engine should notice first and fail cleanly; this is the backstop.
TIMEOUT_GRACE_S = 10.0
# Idle read/write timeout of a migration socket: a silent peer costs this
# long, not forever (the wire's keepalives are far more frequent).
IO_TIMEOUT_S = 30.0
# Migration ids we accept from a peer (they appear in logs and status).
_MID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Option names and checks for a `send` request (control socket input).
_THEN = ("stop", "resume", "kill")
# Rounds are cheap to keep (a dict of 8 numbers) but a runaway --max-rounds
# should not grow status without bound: keep the last this many.
MAX_ROUNDS_KEPT = 1000


class Busy(MigratedError):
    pass


class NotFound(MigratedError):
    pass


def new_migration_id() -> str:
    return secrets.token_hex(6)


def valid_mid(text: Any) -> bool:
    return isinstance(text, str) and bool(_MID_RE.fullmatch(text))


def validate_send_options(opts: Any) -> dict:
    """Check the options of a control `send` request; return clean kwargs
    for SendOptions.  Raises MigratedError with a message for the operator."""
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise MigratedError("options must be an object")
    out: dict[str, Any] = {}
    for key, val in opts.items():
        if val is None:
            continue
        if key in ("downtime_ms", "max_rounds", "plateau_rounds"):
            if not isinstance(val, int) or isinstance(val, bool) or not 0 <= val <= OPTION_INT_MAX:
                raise MigratedError(f"{key} must be a non-negative integer, not {val!r}")
            if key == "plateau_rounds" and val < 1:
                raise MigratedError("plateau_rounds must be at least 1")
        elif key in ("max_bandwidth", "timeout_s"):
            if not isinstance(val, (int, float)) or isinstance(val, bool) or not val > 0 \
                    or val != val or val == float("inf"):
                raise MigratedError(f"{key} must be a positive number, not {val!r}")
            try:
                val = float(val)
            except OverflowError:
                # JSON integers have no size limit (10**400 parses); without
                # this the request raised out of the control handler and the
                # client was cut off with no answer.
                raise MigratedError(f"{key} must be a positive number, not an integer of "
                                    f"{len(str(val))} digits (no float holds it)") from None
            if key == "max_bandwidth" and val < MIN_LINK_RATE:
                # The destination allows a batch the idle timeout plus its
                # time at this rate; any slower and a batch is cut.
                raise MigratedError(f"max_bandwidth {val:g} bytes/s is below the slowest rate "
                                    f"a link may run at ({MIN_LINK_RATE // 1024} KiB/s)")
        elif key == "tracker":
            if not isinstance(val, str) or not re.fullmatch(r"[a-z0-9-]{1,32}", val):
                raise MigratedError(f"bad tracker name {val!r}")
        elif key == "then":
            if val not in _THEN:
                raise MigratedError(f"then must be one of {', '.join(_THEN)}, not {val!r}")
        else:
            raise MigratedError(f"unknown send option {key!r}")
        out[key] = val
    return out


# The keys of a send's summary (migratectl send --json) with their value
# when the engine never ran; callables make a fresh value each time.
SEND_SUMMARY_KEYS = (("image_id", None), ("digest", None), ("tracker", None),
                     ("rounds", list), ("freeze_ms", None), ("total_ms", None),
                     ("bytes_sent", 0))


@dataclass(eq=False)
class Migration:
    id: str
    role: str                       # "send" | "receive"
    owner_uid: int
    pid: int | None = None
    peer: str = ""                  # host:port dialled, or address that connected
    peer_name: str = ""             # certificate CN of the peer
    migration_id: str = ""          # shared with the peer (== id when sending)
    kind: str = "migration"         # or "withdraw": a source resolving one in doubt
    state: str = "connecting"
    options: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    last_event: dict | None = None
    rounds: list = field(default_factory=list)
    summary: dict | None = None
    timed_out: bool = False
    cancel_reason: str | None = None
    # worker side
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _sock: socket.socket | None = field(default=None, repr=False)
    _engine: Any = field(default=None, repr=False)
    _transport: Any = field(default=None, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)
    _watchdog: Any = field(default=None, repr=False)
    # loop side
    followers: list = field(default_factory=list, repr=False)
    done: bool = False

    # -- called from any thread ---------------------------------------------

    def attach_socket(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            cancelled = self.cancel_reason is not None
        if cancelled:
            _shutdown_quietly(sock)

    def attach_engine(self, engine: Any, transport: Any) -> bool:
        """False if cancel() came first: the caller must not run it."""
        with self._lock:
            if self.cancel_reason is not None:
                return False
            self._engine, self._transport = engine, transport
            return True

    def cancel(self, reason: str) -> bool:
        """Ask the migration to stop; False if it had already finished."""
        with self._lock:
            if self.done:
                return False
            first = self.cancel_reason is None
            if first:
                self.cancel_reason = reason
            engine, sock = self._engine, self._sock
        if engine is not None:
            if first:
                try:
                    engine.cancel(reason)
                except Exception:   # noqa: BLE001 -- the force-close still comes
                    pass
        elif sock is not None:
            _shutdown_quietly(sock)
        return True

    def force_close(self) -> None:
        with self._lock:
            transport, sock, done = self._transport, self._sock, self.done
        if done:
            return
        if transport is not None:
            transport.close()
        elif sock is not None:
            _shutdown_quietly(sock)

    # -- views ----------------------------------------------------------------

    def brief(self) -> dict:
        d = {"id": self.id, "migration_id": self.migration_id or self.id, "role": self.role,
             "kind": self.kind, "state": self.state, "pid": self.pid, "peer": self.peer,
             "peer_name": self.peer_name, "owner_uid": self.owner_uid,
             "created": round(self.created, 3),
             "elapsed_s": round((self.finished or time.time()) - self.created, 3),
             "rounds": len(self.rounds)}
        if self.rounds:
            d["last_round"] = self.rounds[-1]
        if self.summary is not None:
            d["status"] = self.summary.get("status")
            if self.summary.get("error"):
                d["error"] = self.summary["error"]
            if self.summary.get("image_id"):
                d["image_id"] = self.summary["image_id"]
        return d

    def full(self) -> dict:
        d = self.brief()
        d.update(options=self.options, last_event=self.last_event,
                 round_list=self.rounds, summary=self.summary)
        return d


def _shutdown_quietly(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class Manager:
    """The registry of migrations and the code their worker threads run."""

    def __init__(self, *, node: str, max_migrations: int, log, journal, notifier=None,
                 client_ctx=None, server_ctx=None, allow_peer: list[str] | None = None,
                 store=None, indoubt=None):
        self.node = node
        self.max_migrations = max_migrations
        self.log = log
        self.journal = journal
        self.notifier = notifier
        self.client_ctx = client_ctx
        self.server_ctx = server_ctx
        self.allow_peer = list(allow_peer or [])
        self.store = store
        self.indoubt = indoubt        # daemon/indoubt.py, for sending migrations
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._migrations: dict[str, Migration] = {}
        self.closing = False     # shutting down: cancel_all() ran, nothing is admitted
        self._finished_order: list[str] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.started_at = time.time()
        self.completed = 0
        self.failed = 0

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    # -- registry ---------------------------------------------------------------

    def active(self, role: str | None = None) -> list[Migration]:
        with self._lock:
            return [m for m in self._migrations.values()
                    if not m.done and (role is None or m.role == role)]

    def all(self) -> list[Migration]:
        with self._lock:
            return list(self._migrations.values())

    def find(self, ident: str) -> Migration:
        with self._lock:
            m = self._migrations.get(ident)
            if m is not None:
                return m
            hits = [m for m in self._migrations.values() if m.migration_id == ident]
        if len(hits) > 1:
            # A withdrawal names the migration it resolves; the migration
            # itself is what a lookup by its id means.
            hits = [m for m in hits if m.kind != "withdraw"] or hits[-1:]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise NotFound(f"migration id {ident} is ambiguous here (this node both sent and "
                           f"received it): use one of {', '.join(m.id for m in hits)}")
        raise NotFound(f"no migration {ident} on this node (see `migratectl list`)")

    def _admit(self, m: Migration) -> None:
        """Register ``m`` or raise Busy.  Any thread."""
        with self._lock:
            if self.closing:
                # cancel_all() has run: a migration admitted now would
                # freeze its target while the daemon goes away.
                raise Busy(f"busy: {self.node} is shutting down; retry on its successor")
            running = [x for x in self._migrations.values() if not x.done and x.role == m.role]
            if len(running) >= self.max_migrations:
                verb = "sending" if m.role == "send" else "receiving"
                raise Busy(f"busy: {self.node} is already {verb} {len(running)} migration(s), "
                           f"the limit (--max-migrations {self.max_migrations}); retry later")
            if m.role == "send":
                for x in running:
                    if x.pid == m.pid:
                        raise Busy(f"process {m.pid} is already being migrated "
                                   f"(migration {x.id}); cancel it first or wait")
            self._migrations[m.id] = m
        self._threadsafe(self._changed)

    def _threadsafe(self, fn: Callable, *args) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # loop closed while we were finishing

    def _changed(self) -> None:
        """On the loop: refresh the systemd STATUS and the idle flag."""
        sending = len(self.active("send"))
        receiving = len(self.active("receive"))
        if sending or receiving:
            self._idle.clear()
        else:
            self._idle.set()
        if self.notifier is not None:
            self.notifier.status(self.status_line(sending, receiving))

    def status_line(self, sending: int | None = None, receiving: int | None = None) -> str:
        if sending is None:
            sending = len(self.active("send"))
        if receiving is None:
            receiving = len(self.active("receive"))
        return (f"{sending} sending, {receiving} receiving; "
                f"{self.completed} completed, {self.failed} failed/cancelled since start")

    # -- sending ------------------------------------------------------------------

    def start_send(self, pid: int, host: str, port: int, options: dict, owner_uid: int, *,
                   starttime: int | None = None) -> Migration:
        """Admit and start a migration of ``pid`` to host:port (on the loop).
        ``starttime``: the process's, when its owner was checked (the
        engine refuses a PID reused since)."""
        opts = validate_send_options(options)
        mid = new_migration_id()
        m = Migration(id=mid, role="send", owner_uid=owner_uid, pid=pid,
                      peer=_fmt_peer(host, port), migration_id=mid, options=opts)
        self._admit(m)
        self.log.info("accepted", mid, role="send", pid=pid, peer=m.peer, uid=owner_uid,
                      **{k: v for k, v in opts.items()})
        timeout = opts.get("timeout_s", _default_timeout())
        assert self.loop is not None
        m._watchdog = self.loop.call_later(timeout + TIMEOUT_GRACE_S, self._timeout, m, timeout)
        m.thread = Thread(target=self._send_worker, args=(m, host, port, opts, starttime),
                          name=f"send-{mid}", daemon=True)
        m.thread.start()
        return m

    def _timeout(self, m: Migration, timeout: float) -> None:
        if m.done:
            return
        m.timed_out = True
        self.log.error("timeout", m.id, role=m.role, timeout_s=timeout,
                       reason="the engine did not finish in time; cancelling")
        self.cancel(m.id, f"timed out after {timeout:g} s (--timeout)")

    def _send_worker(self, m: Migration, host: str, port: int, opts: dict,
                     starttime: int | None = None) -> None:
        def build():
            from migrated.daemon import tls
            from migrated.engine.source import SendOptions, SourceMigration
            from migrated.engine.transport import BlockingTransport
            m.state = "connecting"
            sock, who = tls.client_connect(host, port, self.client_ctx, self.allow_peer,
                                           on_socket=m.attach_socket)
            m.attach_socket(sock)
            m.peer_name = who
            transport = BlockingTransport(sock, timeout=IO_TIMEOUT_S,
                                          max_bandwidth=opts.get("max_bandwidth"),
                                          peer=m.peer)
            options = SendOptions(**opts, migration_id=m.id, node=self.node, starttime=starttime)

            def on_freeze(pid: int, starttime: int) -> None:
                self.journal.on_freeze(pid, starttime, m.id)

            def on_release(image_id: str, starttime: int) -> None:
                from migrated.daemon.indoubt import Pending
                self.indoubt.record(Pending(mid=m.id, pid=m.pid, starttime=starttime,
                                            host=host, port=port, image_id=image_id,
                                            since=time.time()))

            engine = SourceMigration(m.pid, options, transport,
                                     on_event=lambda ev: self._event(m, ev),
                                     on_freeze=on_freeze, on_thaw=self.journal.on_thaw,
                                     on_release=on_release if self.indoubt else None)
            return engine, transport

        self._drive(m, build, running_state="running")

    def _drive(self, m: Migration, build, running_state: str | None = None) -> None:
        """Worker thread: ``build()`` -> (engine, transport), run the engine
        to its summary, close the connection and report on the loop.  Errors
        become a failed summary; a bug never kills the daemon.  A migration
        cancelled before its engine started gets its summary in _finish."""
        summary: dict | None = None
        transport = None
        try:
            engine, transport = build()
            if m.attach_engine(engine, transport):
                if running_state:
                    m.state = running_state
                summary = engine.run()
        except MigratedError as e:
            summary = {"status": "failed", "error": str(e)}
        except Exception as e:   # noqa: BLE001 -- a bug must not kill the daemon
            self.log.error("internal_error", m.id, error=f"{type(e).__name__}: {e}",
                           trace=traceback.format_exc(limit=8))
            summary = {"status": "failed", "error": f"internal error: {type(e).__name__}: {e}"}
        finally:
            if transport is not None:
                transport.close()
            elif m._sock is not None:
                try:
                    m._sock.close()
                except OSError:
                    pass
        if m.role == "send" and summary is not None and self.indoubt is not None:
            self._indoubt_after(m, summary)
        self._threadsafe(self._finish, m, summary)

    def _indoubt_after(self, m: Migration, summary: dict) -> None:
        """Worker thread (file I/O stays off the loop): a completed migration
        clears its in-doubt record; one that failed after writing it (Release
        was sent) has its image withdrawn in the background (SPEC.md 9.2)."""
        if summary.get("status") == "completed":
            self.indoubt.settle(m.id)
        elif self.indoubt.resolve(m.id):
            # Whatever the destination did with Release, the process is ours
            # again: the image must go.
            summary["withdrawing"] = True
            summary["error"] = (f"{summary.get('error') or 'migration failed'}; migrated is "
                                f"asking {m.peer} to withdraw the image (log events "
                                "withdraw_done / withdraw_retry)")

    # -- receiving ----------------------------------------------------------------

    def admit_receive(self, peer: str, peer_name: str) -> Migration:
        """In the handshake thread, after TLS: register an incoming session
        or raise Busy."""
        m = Migration(id="recv-" + new_migration_id(), role="receive", owner_uid=0,
                      peer=peer, peer_name=peer_name, state="receiving")
        self._admit(m)
        m.thread = threading.current_thread()
        return m

    def run_receive(self, m: Migration, sock: socket.socket) -> None:
        """In the session thread: drive DestMigration to its end."""
        m.attach_socket(sock)

        def build():
            from migrated.engine.dest import DestMigration
            from migrated.engine.transport import BlockingTransport
            transport = BlockingTransport(sock, timeout=IO_TIMEOUT_S, peer=m.peer)
            engine = DestMigration(transport, self.store, node=self.node,
                                   on_event=lambda ev: self._event(m, ev),
                                   peer_name=m.peer_name)
            return engine, transport

        self._drive(m, build)

    # -- events and results (on the loop) -------------------------------------------

    def _event(self, m: Migration, ev: dict) -> None:
        """Engine callback, worker thread: hop to the loop."""
        if not isinstance(ev, dict):
            return
        self._threadsafe(self._on_event, m, dict(ev))

    def _on_event(self, m: Migration, ev: dict) -> None:
        if m.done:
            return
        mid = ev.get("migration_id")
        if m.role == "receive" and valid_mid(mid) and not m.migration_id:
            m.migration_id = mid
        if m.role == "receive" and m.pid is None and isinstance(ev.get("pid"), int):
            m.pid = ev["pid"]
        ev["migration_id"] = m.migration_id or m.id
        kind = ev.get("event")
        if kind == "withdraw":
            m.kind = "withdraw"
        if kind == "round":
            m.rounds.append({k: v for k, v in ev.items() if k not in ("event", "migration_id")})
            del m.rounds[:-MAX_ROUNDS_KEPT]
        if kind in ("start", "round"):
            m.state = "running"
        elif kind == "freeze":
            m.state = "frozen"
        elif kind == "commit":
            m.state = "committing"
        m.last_event = ev
        try:
            self.log.migration_event(ev, m.role)
        except Exception as e:   # noqa: BLE001 -- a bad event must not stop the followers
            self.log.error("log_error", m.migration_id or m.id, error=f"{type(e).__name__}: {e}")
        for q in m.followers:
            q.put_nowait({"event": ev})

    def _finish(self, m: Migration, summary: dict | None) -> None:
        if m.done:
            return
        s = dict(summary or {})
        status = s.get("status")
        if status != "completed":
            if m.timed_out:
                status, s["error"] = "failed", m.cancel_reason or "timed out"
            elif m.cancel_reason:
                # Whatever broke after our cancel (a closed socket...) is
                # a consequence; the reason is the cancel.
                status, s["error"] = "cancelled", m.cancel_reason
            elif status not in ("failed", "cancelled"):
                status = "failed"
            s.setdefault("error", "migration failed (no reason given)")
        s["status"] = status
        s.setdefault("migration_id", m.migration_id or m.id)
        if m.role == "send":
            s.setdefault("pid", m.pid)
            s.setdefault("peer", m.peer)
            # A send that failed before its engine ran (the peer unreachable,
            # TLS refused, cancelled while connecting) still answers with
            # every key `migratectl send --json` documents.
            for key, empty in SEND_SUMMARY_KEYS:
                s.setdefault(key, empty() if callable(empty) else empty)
            if s.get("total_ms") is None:
                s["total_ms"] = round(max(0.0, time.time() - m.created) * 1000.0, 3)
        with m._lock:
            m.done = True
            # A finished record is kept for `status`/`list`; it must not
            # keep the engine's buffers, socket or transport alive with it.
            m._engine = m._transport = m._sock = None
        m.finished = time.time()
        m.summary = s
        m.state = s["status"]
        if m._watchdog is not None:
            m._watchdog.cancel()
        if s["status"] == "completed":
            self.completed += 1
        else:
            self.failed += 1
        engine_end = m.last_event if (m.last_event or {}).get("event") == "end" else None
        if engine_end is None or engine_end.get("status") != s["status"]:
            self._log_end(m, s)
        for q in m.followers:
            q.put_nowait({"result": s})
        m.followers.clear()
        with self._lock:
            self._finished_order.append(m.id)
            while len(self._finished_order) > MAX_FINISHED_KEPT:
                self._migrations.pop(self._finished_order.pop(0), None)
        self._changed()

    def _log_end(self, m: Migration, s: dict) -> None:
        self.log.line("end", s["migration_id"], "info" if s["status"] == "completed" else "error",
                      role=m.role, status=s["status"], pid=m.pid, peer=m.peer,
                      error=s.get("error"), image_id=s.get("image_id"),
                      freeze_ms=s.get("freeze_ms"), total_ms=s.get("total_ms"),
                      bytes_sent=s.get("bytes_sent"), dest_wait_ms=s.get("dest_wait_ms"))

    def follow(self, m: Migration) -> asyncio.Queue:
        """A queue of {"event"} then one {"result"} (on the loop)."""
        q: asyncio.Queue = asyncio.Queue()
        if m.done:
            q.put_nowait({"result": m.summary})
        else:
            m.followers.append(q)
        return q

    def unfollow(self, m: Migration, q: asyncio.Queue) -> None:
        try:
            m.followers.remove(q)
        except ValueError:
            pass

    # -- cancel and shutdown ------------------------------------------------------------

    def cancel(self, ident: str, reason: str = "cancelled by operator") -> Migration:
        m = self.find(ident)
        if m.cancel(reason):
            self.log.warning("cancel", m.migration_id or m.id, role=m.role, reason=reason)
            if self.loop is not None:
                self.loop.call_later(CANCEL_FORCE_S, m.force_close)
        return m

    def cancel_all(self, reason: str) -> int:
        """Cancel every migration, and admit none from now on."""
        with self._lock:
            self.closing = True
        n = 0
        for m in self.active():
            if m.cancel(reason):
                n += 1
                if self.loop is not None:
                    self.loop.call_later(CANCEL_FORCE_S, m.force_close)
        return n

    async def wait_idle(self, timeout: float) -> bool:
        self._changed()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


def _fmt_peer(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _default_timeout() -> float:
    try:
        from migrated.engine.source import SendOptions
        return float(SendOptions().timeout_s)
    except Exception:   # noqa: BLE001 -- engine not importable: its own error comes later
        return 600.0
