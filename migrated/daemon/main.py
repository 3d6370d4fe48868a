"""`migrated`: the daemon's entry point and lifecycle.

Start: read settings, take the state-dir lock (one daemon per state dir),
remove partial images, replay the frozen-PID journal (thaw what a previous
instance left stopped), open the peer listener and the control socket,
tell systemd READY=1.  SIGTERM/SIGINT/SIGHUP: admit no new migration,
cancel every migration (the engine thaws its target), wait for them up to
``SHUTDOWN_GRACE_S``, replay the journal once more for anything left,
exit 0.

``migrated --thaw-journal`` only replays the journal and exits (the unit's
ExecStopPost); it refuses to run while a daemon holds the state dir, whose
journaled processes are frozen on purpose.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sys
import time

from migrated.daemon.config import (Config, ConfigError, build_arg_parser, config_from,
                                     thaw_only_config)
from migrated.daemon.durable import UnsafeStateDir, check_private_dir
from migrated.daemon.journal import FrozenJournal
from migrated.daemon.log import EventLog
from migrated.daemon.sdnotify import Notifier
from migrated.errors import MigratedError

# On SIGTERM, migrations get this long to thaw their targets and close
# cleanly; well under systemd's default TimeoutStopSec (90 s).
SHUTDOWN_GRACE_S = 15.0
LOCK_NAME = "migrated.lock"

try:
    from importlib.metadata import version as _pkg_version
    VERSION = _pkg_version("migrated")
except Exception:   # noqa: BLE001
    VERSION = "0"


class StateDirLocked(MigratedError):
    pass


def lock_state_dir(state_dir: str) -> int:
    """flock the state dir's lock file; the fd stays open for our lifetime."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    # Before anything is opened in it: a state dir others can write could
    # hold a planted lock symlink (O_CREAT follows it; we would truncate
    # its target) or planted records (UnsafeStateDir).
    check_private_dir(state_dir)
    path = os.path.join(state_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirLocked(f"another migrated is running with state dir {state_dir} "
                             "(its lock is held)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class Daemon:
    def __init__(self, cfg: Config, log: EventLog):
        self.cfg = cfg
        self.log = log
        self.notifier = Notifier()
        self.journal = FrozenJournal(cfg.state_dir, log)
        self.manager = None
        self.indoubt = None
        self.listener = None
        self.control = None
        self._stop = None
        self.started = time.time()

    def _contexts(self):
        if self.cfg.insecure:
            return None, None
        from migrated.daemon import tls
        return (tls.server_context(self.cfg.tls_cert, self.cfg.tls_key, self.cfg.tls_ca),
                tls.client_context(self.cfg.tls_cert, self.cfg.tls_key, self.cfg.tls_ca))

    def _open_store(self):
        try:
            from migrated.image import ImageStore
        except ImportError as e:
            self.log.error("no_image_store", error=str(e), reason="receiving is disabled")
            return None
        kwargs = {}
        if self.cfg.image_quota is not None:
            kwargs["quota_bytes"] = self.cfg.image_quota
        if self.cfg.min_free is not None:
            kwargs["min_free_bytes"] = self.cfg.min_free
        store = ImageStore(self.cfg.state_dir, **kwargs)
        n = store.cleanup_partials()
        if n:
            self.log.warning("partials_removed", count=n,
                             reason="incomplete images from an earlier run")
        return store

    def info(self) -> dict:
        from migrated.daemon.manager import _fmt_peer
        m = self.manager
        return {"node": self.cfg.node, "version": VERSION, "pid": os.getpid(),
                # "[v6]:port" for IPv6: what `migratectl send` reads back.
                "listen": (_fmt_peer(*self.listener.address)
                           if self.listener and self.listener.sock else self.cfg.listen),
                "tls": not self.cfg.insecure, "allow_peer": self.cfg.allow_peer,
                "max_migrations": self.cfg.max_migrations,
                "sending": len(m.active("send")), "receiving": len(m.active("receive")),
                "completed": m.completed, "failed": m.failed,
                "uptime_s": round(time.time() - self.started, 1),
                "state_dir": self.cfg.state_dir, "timeouts": _timeouts_now(),
                # Failed migrations whose image is being withdrawn (SPEC 9.2).
                "withdrawing": self.indoubt.pending() if self.indoubt else []}

    async def run(self) -> int:
        from migrated.daemon.control import ControlServer
        from migrated.daemon.listener import PeerListener
        from migrated.daemon.manager import Manager, _fmt_peer

        loop = asyncio.get_running_loop()
        cfg = self.cfg
        # The journal first: whatever else fails to start (certificates that
        # do not load, a port in use), a target an earlier run left frozen
        # is thawed.
        replay = self.journal.replay()
        if any(replay.as_dict().values()):
            self.log.warning("journal_replayed", **{k: len(v) for k, v in replay.as_dict().items()})
        server_ctx, client_ctx = self._contexts()
        store = self._open_store()
        self.indoubt = self._indoubt(client_ctx)
        resumed = self.indoubt.resume()
        if any(resumed.values()):
            self.log.warning("indoubt_resumed", **{k: len(v) for k, v in resumed.items()})
        self.manager = Manager(node=cfg.node, max_migrations=cfg.max_migrations, log=self.log,
                               journal=self.journal, notifier=self.notifier,
                               client_ctx=client_ctx, server_ctx=server_ctx,
                               allow_peer=cfg.allow_peer, store=store, indoubt=self.indoubt)
        self.manager.bind_loop(loop)
        self.listener = PeerListener(cfg.listen_host, cfg.listen_port, self.manager, self.log)
        self.listener.open()
        self.control = ControlServer(cfg.control, self.manager, self.log,
                                     gid=cfg.control_gid(), info=self.info)
        try:
            await self.control.start()
        except BaseException:
            self.listener.close()
            raise
        self.listener.start()
        self._stop = asyncio.Event()
        # SIGHUP (a closed terminal, an operator expecting a reload) ends
        # the daemon as SIGTERM does -- by default it killed it on the spot,
        # a frozen target left stopped until the next start.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.log.info("ready", node=cfg.node, listen=_fmt_peer(*self.listener.address),
                      control=cfg.control,
                      tls=not cfg.insecure, allow_peer=cfg.allow_peer or None,
                      max_migrations=cfg.max_migrations, state_dir=cfg.state_dir,
                      **_timeouts_now(),
                      version=VERSION, pid=os.getpid())
        if cfg.insecure:
            self.log.warning("insecure", reason="--insecure: peers are not authenticated and "
                             "memory crosses the network in plaintext")
        self.notifier.ready(self.manager.status_line())
        try:
            await self._stop.wait()
        finally:
            await self._shutdown()
        return 0

    def _indoubt(self, client_ctx):
        """The in-doubt records, resolved over our own client TLS context."""
        from migrated.daemon import indoubt, tls
        from migrated.engine.transport import BlockingTransport
        from migrated.engine.withdraw import request_withdraw
        cfg = self.cfg

        def attempt(rec: indoubt.Pending) -> str:
            t = indoubt.ATTEMPT_TIMEOUT_S
            sock, _ = tls.client_connect(rec.host, rec.port, client_ctx, cfg.allow_peer,
                                         timeout=t)
            transport = BlockingTransport(sock, timeout=t, peer=f"{rec.host}:{rec.port}")
            try:
                return request_withdraw(transport, node=cfg.node, migration_id=rec.mid,
                                        image_id=rec.image_id, timeout=t)
            finally:
                transport.close()

        return indoubt.InDoubt(cfg.state_dir, self.log, attempt)

    def _on_signal(self, sig: int) -> None:
        self.log.info("signal", signal=signal.Signals(sig).name)
        if self._stop is not None:
            if self._stop.is_set():
                return
            self._stop.set()

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        if self.listener is not None:
            self.listener.close()
        n = self.manager.cancel_all("daemon shutting down") if self.manager else 0
        if n:
            self.log.warning("shutdown_cancel", count=n, grace_s=SHUTDOWN_GRACE_S)
            if not await self.manager.wait_idle(SHUTDOWN_GRACE_S):
                self.log.error("shutdown_timeout",
                               reason="migrations did not stop in time; thawing from the journal")
        if self.control is not None:
            await self.control.close()
        if self.indoubt is not None:
            self.indoubt.close()      # records stay: the next start resumes them
        leftover = self.journal.replay()
        if leftover.thawed:
            self.log.warning("journal_replayed", thawed=leftover.thawed)
        self.log.info("stopped")


def _timeouts_now() -> dict:
    from migrated.daemon import timeouts
    return timeouts.current()


def thaw_journal(cfg: Config, log: EventLog) -> int:
    try:
        fd = lock_state_dir(cfg.state_dir)
    except StateDirLocked as e:
        log.error("thaw_refused", error=str(e),
                  reason="its frozen processes belong to running migrations")
        return 1
    except UnsafeStateDir as e:
        log.error("thaw_refused", error=str(e),
                  reason="records in a state dir others can write are not trusted; "
                         "nothing was thawed")
        return 1
    except OSError as e:
        log.error("thaw_failed", error=f"cannot lock the state dir {cfg.state_dir}: "
                  f"{e.strerror or e}", reason="check it exists and is writable")
        return 1
    try:
        try:
            journal = FrozenJournal(cfg.state_dir, log)
        except UnsafeStateDir as e:
            log.error("thaw_refused", error=str(e),
                      reason="records in a state dir others can write are not trusted; "
                             "nothing was thawed")
            return 1
        res = journal.replay()
        log.info("journal_replayed", **{k: len(v) for k, v in res.as_dict().items()},
                 thawed_pids=res.thawed or None)
        return 0 if not res.failed else 1
    finally:
        os.close(fd)


def _install_uvloop():
    try:
        import uvloop
        return uvloop
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from(args)
    except ConfigError as e:
        if not args.thaw_journal:
            print(f"migrated: {e}", file=sys.stderr)
            return 2
        # Thawing must not depend on a config that is otherwise valid.
        cfg = thaw_only_config(args)
        print(f"migrated: {e}; --thaw-journal goes on with the state dir "
              f"{cfg.state_dir} so that no process stays frozen", file=sys.stderr)
    log = EventLog(cfg.log_format, node=cfg.node)
    if cfg.thaw_journal:
        return thaw_journal(cfg, log)
    from migrated.daemon import timeouts
    timeouts.apply(cfg.peer_timeout, cfg.handshake_timeout, cfg.commit_timeout)
    try:
        lock_fd = lock_state_dir(cfg.state_dir)
    except (StateDirLocked, UnsafeStateDir, OSError) as e:
        log.error("startup_failed", error=str(e))
        return 1
    try:
        daemon = Daemon(cfg, log)
    except (MigratedError, OSError) as e:
        os.close(lock_fd)
        log.error("startup_failed", error=str(e))
        return 1
    uvloop = _install_uvloop()
    try:
        if uvloop is not None:
            return uvloop.run(daemon.run())
        return asyncio.run(daemon.run())
    except (MigratedError, OSError) as e:
        log.error("startup_failed", error=str(e))
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        os.close(lock_fd)


if __name__ == "__main__":
    sys.exit(main())
