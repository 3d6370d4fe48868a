"""A rate-capped source over TLS (review 16): every page batch is read
whole there (no splice), and a 4 MiB batch at the capped rate takes longer
than the destination's idle timeout.  It used to be cut ("no message
within 30 s": --max-bandwidth below ~137 KiB/s always failed over TLS);
bytes that keep coming at a link's rate now get the same allowance as
spliced page data (transport.MIN_LINK_RATE).  Scaled down: a 0.8 s idle
timeout and a 3 MiB/s cap (a batch takes ~1.3 s)."""

from __future__ import annotations

import pytest

from migrated.engine.dest import DestLimits
from migrated.engine.source import SendOptions
from migrated.image.store import ImageStore
from tests.engine.harness import migrate
from tests.engine.procs import workload
from tests.engine.tlspair import tls_pair

IDLE_S = 0.8
CAP = 3 * 1024 * 1024


@pytest.fixture
def store(tmp_path):
    return ImageStore(str(tmp_path / "state"), min_free_bytes=0)


def test_a_capped_source_over_tls_is_not_cut_while_its_batches_arrive(store):
    with workload(mib=4, rate=0) as w:
        out = migrate(w.pid, store, SendOptions(max_rounds=0, then="resume"),
                      max_bandwidth=CAP, sockets=tls_pair(), timeout=5.0,
                      limits=DestLimits(idle_timeout_s=IDLE_S, handshake_timeout_s=5.0))
        assert w.state() != "T"
    assert out.dest["status"] == "completed", out.dest.get("error")
    assert out.source["status"] == "completed", out.source.get("error")
    # batches of 4 MiB did take longer than the idle timeout to arrive
    (final,) = out.source["rounds"]
    assert final["bytes"] > 4 * 1024 * 1024 and final["bandwidth"] <= CAP * 1.2
    assert store.verify(out.dest["image_id"]).ok
