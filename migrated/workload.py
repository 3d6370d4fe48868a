"""A workload that dirties memory at a steady rate (demo, tests, benchmarks).

    python -m migrated.workload --mib N --rate PAGES_PER_S [--hot-mib M]
                                [--zero-mib Z] [--tick-ms T]

Maps N MiB of private anonymous memory, fills every page with non-zero
bytes (so nothing can be skipped as a zero page), optionally Z MiB of
present all-zero pages, prints one line::

    ready pid=PID addr=0x... mib=N hot_mib=M zero_addr=0x... zero_mib=Z rate=R

and then, forever until killed, dirties RATE pages per second: in bursts
every tick it increments one 8-byte counter in each of the next pages of
the hot region (the first M MiB; all of it by default), cycling.  Like
QEMU's migration test guest: after a migration every page must carry the
value it had when the process was frozen.  Every burst is one strided numpy
write -- no Python loop per page.
"""

from __future__ import annotations

import argparse
import mmap
import os
import signal
import sys
import time

import numpy as np

PAGE = mmap.PAGESIZE
MIB = 1024 * 1024

# Bursts per second: 100 makes the write stream smooth at the scale of a
# migration round (tens of ms) while keeping the loop's own overhead tiny.
DEFAULT_TICK_MS = 10.0

# The most a burst may catch up after the process was descheduled or
# stopped (SIGSTOP during a freeze): one second's worth -- otherwise a
# thawed workload would dirty its whole hot set at once.
MAX_CATCHUP_S = 1.0


def _anon(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _addr(buf: mmap.mmap) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m migrated.workload", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="memory to allocate and fill (MiB)")
    ap.add_argument("--rate", type=float, default=1000.0, help="pages dirtied per second")
    ap.add_argument("--hot-mib", type=int, default=None, help="dirty only the first M MiB (default: all)")
    ap.add_argument("--zero-mib", type=int, default=0, help="extra MiB of present, all-zero pages")
    ap.add_argument("--tick-ms", type=float, default=DEFAULT_TICK_MS, help="burst interval (ms)")
    a = ap.parse_args(argv)
    if a.mib <= 0:
        ap.error("--mib must be positive")
    hot_mib = a.mib if a.hot_mib is None else min(a.hot_mib, a.mib)

    size = a.mib * MIB
    buf = _anon(size)
    pages = np.frombuffer(buf, dtype=np.uint64).reshape(-1, PAGE // 8)
    npages = pages.shape[0]
    # Non-zero, page-distinct content: word i of page p holds a mix of both.
    pattern = (np.arange(PAGE // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    step = 4096  # fill in slices so the temporary stays small
    for lo in range(0, npages, step):
        hi = min(npages, lo + step)
        pages[lo:hi] = pattern ^ (np.arange(lo, hi, dtype=np.uint64)[:, None] << np.uint64(20))

    zero_addr = 0
    zbuf = None
    if a.zero_mib > 0:
        zbuf = _anon(a.zero_mib * MIB)
        z = np.frombuffer(zbuf, dtype=np.uint8).reshape(-1, PAGE)
        z[:, 0] = 0  # touch: present, still all zeros
        zero_addr = _addr(zbuf)

    print(f"ready pid={os.getpid()} addr={_addr(buf):#x} mib={a.mib} hot_mib={hot_mib} "
          f"zero_addr={zero_addr:#x} zero_mib={a.zero_mib} rate={a.rate:g}", flush=True)

    hot_pages = max(1, hot_mib * MIB // PAGE)
    counters = pages[:hot_pages, 0]          # one word per hot page (strided view)
    tick = max(a.tick_ms, 0.1) / 1000.0
    pos = 0
    done = 0.0
    t0 = time.monotonic()
    while True:
        now = time.monotonic()
        due = a.rate * (now - t0)
        if due - done > a.rate * MAX_CATCHUP_S:
            done = due - a.rate * MAX_CATCHUP_S
        n = int(due - done)
        while n > 0:
            k = min(n, hot_pages - pos)
            counters[pos:pos + k] += np.uint64(1)
            pos = (pos + k) % hot_pages
            n -= k
            done += k
        time.sleep(tick)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:     # Ctrl-C in a terminal (make demo): no traceback
        sys.exit(128 + signal.SIGINT)
