#!/usr/bin/env python3
"""Kernel-layer benchmark: dirty scans and memory reads, each against the
bare system call doing the same work in the same run.

For each resident size (default 1 GiB and 4 GiB) a target child populates
that much private anonymous memory, then we time:

* bare pagemap pread of the region (one preadv into a ready buffer);
* the present scan: Pagemap.present_runs (pread + numpy decode) and, when
  the kernel has it, PAGEMAP_SCAN;
* the soft-dirty tracker's collect (freeze, pagemap read, clear_refs 4,
  thaw) -- on a kernel without soft-dirty the bits mean nothing but the
  cost is the same work;
* the digest tracker's collect (read every present page, digest, compare)
  in steady state (everything sent, nothing changed);
* read throughput of MemReader vs a bare process_vm_readv loop with the
  same chunking (16 MiB), for one contiguous run and for every other page
  (scattered: 1024 iovecs a call).

Not part of `make test`.  Usage:
  bench_kernel.py [--sizes 1,4] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from migrated.kernel import probe as kprobe                       # noqa: E402
from migrated.kernel.freezer import Freezer                        # noqa: E402
from migrated.kernel.maps import read_layout                       # noqa: E402
from migrated.kernel.pagemap import Pagemap                        # noqa: E402
from migrated.kernel.reader import (DEFAULT_BUFFER_BYTES, UIO_MAXIOV,  # noqa: E402
                                    MemReader, process_vm_readv)
from migrated.kernel.trackers import DigestTracker, SoftDirtyTracker  # noqa: E402
from migrated.runs import PAGE_SIZE, PageRuns                      # noqa: E402
from tests.target import Target                                    # noqa: E402

GIB = 1 << 30


def best(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` calls, in seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def duel(a, b, repeat: int) -> tuple[float, float]:
    """Best wall times of ``a`` and ``b``, run alternately so a noisy
    neighbour on the machine hurts both alike."""
    ta, tb = [], []
    for _ in range(repeat):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def bare_pagemap(pid: int, start: int, end: int) -> callable:
    n = (end - start) // PAGE_SIZE
    buf = np.empty(n, np.uint64)
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)

    def run():
        got = os.preadv(fd, [memoryview(buf).cast("B")], (start // PAGE_SIZE) * 8)
        assert got == n * 8
    run.close = lambda: os.close(fd)
    return run


def bare_pvr_loop(pid: int, runs: PageRuns, chunk_bytes: int) -> callable:
    """process_vm_readv over ``runs``: chunks of ``chunk_bytes``, at most
    UIO_MAXIOV remote iovecs a call, one local buffer -- MemReader's
    chunking without its fault handling.  Builds its iovecs as it goes,
    as any reader must."""
    buf = np.empty(chunk_bytes, np.uint8)
    buf[::PAGE_SIZE] = 0   # fault the buffer in before timing
    local = np.zeros((1, 2), np.uint64)
    local[0, 0] = buf.ctypes.data

    def run():
        total = 0
        for piece in runs.split(chunk_bytes // PAGE_SIZE):
            rem = np.empty((piece.starts.size, 2), np.uint64)
            rem[:, 0] = piece.starts
            rem[:, 1] = piece.counts * np.uint64(PAGE_SIZE)
            off = 0
            for i in range(0, rem.shape[0], UIO_MAXIOV):
                r = rem[i:i + UIO_MAXIOV]
                local[0, 0] = buf.ctypes.data + off
                local[0, 1] = int(r[:, 1].sum())
                got = process_vm_readv(pid, local, r)
                off += got
                total += got
        assert total == runs.total_bytes()
    return run


def reader_loop(pid: int, runs: PageRuns) -> callable:
    rd = MemReader(pid)
    for _ in rd.read(runs.split(4096).__next__()):   # fault its buffer in
        pass

    def run():
        total = 0
        for chunk in rd.read(runs):
            total += len(chunk.data)
        assert total == runs.total_bytes()
    return run


def bench_size(gib: float, repeat: int, info: dict) -> dict:
    npages = int(gib * GIB) // PAGE_SIZE
    out: dict = {"resident_gib": gib, "pages": npages}
    with Target() as t:
        t.map("big", npages, guard=True)
        t0 = time.perf_counter()
        t.cmd("fill", "big", 0, npages, 7, timeout=600)
        out["populate_s"] = time.perf_counter() - t0
        start, end = t.range("big")
        region = PageRuns.from_range(start, end)
        layout = read_layout(t.pid)
        m = layout.find(start)

        # -- dirty scans ------------------------------------------------------
        bare = bare_pagemap(t.pid, start, end)
        with Pagemap(t.pid) as pm:
            assert pm.present_runs(m) == region
            b, o = duel(bare, lambda: pm.present_runs(m), repeat)
            out["pagemap_pread_ms"], out["present_scan_pread_ms"] = b * 1e3, o * 1e3
            if pm.has_scan:
                assert pm.present_runs_scan(m) == region
                out["present_scan_ioctl_ms"] = duel(bare, lambda: pm.present_runs_scan(m),
                                                    repeat)[1] * 1e3
        bare.close()

        fz = Freezer(t.pid)
        sd = SoftDirtyTracker(t.pid, fz)
        try:
            c = sd.start(layout)
            colls = []
            out["softdirty_collect_ms"] = best(lambda: colls.append(sd.collect(layout)),
                                               repeat) * 1e3
            out["softdirty_pause_ms"] = min(c.pause_ms for c in colls)
            out["softdirty_meaningful"] = info["soft_dirty"]
        finally:
            sd.close()
            fz.close()

        dg = DigestTracker(t.pid)
        try:
            c = dg.start(layout)
            rd = MemReader(t.pid)
            t0 = time.perf_counter()
            for chunk in rd.read(c.dirty):
                dg.sent(chunk.runs, chunk.data)
            out["digest_first_send_s"] = time.perf_counter() - t0
            res = []
            out["digest_collect_ms"] = best(lambda: res.append(dg.collect(layout)),
                                            max(1, repeat - 1)) * 1e3
            assert not res[-1].dirty.clip(start, end), "idle region reported dirty"
            rss = c.dirty.total_bytes()
            out["digest_collect_gbps"] = rss / (out["digest_collect_ms"] / 1e3) / 1e9
        finally:
            dg.close()

        # -- reads ------------------------------------------------------------------
        mask = np.zeros(npages, bool)
        mask[::2] = True
        scattered = PageRuns.from_mask(start, mask)
        for label, runs in (("contiguous", region), ("every_other_page", scattered)):
            b, r = duel(bare_pvr_loop(t.pid, runs, DEFAULT_BUFFER_BYTES),
                        reader_loop(t.pid, runs), repeat)
            out[f"read_{label}_bare_gbps"] = runs.total_bytes() / b / 1e9
            out[f"read_{label}_reader_gbps"] = runs.total_bytes() / r / 1e9
    # ratios: >1 means slower than the bare call
    out["ratio_present_scan_vs_pread"] = out["present_scan_pread_ms"] / out["pagemap_pread_ms"]
    if "present_scan_ioctl_ms" in out:
        out["ratio_scan_ioctl_vs_pread"] = out["present_scan_ioctl_ms"] / out["pagemap_pread_ms"]
    out["ratio_softdirty_collect_vs_pread"] = out["softdirty_collect_ms"] / out["pagemap_pread_ms"]
    out["ratio_digest_collect_vs_pread"] = out["digest_collect_ms"] / out["pagemap_pread_ms"]
    for label in ("contiguous", "every_other_page"):
        out[f"ratio_read_{label}_reader_vs_bare"] = (out[f"read_{label}_reader_gbps"]
                                                     / out[f"read_{label}_bare_gbps"])
    return out


def print_table(info: dict, results: list[dict]) -> None:
    print(f"kernel {info['kernel']} ({platform.machine()}), {os.cpu_count()} CPUs, "
          f"soft-dirty {'yes' if info['soft_dirty'] else 'NO (bits meaningless, cost real)'}, "
          f"PAGEMAP_SCAN {'yes' if info['pagemap_scan'] else 'no'}")
    rows = [
        ("bare pagemap pread", "pagemap_pread_ms", "ms"),
        ("present scan (pread+numpy)", "present_scan_pread_ms", "ms"),
        ("present scan (PAGEMAP_SCAN)", "present_scan_ioctl_ms", "ms"),
        ("soft-dirty collect", "softdirty_collect_ms", "ms"),
        ("  of which target paused", "softdirty_pause_ms", "ms"),
        ("digest collect (steady)", "digest_collect_ms", "ms"),
        ("digest collect rate", "digest_collect_gbps", "GB/s"),
        ("read contiguous: bare pvr", "read_contiguous_bare_gbps", "GB/s"),
        ("read contiguous: MemReader", "read_contiguous_reader_gbps", "GB/s"),
        ("read every other page: bare", "read_every_other_page_bare_gbps", "GB/s"),
        ("read every other page: MemReader", "read_every_other_page_reader_gbps", "GB/s"),
        ("ratio present scan / pread", "ratio_present_scan_vs_pread", "x"),
        ("ratio PAGEMAP_SCAN / pread", "ratio_scan_ioctl_vs_pread", "x"),
        ("ratio soft-dirty collect / pread", "ratio_softdirty_collect_vs_pread", "x"),
        ("ratio digest collect / pread", "ratio_digest_collect_vs_pread", "x"),
        ("ratio MemReader / bare (contig)", "ratio_read_contiguous_reader_vs_bare", "x"),
        ("ratio MemReader / bare (scatter)", "ratio_read_every_other_page_reader_vs_bare", "x"),
    ]
    head = f"{'':36}" + "".join(f"{str(r['resident_gib']) + ' GiB':>12}" for r in results)
    print(head)
    for label, key, unit in rows:
        vals = "".join(f"{r[key]:>12.2f}" if key in r else f"{'-':>12}" for r in results)
        print(f"{label + ' (' + unit + ')':36}{vals}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,4", help="resident sizes in GiB (default 1,4)")
    ap.add_argument("--repeat", type=int, default=5, help="best of N (default 5)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    info = kprobe.probe()
    results = [bench_size(float(s), args.repeat, info) for s in args.sizes.split(",")]
    if args.json:
        print(json.dumps({"probe": info, "results": results}, indent=2))
    else:
        print_table(info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
