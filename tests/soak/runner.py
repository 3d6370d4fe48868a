"""Back-to-back migrations between two daemons, watching their resources.

:func:`soak` starts two daemons (mutual TLS, short timeouts), migrates one
writing process from the first to the second ``count`` times in a row
(the destination's image removed after each, as an operator would), and
records each daemon's open files, threads and resident memory before and
after, plus every migration's duration.  Used by tests/soak (a short run)
and benchmarks/soak.py (100 migrations).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from tests.cluster import FAST_TIMEOUTS, Cluster, Daemon
from tests.faults.victim import Victim

# Migrations run before the baseline is taken: the first ones import
# modules and grow the allocators' pools to their working size.
DEFAULT_WARMUP = 2
OPTIONS = {"then": "resume", "timeout_s": 120}


@dataclass
class Figures:
    rss_kib: int
    fds: int
    threads: int

    @classmethod
    def of(cls, d: Daemon) -> "Figures":
        return cls(d.rss_kib(), d.fd_count(), d.thread_count())


@dataclass
class SoakReport:
    count: int
    mib: int
    tls: bool
    before: dict[str, Figures] = field(default_factory=dict)
    after: dict[str, Figures] = field(default_factory=dict)
    peak_rss_kib: dict[str, int] = field(default_factory=dict)
    rss_series_kib: dict[str, list[int]] = field(default_factory=dict)   # after each
    times_s: list[float] = field(default_factory=list)
    freeze_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def growth(self, name: str) -> Figures:
        b, a = self.before[name], self.after[name]
        return Figures(a.rss_kib - b.rss_kib, a.fds - b.fds, a.threads - b.threads)

    def second_half_growth_kib(self, name: str) -> int:
        """RSS growth from the middle of the run to its end: a leak grows
        linearly, the allocators' pools level off after a few migrations."""
        series = self.rss_series_kib[name]
        return series[-1] - series[len(series) // 2 - 1] if len(series) >= 2 else 0

    def lines(self) -> list[str]:
        out = [f"{self.count} migrations of a {self.mib} MiB writing process "
               f"({'mutual TLS' if self.tls else 'plaintext'}), "
               f"{len(self.failures)} failed"]
        for name in self.before:
            b, a, g = self.before[name], self.after[name], self.growth(name)
            out.append(f"  {name}: rss {b.rss_kib / 1024:.1f} -> {a.rss_kib / 1024:.1f} MiB "
                       f"({g.rss_kib / 1024:+.1f}, second half "
                       f"{self.second_half_growth_kib(name) / 1024:+.1f}, "
                       f"peak {self.peak_rss_kib[name] / 1024:.1f}), "
                       f"fds {b.fds} -> {a.fds}, threads {b.threads} -> {a.threads}")
        if self.times_s:
            t = sorted(self.times_s)
            out.append(f"  per migration: min {t[0]:.3f} s, median {statistics.median(t):.3f} s, "
                       f"p95 {t[int(0.95 * (len(t) - 1))]:.3f} s, max {t[-1]:.3f} s")
        if self.freeze_ms:
            f = sorted(self.freeze_ms)
            out.append(f"  freeze_ms: median {statistics.median(f):.1f}, max {f[-1]:.1f}")
        for e in self.failures[:5]:
            out.append(f"  failure: {e}")
        return out


def soak(count: int, mib: int = 8, tls: bool = True, warmup: int = DEFAULT_WARMUP,
         progress=None) -> SoakReport:
    rep = SoakReport(count, mib, tls)
    with Cluster(tls=tls, timeouts=FAST_TIMEOUTS) as c:
        src, dst = c.daemon("src"), c.daemon("dst", extra=["--min-free", "1M"])
        daemons = {"source": src, "destination": dst}
        with Victim(mib=mib, rate=1000) as v:
            def one() -> dict:
                s = src.migrate(v.pid, dst, timeout=180, **OPTIONS)
                dst.remove_images()
                return s

            for _ in range(warmup):
                one()
            rep.before = {n: Figures.of(d) for n, d in daemons.items()}
            rep.peak_rss_kib = {n: f.rss_kib for n, f in rep.before.items()}
            for i in range(count):
                t0 = time.monotonic()
                s = one()
                rep.times_s.append(time.monotonic() - t0)
                if s.get("status") != "completed":
                    rep.failures.append(f"#{i}: {s.get('status')}: {s.get('error')}")
                elif s.get("freeze_ms") is not None:
                    rep.freeze_ms.append(float(s["freeze_ms"]))
                for n, d in daemons.items():
                    rss = d.rss_kib()
                    rep.peak_rss_kib[n] = max(rep.peak_rss_kib[n], rss)
                    rep.rss_series_kib.setdefault(n, []).append(rss)
                if progress is not None:
                    progress(i, s, {n: Figures.of(d) for n, d in daemons.items()})
            # Let finished sessions wind down before the last look.
            dst.wait_idle(10)
            src.wait_idle(10)
            time.sleep(0.2)
            rep.after = {n: Figures.of(d) for n, d in daemons.items()}
    return rep
