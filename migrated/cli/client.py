"""A blocking client of the daemon's control socket (JSON lines)."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from typing import Any, Iterator

from migrated.errors import MigratedError

# Replies can carry a whole status with every round: generous, but bounded
# so a confused peer cannot make migratectl eat all memory.
MAX_REPLY_BYTES = 16 * 1024 * 1024
# Waiting for a plain reply (list, status, cancel).  `send --follow` waits
# without a timeout: the daemon enforces the migration's own --timeout.
REPLY_TIMEOUT_S = 30.0
# After a failed send, how long we look for what the daemon said before it
# closed (a refusal such as "too many control connections"): it is already
# in our socket when there is one.
PARTING_READ_S = 1.0
# Bytes of a unix socket address's path: struct sockaddr_un.sun_path on Linux
# is 108 with the terminating NUL; no daemon can listen at a longer path.
SUN_PATH_MAX = 107


class ControlError(MigratedError):
    """The daemon answered {"error": ...} or could not be reached."""


class ControlClient:
    def __init__(self, path: str, timeout: float | None = REPLY_TIMEOUT_S):
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._buf = bytearray()

    def connect(self) -> "ControlClient":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise ControlError(f"cannot reach migrated at {self.path}: "
                               f"{_why_unreachable(self.path, e)}") from None
        self.sock = s
        return self

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "ControlClient":
        return self.connect() if self.sock is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, obj: dict) -> None:
        assert self.sock is not None
        try:
            self.sock.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        except OSError as e:
            said = self._parting_words()
            raise ControlError(said or f"lost the connection to migrated at {self.path}: "
                                       f"{e.strerror or e}") from None

    def _parting_words(self) -> str | None:
        """The error the daemon sent before closing our connection -- a
        daemon that refuses a client answers at once and closes, so a
        request written after that fails with EPIPE -- or None."""
        try:
            reply = self.read(timeout=PARTING_READ_S)
        except ControlError:
            return None
        err = reply.get("error")
        return str(err) if err else None

    def read(self, timeout: float | None = -1.0) -> dict:
        """The next reply line as a dict (``timeout`` -1: the client's)."""
        assert self.sock is not None
        self.sock.settimeout(self.timeout if timeout == -1.0 else timeout)
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise ControlError("the daemon sent a malformed reply") from None
                if not isinstance(obj, dict):
                    raise ControlError("the daemon sent a malformed reply")
                return obj
            if len(self._buf) > MAX_REPLY_BYTES:
                raise ControlError(f"reply from the daemon exceeds {MAX_REPLY_BYTES} bytes")
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                raise ControlError(f"no reply from migrated at {self.path} within "
                                   f"{self.sock.gettimeout():g} s") from None
            except OSError as e:
                raise ControlError(f"lost the connection to migrated: {e.strerror or e}") from None
            if not chunk:
                raise ControlError("migrated closed the control connection "
                                   "(daemon stopped or restarted?)")
            self._buf += chunk

    def request(self, obj: dict) -> Any:
        """One request, one reply; returns its "result" or raises."""
        if self.sock is None:
            self.connect()
        self.send(obj)
        reply = self.read()
        if "error" in reply:
            raise ControlError(str(reply["error"]))
        return reply.get("result")

    def stream(self, obj: dict) -> Iterator[dict]:
        """Send one request; yield each reply until the one with "result".
        Events come without a timeout (the daemon enforces the migration's)."""
        if self.sock is None:
            self.connect()
        self.send(obj)
        while True:
            reply = self.read(timeout=None)
            if "error" in reply:
                raise ControlError(str(reply["error"]))
            yield reply
            if "result" in reply:
                return


def _why_unreachable(path: str, e: OSError) -> str:
    """What is wrong with ``path`` as a control socket, from the failed
    connect's error and what the path turns out to be (a refused connect
    to a regular file or a directory is not a daemon that stopped)."""
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        return (f"the path is {size} bytes, longer than a unix socket address allows "
                f"({SUN_PATH_MAX}); pass the path the daemon's --control names")
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        return ("it is a directory, not a socket; pass the socket inside it "
                "(the daemon's --control, e.g. /run/migrated/control.sock)")
    if st is not None and not stat.S_ISSOCK(st.st_mode):
        return ("it is not a socket (a regular file or device); pass the daemon's "
                "--control path")
    hint = {
        errno.ENOENT: "is migrated running? (or pass --control PATH)",
        errno.ECONNREFUSED: "the daemon is not running (stale socket)",
        errno.EACCES: "permission denied: run as root or as a member of the "
                      "daemon's --control-group",
    }.get(e.errno, "")
    return (e.strerror or str(e)) + (f"; {hint}" if hint else "")


def request(path: str, obj: dict) -> Any:
    with ControlClient(path) as c:
        return c.request(obj)
