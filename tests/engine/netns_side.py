"""Run one side of an engine migration inside a network namespace.

- ``socket_in(ns, ...)``: a TCP connection opened from inside namespace
  ``ns`` (setns on a helper thread: network namespaces are per thread, and
  a socket stays in the namespace it was created in), for the source engine
  running in this process.
- ``DestProcess(ns, ip, state_dir)``: ``python -m tests.engine.netns_side``
  inside ``ns`` (via ``ip netns exec``): listens on ``ip``, prints its port,
  runs one DestMigration into an ImageStore at ``state_dir``, prints the
  summary as one JSON line and exits.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLONE_NEWNET = 0x40000000
# The destination process must print its port within this (Python start-up
# plus imports on a loaded box).
START_TIMEOUT_S = 30.0


def _in_netns(ns: str, make):
    """``make()``'s result, called in a thread that entered network
    namespace ``ns`` (a socket stays in the namespace it was made in)."""
    out: dict = {}

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns({ns}): {os.strerror(e)}")
            finally:
                os.close(fd)
            out["result"] = make()
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=work)   # this thread ends in ns; never reused
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def socket_in(ns: str, host: str, port: int, timeout: float = 10.0) -> socket.socket:
    return _in_netns(ns, lambda: socket.create_connection((host, port), timeout=timeout))


def listener_in(ns: str, host: str) -> socket.socket:
    return _in_netns(ns, lambda: socket.create_server((host, 0)))


class DestProcess:
    def __init__(self, ns: str, ip: str, state_dir: str, timeout: float = 30.0):
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.engine.netns_side",
                ip, state_dir, str(timeout)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = self._line()
        self.port = int(line)

    def _line(self) -> str:
        import select
        r, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT_S)
        if not r:
            raise RuntimeError("destination process did not start")
        return self.proc.stdout.readline().strip()

    def result(self, timeout: float = 120.0) -> dict:
        self.proc.wait(timeout)
        return json.loads(self.proc.stdout.read().strip().splitlines()[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()


def _serve(ip: str, state_dir: str, timeout: float) -> None:
    sys.path.insert(0, ROOT)
    from migrated.engine.dest import DestMigration
    from migrated.engine.transport import BlockingTransport
    from migrated.image.store import ImageStore
    srv = socket.create_server((ip, 0))
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    srv.close()
    res = DestMigration(BlockingTransport(conn, timeout=timeout), ImageStore(state_dir),
                        node="netns-dest", on_event=lambda e: None).run()
    print(json.dumps({k: v for k, v in res.items() if k != "rounds"}), flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], float(sys.argv[3]))
