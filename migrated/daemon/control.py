"""The control socket: migratectl talks to the daemon here.

A unix stream socket, one JSON object per line each way
(docs/ARCHITECTURE.md, "Control socket").  Who may connect is decided by
the file: mode 0600 owned by root, or 0660 with ``--control-group``; the
parent directory is created 0755 if missing.  Who may do what is decided
per connection with SO_PEERCRED: uid U may only send processes whose
real, effective, saved and filesystem uids are all U, and may only see or
cancel the migrations it started -- unless U is root.

Requests are bounded (``MAX_REQUEST_BYTES``); a connection that sends
nothing for ``IDLE_TIMEOUT_S`` is closed; at most ``MAX_CLIENTS``
connections at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import struct
import time
from typing import Any

from migrated.errors import MigratedError

# A request is a few hundred bytes; 64 KiB leaves room for any future
# option while a runaway client cannot make us buffer megabytes.
MAX_REQUEST_BYTES = 64 * 1024
# Control connections at once: migratectl opens one per command; 64
# covers scripts polling status while bounding fds and tasks.
MAX_CLIENTS = 64
# Of those, one uid other than root may hold at most this many (a member of
# the --control-group must not be able to lock everyone else out) ...
MAX_CLIENTS_PER_UID = 16
# ... and root may open this many more once all are taken, so that it can
# always see and cancel what runs.
ROOT_RESERVED_CLIENTS = 8
# A connection that sends no request for this long is closed (a follower
# waiting for events is not idle: it sent its request).
IDLE_TIMEOUT_S = 60.0
OPS = ("send", "status", "list", "cancel", "probe", "ping")


class ControlError(MigratedError):
    pass


def peer_credentials(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def process_uids(pid: int) -> tuple[int, ...]:
    from migrated.kernel import procfs
    return procfs.read_uids(pid)


def check_may_act_on(uid: int, pid: int) -> None:
    """Raise unless the client ``uid`` may migrate process ``pid``."""
    uids = process_uids(pid)      # NoSuchProcess if it is gone
    if uid == 0:
        return
    if any(u != uid for u in uids):
        owner = uids[1]
        raise ControlError(f"permission denied: process {pid} belongs to uid {owner} "
                           f"(real/effective/saved/fs uids {'/'.join(map(str, uids))}); "
                           f"uid {uid} may only migrate its own processes")


def check_send_target(uid: int, pid: int) -> int:
    """Raise unless ``pid`` is a process the client ``uid`` may migrate;
    returns its start time, which the engine checks again when it takes
    hold of the process: a PID that the process left and another took in
    between (the connect and the handshake come first) is refused then
    instead of migrating someone else's process."""
    from migrated.kernel import procfs
    before = procfs.read_stat(pid)           # NoSuchProcess if it is gone
    if before.kernel_thread:
        raise ControlError(f"PID {pid} is a kernel thread ({before.comm}): it has no user "
                           "memory to migrate")
    tgid = procfs.read_status(pid).get("Tgid", str(pid))
    if tgid.isdigit() and int(tgid) != pid:
        raise ControlError(f"{pid} is a thread of process {tgid}, not a process: "
                           f"pass {tgid} to migrate that process")
    check_may_act_on(uid, pid)
    if procfs.read_stat(pid).starttime != before.starttime:
        raise ControlError(f"process {pid} exited while its owner was checked (the PID "
                           "now names another process); nothing was done")
    return before.starttime


def prepare_socket_path(path: str) -> None:
    """Create the parent dir (0755) if missing; remove a stale socket; refuse
    to start if another daemon answers on it or a non-socket is in the way."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        old = os.umask(0o022)
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        finally:
            os.umask(old)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)           # stale: nobody listens
        return
    finally:
        probe.close()
    raise ControlError(f"another migrated is already listening on {path} "
                       "(stop it, or pick another --control path)")


def bind_control_socket(path: str, gid: int | None) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 (0660 + group ``gid``).
    The file is created under a restrictive umask so there is no moment
    when it is more open than intended."""
    prepare_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    try:
        if gid is not None:
            os.chown(path, 0 if os.geteuid() == 0 else -1, gid)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        sock.listen(MAX_CLIENTS)
    except OSError:
        sock.close()
        os.unlink(path)
        raise
    sock.setblocking(False)
    return sock


