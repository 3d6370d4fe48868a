"""The fault matrix, randomized and long (issue 5 item 1).

    python benchmarks/fault_random.py [--cases 200] [--seed N] [--all]
                                      [--minutes M] [--prestopped-share 0.1]

Runs fault cases of tests/faults/harness.py against one FaultBench (two
plaintext daemons with a fault proxy between them, the destination on a
small tmpfs): ``--cases`` cases drawn at random from every (phase, fault)
combination that makes sense (``--all``: each combination once, in
order), optionally stopping after ``--minutes``.  A share of the cases
migrate a target that was already stopped (it must stay stopped).

Prints one line per case, then the counts: cases run, by phase x fault,
failures by kind (lost-ack -- the destination holds an image of a
migration the source gave up on: two copies -- separately from everything
else; with the three-way commit of protocol v1 it must read 0), and the
time it took for the source to notice each fault.  Exit status 1 if any
case failed, lost-ack included.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.faults.harness import FAULTS, PHASES, FaultBench, all_cases, applicable  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--all", action="store_true", help="every combination once")
    ap.add_argument("--minutes", type=float, default=None, help="stop after this long")
    ap.add_argument("--prestopped-share", type=float, default=0.1,
                    help="share of cases whose target was stopped before (default 0.1)")
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    combos = all_cases()
    plan = list(combos) if a.all else [rng.choice(combos) for _ in range(a.cases)]
    print(f"seed {seed}: {len(plan)} cases over {len(combos)} combinations", flush=True)

    ran: collections.Counter = collections.Counter()
    failed: collections.Counter = collections.Counter()
    lost_ack: collections.Counter = collections.Counter()
    detect: dict[str, list[float]] = collections.defaultdict(list)
    failures: list[str] = []
    t_start = time.monotonic()
    with FaultBench() as bench:
        for i, (phase, fault) in enumerate(plan):
            if a.minutes is not None and time.monotonic() - t_start > a.minutes * 60:
                print(f"time is up after {i} cases", flush=True)
                break
            pre = (not a.all and applicable(phase, fault, prestopped=True)
                   and rng.random() < a.prestopped_share)
            try:
                r = bench.run(phase, fault, prestopped=pre)
            except Exception as e:  # noqa: BLE001 -- a harness error is a failure too
                ran[(phase, fault)] += 1
                failed[(phase, fault)] += 1
                failures.append(f"{phase} {fault}: harness error {type(e).__name__}: {e}")
                print(f"[{i + 1}] {phase} {fault}: harness error {e!r}", flush=True)
                continue
            ran[(phase, fault)] += 1
            if r.detect_s is not None:
                detect[fault].append(r.detect_s)
            tag = " prestopped" if pre else ""
            print(f"[{i + 1}]{tag} {r.line()}", flush=True)
            if r.violations:
                if r.only_lost_ack:
                    lost_ack[(phase, fault)] += 1
                else:
                    failed[(phase, fault)] += 1
                    failures.append(f"{phase} {fault}{tag}: {'; '.join(r.violations)}")
        figs = {n: (d.rss_kib(), d.fd_count()) for n, d in
                (("source", bench.src), ("destination", bench.dst)) if d.alive}

    total = sum(ran.values())
    took = time.monotonic() - t_start
    print(f"\n{total} cases in {took:.0f} s (seed {seed}); "
          f"{sum(failed.values())} failed, {sum(lost_ack.values())} lost-ack")
    width = max(len(f) for f in FAULTS)
    print("\ncases run (failed / lost-ack) by phase x fault:")
    print(" " * 10 + " ".join(f"{f[:width]:>{width}}" for f in FAULTS))
    for p in PHASES:
        cells = []
        for f in FAULTS:
            n = ran[(p, f)]
            if not n:
                cells.append(f"{'.':>{width}}")
                continue
            mark = f"{n}"
            if failed[(p, f)] or lost_ack[(p, f)]:
                mark += f"({failed[(p, f)]}/{lost_ack[(p, f)]})"
            cells.append(f"{mark:>{width}}")
        print(f"{p:10}" + " ".join(cells))
    print("\nfault noticed by the source after (median / max s):")
    for f in FAULTS:
        if detect[f]:
            print(f"  {f:12} {statistics.median(detect[f]):6.2f} {max(detect[f]):6.2f}")
    print("\ndaemons at the end: " + (", ".join(
        f"{n} rss {rss / 1024:.1f} MiB fds {fds}" for n, (rss, fds) in figs.items())
        or "none running"))
    if failures:
        print("\nfailures:")
        for line in failures:
            print("  " + line)
    return 1 if failed or lost_ack else 0


if __name__ == "__main__":
    sys.exit(main())
