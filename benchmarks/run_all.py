"""Every benchmark with a target, one after the other (``make bench``).

    python benchmarks/run_all.py [--quick]

Runs, each in its own interpreter so none inherits another's memory:

- ``bench_kernel.py``: scans and reads against the bare system calls
  (issue 2; a table of ratios, no pass/fail);
- ``bench_throughput.py``: round 0 against raw loopback TCP and TLS
  (issue 4 (a), target >= 0.5);
- ``bench_precopy.py``: freeze of the default policy against
  stop-and-copy (issue 4 (b), target <= 0.10).

Each one's output is passed through as it comes; a summary at the end
gives each one's exit status (bench_throughput and bench_precopy exit 1
when they miss their target).  ``--quick`` runs smaller sizes and fewer repeats
(a smoke run: the figures are noisier).  Exit status 0 only when every
benchmark exited 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# (script, arguments for a full run, arguments for --quick)
BENCHES = (
    ("bench_kernel.py", [], ["--sizes", "1", "--repeat", "2"]),
    ("bench_throughput.py", [], ["--mib", "128", "--repeat", "1", "--no-budget"]),
    ("bench_precopy.py", [], ["--repeat", "1"]),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smaller sizes, fewer repeats (a smoke run)")
    a = ap.parse_args()
    results = []
    for script, full, quick in BENCHES:
        argv = [sys.executable, os.path.join(HERE, script), *(quick if a.quick else full)]
        print(f"== {script} {' '.join(argv[2:])}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(argv)
        results.append((script, rc, time.monotonic() - t0))
        print(flush=True)
    print("== summary")
    for script, rc, secs in results:
        verdict = "ok" if rc == 0 else f"exit {rc}: missed its target or failed (see above)"
        print(f"  {script:22s} {verdict}  [{secs:.0f} s]")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
