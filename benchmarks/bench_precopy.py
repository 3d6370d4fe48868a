"""freeze_ms of live pre-copy vs stop-and-copy, same workload, one run.

    python benchmarks/bench_precopy.py [--mib 256] [--rate 25000] [--repeat 2]
                                       [--max-bandwidth MIB_PER_S] [--tracker auto]

A busy workload (MIB MiB, every page non-zero, RATE pages dirtied per
second across all of it) is migrated to a destination in a separate
process (DestMigration into an ImageStore in a temp dir), over loopback
TCP, twice per repetition:

- the default policy (``SendOptions()``: 300 ms downtime target, plateau
  detection, 30-round cap);
- ``--max-rounds 0``: plain stop-and-copy.

Both use ``then=resume`` so the same process serves every run.  The figure
is ``freeze_ms`` (from the final SIGSTOP to the Committed acknowledgement),
best of ``--repeat`` for each; the ratio target is <= 0.10.
``--max-bandwidth`` caps the link (e.g. 119 for a 1 Gbit/s network).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_throughput import _connect, _spawn, dest_report  # noqa: E402
from tests.engine.procs import workload  # noqa: E402

TARGET_RATIO = 0.10


def one(pid: int, max_rounds: int | None, tracker: str, max_bandwidth: float | None) -> dict:
    from migrated.engine.source import SendOptions, SourceMigration
    from migrated.engine.transport import BlockingTransport
    opts = SendOptions(then="resume", tracker=tracker)
    if max_rounds is not None:
        opts.max_rounds = max_rounds
    with tempfile.TemporaryDirectory(prefix="bench-img-") as state:
        p, port = _spawn("dest", None, state)
        try:
            s = _connect(port, None)
            res = SourceMigration(pid, opts, BlockingTransport(s, timeout=60, max_bandwidth=max_bandwidth),
                                  on_event=lambda e: None).run()
            p.wait(120)
            res["dest"] = dest_report(p)
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
    if res["status"] != "completed":
        raise SystemExit(f"run failed: {res.get('error')}")
    return res


def _breakdown(res: dict) -> None:
    """Where the freeze went: the source's split (stop, final collection,
    final delta on the wire, waiting for Committed) and the destination's
    commit (chunks digested at commit vs. taken from checkpoints, data
    flush, manifest + renames)."""
    fb = res.get("freeze_breakdown") or {}
    print("    source: " + "  ".join(f"{k[:-3]} {v:.1f} ms" for k, v in fb.items()))
    st = (res.get("dest") or {}).get("store") or {}
    if st:
        print(f"    dest commit {st.get('total_ms', 0):.1f} ms: digest {st.get('digest_ms', 0):.1f} ms "
              f"({st.get('chunks_digested')} of {st.get('chunks')} chunks; "
              f"{st.get('checkpoints')} checkpoints digested {st.get('checkpoint_chunks')} "
              f"in the background), fsync {st.get('fsync_data_ms', 0):.1f} ms, "
              f"manifest+rename {st.get('seal_ms', 0):.1f} ms")


def _rounds(res: dict) -> None:
    for r in res["rounds"]:
        print(f"      round {r['round']:2d}{' final' if r['final'] else '      '} "
              f"{r['pages']:6d} pages {r['duration_ms']:8.1f} ms "
              f"{r['bandwidth'] / 2**20:7.1f} MiB/s  pause {r['pause_ms']:6.1f} ms  "
              f"expected {r['expected_downtime_ms'] or 0:6.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rate", type=float, default=25000.0, help="pages dirtied per second")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tracker", default="auto")
    ap.add_argument("--max-bandwidth", type=float, default=None, help="MiB/s link cap")
    ap.add_argument("--rounds", action="store_true", help="print every round of the best runs")
    a = ap.parse_args()
    bw = a.max_bandwidth * 2**20 if a.max_bandwidth else None

    with workload(mib=a.mib, rate=a.rate) as w:
        print(f"workload: {a.mib} MiB, {a.rate:g} pages/s dirtied "
              f"({a.rate * 4096 / 2**20:.0f} MiB/s), pid {w.pid}; link "
              f"{'loopback' if bw is None else f'{a.max_bandwidth:g} MiB/s'}")
        pre, sac = [], []
        for _ in range(a.repeat):
            pre.append(one(w.pid, None, a.tracker, bw))
            sac.append(one(w.pid, 0, a.tracker, bw))
        bp = min(pre, key=lambda r: r["freeze_ms"])
        bs = min(sac, key=lambda r: r["freeze_ms"])
        live = [r for r in bp["rounds"] if not r["final"]]
        final = bp["rounds"][-1]
        print(f"pre-copy      freeze {bp['freeze_ms']:8.1f} ms  ({len(live)} live rounds, "
              f"stop: {bp['stop_reason']}, final delta {final['pages']} pages, "
              f"expected {bp['expected_downtime_ms']:.0f} ms, tracker {bp['tracker']}, "
              f"total {bp['total_ms'] / 1000:.1f} s)")
        _breakdown(bp)
        if a.rounds:
            _rounds(bp)
        print(f"stop-and-copy freeze {bs['freeze_ms']:8.1f} ms  ({bs['rounds'][-1]['pages']} pages, "
              f"total {bs['total_ms'] / 1000:.1f} s)")
        _breakdown(bs)
        ratio = bp["freeze_ms"] / bs["freeze_ms"]
        print(f"ratio {ratio:.3f} (target <= {TARGET_RATIO})   all runs: pre-copy "
              f"{[round(r['freeze_ms']) for r in pre]} ms, stop-and-copy "
              f"{[round(r['freeze_ms']) for r in sac]} ms")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