class ControlServer:
    def __init__(self, path: str, manager, log, *, gid: int | None = None, info=None):
        self.path = path
        self.manager = manager
        self.log = log
        self.gid = gid
        self.info = info or (lambda: {})
        self.server: asyncio.base_events.Server | None = None
        self.clients = 0
        self._per_uid: dict[int, int] = {}     # open connections per client uid
        self._inode: int | None = None

    async def start(self) -> None:
        sock = bind_control_socket(self.path, self.gid)
        self._inode = os.stat(self.path).st_ino
        self.server = await asyncio.start_unix_server(self._handle, sock=sock,
                                                      limit=MAX_REQUEST_BYTES)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
        # Only remove the file if it is still ours (not a successor's).
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def _refusal(self, uid: int) -> str | None:
        """Why a new connection from ``uid`` is not served, or None."""
        if uid == 0:
            if self.clients >= MAX_CLIENTS + ROOT_RESERVED_CLIENTS:
                return (f"too many control connections (limit {MAX_CLIENTS}, "
                        f"plus {ROOT_RESERVED_CLIENTS} for root)")
            return None
        if self.clients >= MAX_CLIENTS:
            return f"too many control connections (limit {MAX_CLIENTS})"
        if self._per_uid.get(uid, 0) >= MAX_CLIENTS_PER_UID:
            return (f"too many control connections from uid {uid} (limit "
                    f"{MAX_CLIENTS_PER_UID} per user); close some and retry")
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
        except OSError as e:
            with contextlib.suppress(ConnectionError, BrokenPipeError):
                await _reply(writer, {"error": f"cannot identify the client: {e.strerror}"})
            writer.close()
            return
        refusal = self._refusal(uid)
        if refusal is not None:
            with contextlib.suppress(ConnectionError, BrokenPipeError):
                await _reply(writer, {"error": refusal})
            writer.close()
            return
        self.clients += 1
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT_S)
                except asyncio.TimeoutError:
                    return
                except (asyncio.LimitOverrunError, ValueError):
                    await _reply(writer, {"error": f"request too long (limit {MAX_REQUEST_BYTES} bytes)"})
                    return
                if not line:
                    return
                if not line.endswith(b"\n"):
                    return          # EOF in the middle of a line
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("not an object")
                except (ValueError, RecursionError) as e:
                    # RecursionError: nesting deeper than the parser goes.
                    await _reply(writer, {"error": f"bad request: not a JSON object "
                                                   f"({type(e).__name__}: {e})"})
                    return
                try:
                    await self._dispatch(req, uid, pid, writer)
                except MigratedError as e:
                    await _reply(writer, {"error": str(e)})
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            self.clients -= 1
            left = self._per_uid.pop(uid) - 1
            if left:
                self._per_uid[uid] = left
            with contextlib.suppress(Exception):
                writer.close()

    async def _dispatch(self, req: dict, uid: int, client_pid: int,
                        writer: asyncio.StreamWriter) -> None:
        op = req.get("op")
        if op not in OPS:
            raise ControlError(f"unknown op {op!r} (known: {', '.join(OPS)})")
        if op == "ping":
            await _reply(writer, {"result": {"pong": True, "uid": uid}})
        elif op == "list":
            ms = self._visible(uid)
            await _reply(writer, {"result": [m.brief() for m in ms]})
        elif op == "status":
            ident = req.get("id")
            if ident is None:
                info = dict(self.info())
                info["migrations"] = [m.brief() for m in self._visible(uid) if not m.done]
                await _reply(writer, {"result": info})
            else:
                m = self._lookup(ident, uid)
                await _reply(writer, {"result": m.full()})
        elif op == "cancel":
            m = self._lookup(req.get("id"), uid)
            if m.done:
                raise ControlError(f"migration {req.get('id')} already finished "
                                   f"({m.state}); nothing to cancel")
            reason = "cancelled by operator" + (f" (uid {uid})" if uid else "")
            self.manager.cancel(m.id, reason)
            await _reply(writer, {"result": {"id": m.id, "migration_id": m.migration_id or m.id,
                                             "cancelling": True, "state": m.state}})
        elif op == "probe":
            loop = asyncio.get_running_loop()
            from migrated.kernel.probe import probe
            result = await loop.run_in_executor(None, probe)
            await _reply(writer, {"result": result})
        elif op == "send":
            await self._send(req, uid, client_pid, writer)

    async def _send(self, req: dict, uid: int, client_pid: int,
                    writer: asyncio.StreamWriter) -> None:
        pid, host, port = req.get("pid"), req.get("host"), req.get("port")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ControlError(f"pid must be a positive integer, not {pid!r}")
        if not isinstance(host, str) or not host or len(host) > 255:
            raise ControlError(f"host must be a host name or address, not {host!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ControlError(f"port must be 1..65535, not {port!r}")
        if pid == os.getpid():
            raise ControlError("refusing to migrate the daemon itself")
        starttime = check_send_target(uid, pid)
        options = req.get("options", {})
        m = self.manager.start_send(pid, host, port, options, uid, starttime=starttime)
        if not req.get("follow"):
            await _reply(writer, {"result": {"id": m.id, "migration_id": m.id,
                                             "state": m.state, "accepted": True}})
            return
        q = self.manager.follow(m)
        try:
            await _reply(writer, {"event": {"event": "accepted", "migration_id": m.id,
                                            "pid": pid, "peer": m.peer,
                                            "time": round(time.time(), 3)}})
            while True:
                msg = await q.get()
                await _reply(writer, msg)
                if "result" in msg:
                    return
        finally:
            self.manager.unfollow(m, q)

    def _visible(self, uid: int):
        ms = self.manager.all()
        return ms if uid == 0 else [m for m in ms if m.owner_uid == uid]

    def _lookup(self, ident: Any, uid: int):
        if not isinstance(ident, str) or not ident or len(ident) > 128:
            raise ControlError(f"a migration id is required, not {ident!r}")
        m = self.manager.find(ident)
        if uid != 0 and m.owner_uid != uid:
            # Same answer as for an unknown id: do not reveal others' ids.
            raise ControlError(f"no migration {ident} on this node (see `migratectl list`)")
        return m


async def _reply(writer: asyncio.StreamWriter, obj: dict) -> None:
    """Send one reply line.  A client that does not read its replies gets
    IDLE_TIMEOUT_S to make room, then is dropped (ConnectionError): else it
    would hold its slot -- one of MAX_CLIENTS -- for as long as it likes."""
    writer.write(json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n")
    try:
        await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT_S)
    except asyncio.TimeoutError:
        writer.transport.abort()
        raise ConnectionResetError("control client stopped reading its replies") from None
