"""A finished migration's engines are freed by reference counting alone.

A daemon runs migration after migration.  An engine caught in a reference
cycle keeps its memory -- the destination's receive buffers and image
writer, the source's read buffers: megabytes -- until Python's cyclic
collector runs, which in a long-lived daemon may be many migrations later
(the soak benchmark saw the destination grow by about 0.35 MiB per
migration over 150 migrations).  So once run() has returned and the last
reference is dropped, both engines must be gone with the collector off.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from migrated.engine.dest import DestLimits, DestMigration
from migrated.engine.source import SendOptions, SourceMigration
from migrated.engine.transport import BlockingTransport
from migrated.image.store import ImageStore
from tests.engine.procs import workload
from tests.engine.tlspair import tcp_pair, tls_pair


def _migrate(pid: int, store: ImageStore, link, cancel_at_round: int | None = None,
             limits: DestLimits | None = None):
    """One migration with both engines in this process; weak references to
    both, and both results.  Callbacks capture no engine."""
    a, b = link()
    dm = DestMigration(BlockingTransport(b, timeout=30), store, node="lifetime",
                       on_event=lambda e: None, limits=limits)
    dres: dict = {}
    t = threading.Thread(target=lambda: dres.update(dm.run()))
    t.start()
    latch = threading.Event()

    def on_event(e: dict) -> None:
        if cancel_at_round is not None and e.get("event") == "round" \
                and e.get("round") == cancel_at_round:
            latch.set()

    sm = SourceMigration(pid, SendOptions(then="resume"), BlockingTransport(a, timeout=30),
                         on_event=on_event)
    canceller = None
    if cancel_at_round is not None:
        canceller = threading.Thread(target=lambda: latch.wait(30) and sm.cancel("test cancel"))
        canceller.start()
    sres = sm.run()
    t.join(30)
    if canceller is not None:
        latch.set()
        canceller.join(30)
    assert not t.is_alive()
    return weakref.ref(dm), weakref.ref(sm), sres, dres


@pytest.mark.parametrize("link", [tcp_pair, tls_pair])
@pytest.mark.parametrize("end", ["completed", "cancelled", "failed"])
def test_engines_are_freed_without_the_cycle_collector(tmp_path, link, end):
    """Completed; cancelled by the source in round 0; failed -- the
    destination refuses more than 1 MiB of pages and both sides end in
    an error (the exception paths, where tracebacks make cycles easily)."""
    store = ImageStore(str(tmp_path / "state"))
    with workload(mib=8, rate=1000) as w:
        _migrate(w.pid, store, link)        # imports and one-time caches first
        gc.collect()
        gc.disable()
        try:
            dest, source, sres, dres = _migrate(
                w.pid, store, link, cancel_at_round=0 if end == "cancelled" else None,
                limits=DestLimits(quota_bytes=1 << 20) if end == "failed" else None)
            assert sres["status"] == end, sres.get("error")
            assert dres["status"] in (end, "failed"), dres.get("error")
            # A background thread finishing its last step (a flush's report,
            # a cancel's last words) may hold an engine a moment longer; a
            # cycle holds it for good (the collector is off).
            deadline = time.monotonic() + 5.0
            while (dest() is not None or source() is not None) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert dest() is None, "the destination engine outlived its run (a reference cycle)"
            assert source() is None, "the source engine outlived its run (a reference cycle)"
        finally:
            gc.enable()
