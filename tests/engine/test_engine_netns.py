"""Source in one network namespace, destination in another, the veth link
between them shaped with tc tbf: convergence against a real bandwidth
limit (not our own pacing).  Needs root and iproute2."""

from __future__ import annotations

import os
import signal

import pytest

from migrated.engine.source import SendOptions, SourceMigration
from migrated.engine.transport import BlockingTransport
from migrated.image.store import ImageStore
from tests import netns
from tests.engine.imagecheck import compare
from tests.engine.netns_side import DestProcess, listener_in, socket_in
from tests.engine.procs import workload

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(not netns.available(), reason="needs root, ip and tc")]

LINK_RATE = "200mbit"                 # 25 MB/s
LINK_BYTES_PER_S = 200e6 / 8


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _migrate_over(hosts, pid: int, state: str, options: SendOptions) -> tuple[dict, dict]:
    """A migration of ``pid`` from host a to a destination on host b:
    (source summary, destination summary)."""
    dest = DestProcess(hosts.b, hosts.b_ip, state)
    try:
        sock = socket_in(hosts.a, hosts.b_ip, dest.port)
        res = SourceMigration(pid, options, BlockingTransport(sock, timeout=30),
                              on_event=lambda e: None).run()
        return res, dest.result()
    finally:
        dest.close()


def test_shaped_link_converges_and_is_exact(tmp_path):
    state = str(tmp_path / "dest")
    with netns.TwoHosts(rate=LINK_RATE) as hosts, workload(mib=16, rate=1000) as w:
        res, d = _migrate_over(hosts, w.pid, state, SendOptions(then="stop"))
        assert res["status"] == "completed", res.get("error")
        assert d["status"] == "completed", d.get("error")
        assert _state(w.pid) == "T"
        # The link, not the machine, set the pace of round 0.
        bw0 = res["rounds"][0]["bandwidth"]
        assert bw0 < 2 * LINK_BYTES_PER_S
        compare(ImageStore(state), res["image_id"], w.pid)
        os.kill(w.pid, signal.SIGCONT)


def test_a_peer_in_another_namespace_is_another_host():
    # Over a veth link the peer's address is neither loopback nor ours:
    # a destination there keeps its writer thread (DestMigration).
    with netns.TwoHosts() as hosts:
        ls = listener_in(hosts.b, hosts.b_ip)
        try:
            c = socket_in(hosts.a, hosts.b_ip, ls.getsockname()[1])
            s, _ = ls.accept()
            try:
                assert not BlockingTransport(c).same_host
                assert not BlockingTransport(s).same_host
            finally:
                c.close()
                s.close()
        finally:
            ls.close()


SLOW_LINK = "8mbit"                   # 1 MB/s: a small round fits the kernel's buffers
SLOW_LINK_BYTES_PER_S = 8e6 / 8


def test_round_figures_are_what_the_link_delivered(tmp_path):
    """A live round small enough to sit in the socket buffers (and the
    shaped link's queue) when its last send returns was timed to that send:
    rounds over a 1 MB/s link were reported at 300-600 MB/s, and the policy
    froze the target for three times the downtime target.  Timed to the
    destination's answer to the round's end, every live round's bandwidth
    is the link's."""
    state = str(tmp_path / "dest")
    with netns.TwoHosts(rate=SLOW_LINK) as hosts, workload(mib=4, rate=50) as w:
        res, d = _migrate_over(hosts, w.pid, state, SendOptions(then="resume", timeout_s=120))
        assert res["status"] == "completed", res.get("error")
        assert d["status"] == "completed", d.get("error")
        live = [r for r in res["rounds"] if not r["final"]]
        assert len(live) >= 2, res["rounds"]
        for r in live:
            assert r["bandwidth"] < 2 * SLOW_LINK_BYTES_PER_S, (r, res["rounds"])
            assert r["send_ms"] <= r["duration_ms"]
