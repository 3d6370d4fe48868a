"""Thousands of idle connections: open them, watch them being closed.

:func:`idle_flood` opens ``count`` TCP connections to a daemon (non-blocking
connects, in waves, from several loopback source addresses so that a
per-address limit alone cannot absorb them), says nothing on any of them,
and waits until the daemon has closed every one.  It samples the daemon's
resident memory and open files while it waits.
"""

from __future__ import annotations

import errno
import resource
import select
import socket
import time
from dataclasses import dataclass, field

# Connections opened per wave, and the pause between waves.
WAVE = 50
WAVE_PAUSE_S = 0.005
# A wave is opened only while the daemon's accept queue holds fewer than
# this many connections.  Past its backlog (128) the kernel drops the
# client's final ACK; with SYN cookies the server then forgets the
# connection while a silent client believes it is established -- a flood
# of those measures the kernel, not the daemon.
MAX_ACCEPT_QUEUE = 64
# How long to wait for the accept queue to drain before opening anyway.
QUEUE_WAIT_S = 2.0


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listening socket on
    ``port`` (this network namespace), from /proc/net/tcp."""
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, queues = fields[1], fields[3], fields[4]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return int(queues.split(":")[1], 16)
    except OSError:
        pass
    return 0


@dataclass
class FloodResult:
    opened: int = 0
    refused_connect: int = 0          # connect() itself failed
    closed_by_daemon: int = 0
    still_open: int = 0
    close_times: list[float] = field(default_factory=list)   # s after connect
    rss_peak_kib: int = 0
    fds_peak: int = 0
    threads_peak: int = 0
    duration_s: float = 0.0

    @property
    def max_close_s(self) -> float:
        return max(self.close_times, default=0.0)


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))


def idle_flood(host: str, port: int, count: int, sources: list[str], daemon_pid: int,
               timeout: float) -> FloodResult:
    from tests.cluster import fd_count, rss_kib, thread_count
    raise_fd_limit(count + 256)
    res = FloodResult()
    ep = select.epoll()
    socks: dict[int, tuple[socket.socket, float]] = {}
    t0 = time.monotonic()

    def sample():
        try:
            res.rss_peak_kib = max(res.rss_peak_kib, rss_kib(daemon_pid))
            res.fds_peak = max(res.fds_peak, fd_count(daemon_pid))
            res.threads_peak = max(res.threads_peak, thread_count(daemon_pid))
        except (FileNotFoundError, ProcessLookupError):
            pass

    def reap(wait: float) -> None:
        for fd, ev in ep.poll(wait):
            s, t_open = socks.get(fd, (None, 0.0))
            if s is None:
                continue
            try:
                data = s.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                continue          # the daemon said something; keep waiting for close
            res.close_times.append(time.monotonic() - t_open)
            res.closed_by_daemon += 1
            ep.unregister(fd)
            s.close()
            del socks[fd]

    try:
        i = 0
        while i < count:
            wait_until = time.monotonic() + QUEUE_WAIT_S
            while accept_queue(port) >= MAX_ACCEPT_QUEUE and time.monotonic() < wait_until:
                reap(0.01)
            for _ in range(min(WAVE, count - i)):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                s.bind((sources[i % len(sources)], 0))
                err = s.connect_ex((host, port))
                i += 1
                if err not in (0, errno.EINPROGRESS):
                    res.refused_connect += 1
                    s.close()
                    continue
                socks[s.fileno()] = (s, time.monotonic())
                ep.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
                res.opened += 1
            sample()
            reap(WAVE_PAUSE_S)
        deadline = time.monotonic() + timeout
        while socks and time.monotonic() < deadline:
            reap(0.05)
            sample()
        res.still_open = len(socks)
    finally:
        for s, _ in socks.values():
            s.close()
        ep.close()
    res.duration_s = time.monotonic() - t0
    return res
