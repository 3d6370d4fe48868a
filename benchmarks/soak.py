"""Soak: 100 back-to-back migrations between two daemons, and what they
cost the daemons.

    python benchmarks/soak.py [--count 100] [--mib 8] [--insecure] [--every 10]

Two `migrated` (mutual TLS by default, throwaway certificates, short test
timeouts) on loopback; one process writing 1000 pages/s migrated from the
first to the second ``--count`` times in a row with ``--then resume``, the
destination's image removed after each.  Prints, for both daemons, open
files, threads and resident memory before (after two warm-up migrations)
and after, the growth over the second half of the run (a leak grows
linearly; allocator pools level off), and the per-migration times and
freeze times.  Exit status 1 if a migration failed or a daemon kept
growing (more than tests/soak/test_soak.py allows over the second half).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.soak.runner import soak  # noqa: E402
from tests.soak.test_soak import RSS_SECOND_HALF_LIMIT_KIB  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=100, help="migrations (default 100)")
    ap.add_argument("--mib", type=int, default=8, help="size of the migrated process")
    ap.add_argument("--insecure", action="store_true", help="plaintext daemons")
    ap.add_argument("--every", type=int, default=10, help="print figures every N migrations")
    a = ap.parse_args(argv)

    def progress(i, s, figs):
        if (i + 1) % a.every == 0 or s.get("status") != "completed":
            print(f"  #{i + 1:4d} {s.get('status'):9} "
                  + "  ".join(f"{n}: rss {f.rss_kib / 1024:6.1f} MiB fds {f.fds:3d} "
                              f"threads {f.threads:2d}" for n, f in figs.items()),
                  flush=True)

    rep = soak(a.count, mib=a.mib, tls=not a.insecure, progress=progress)
    print("\n".join(rep.lines()))
    # The same bound as the test: a daemon that levelled off stays flat
    # however long the run; a leak only shows more.
    limit = RSS_SECOND_HALF_LIMIT_KIB
    bad = bool(rep.failures)
    for name in rep.before:
        g = rep.growth(name)
        half = rep.second_half_growth_kib(name)
        if g.fds > 0 or g.threads > 0 or half > limit:
            print(f"GROWTH: {name}: fds {g.fds:+d}, threads {g.threads:+d}, rss over the "
                  f"second half {half / 1024:+.1f} MiB (limit {limit / 1024:.0f})")
            bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
