"""sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET.

``READY=1`` once we serve, ``STATUS=...`` whenever the set of migrations
changes, ``STOPPING=1`` on shutdown.  Outside systemd (no NOTIFY_SOCKET)
every call is a cheap no-op.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None):
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]          # abstract namespace
        self.address = addr or None
        self._sock: socket.socket | None = None
        self.last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines; False when not under systemd or when the
        datagram could not be sent (systemd gone: nothing to do about it)."""
        if self.address is None:
            return False
        msg = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *( [f"STATUS={status}"] if status else []),
                           f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        if status == self.last_status:
            return True
        self.last_status = status
        return self.notify(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
