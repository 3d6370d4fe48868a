"""Fixtures of the hostile-peer tests: a plaintext destination daemon under
attack, and a legitimate source daemon migrating a real process to it, back
to back, in a background thread for as long as the attacks last."""

from __future__ import annotations

import threading
import time

import pytest

from tests.cluster import FAST_TIMEOUTS, Cluster
from tests.faults.victim import Victim

# The legitimate migrations: a small writing process, paced so that each
# one spans several attacks.
LEGIT_VICTIM = {"mib": 8, "rate": 500.0}
LEGIT_OPTIONS = {"then": "resume", "max_bandwidth": 16 << 20, "timeout_s": 60}


class LegitLoop:
    """Migrates one process again and again until stopped; every result is
    kept for the final check."""

    def __init__(self, src, dst, victim: Victim):
        self.src, self.dst, self.victim = src, dst, victim
        self.results: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="legit-loop")

    def start(self) -> "LegitLoop":
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                s = self.src.migrate(self.victim.pid, self.dst, timeout=90, **LEGIT_OPTIONS)
                self.results.append(s)
                if s.get("status") == "completed":
                    self.dst.remove_images()
            except Exception as e:  # noqa: BLE001 -- reported by the final test
                self.errors.append(f"{type(e).__name__}: {e}")
                time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(120)


class Env:
    def __init__(self, cluster: Cluster, dst_extra: list[str] = ()):
        self.cluster = cluster
        self.dst = cluster.daemon("dst", extra=["--max-migrations", "8", "--min-free", "1M",
                                                *dst_extra])
        self.src = cluster.daemon("src")
        # Victim started here, in the main thread: its PR_SET_PDEATHSIG
        # follows the thread that forked it.
        self.victim = Victim(**LEGIT_VICTIM)
        self.legit = LegitLoop(self.src, self.dst, self.victim).start()
        self.rss_peak_kib = 0

    def sample(self) -> int:
        rss = self.dst.rss_kib()
        self.rss_peak_kib = max(self.rss_peak_kib, rss)
        return rss

    def close(self) -> None:
        self.legit.stop()
        self.victim.close()
        self.cluster.close()


@pytest.fixture(scope="module")
def env():
    """Plaintext daemons (raw protocol attacks)."""
    e = Env(Cluster(tls=False, timeouts=FAST_TIMEOUTS))
    try:
        yield e
    finally:
        e.close()


@pytest.fixture(scope="module")
def tls_env():
    """Mutual-TLS daemons; the destination only admits the source's name."""
    e = Env(Cluster(tls=True, timeouts=FAST_TIMEOUTS), dst_extra=["--allow-peer", "src"])
    try:
        yield e
    finally:
        e.close()
