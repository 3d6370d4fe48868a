"""Faults between two network namespaces, over mutual TLS (issue 5 item 1).

The daemons run in two namespaces joined by a veth pair shaped with tc
tbf (tests/netns.py); the fault is injected from outside when a daemon's
log says the migration reached a phase:

- the link goes down silently (blackhole routes: no RST, no FIN -- only
  timeouts can notice) in the middle of round 0, and while the target is
  frozen;
- the source daemon is SIGKILLed while the target is frozen, and
  restarted on its state dir (its journal must thaw the target).

After each: the target runs again within 2 s of the source giving up, the
destination gives up too and keeps no image, and once the link is back the
same daemons migrate the process successfully.
"""

from __future__ import annotations

import time

import pytest

from tests import netns
from tests.cluster import (FAST_TIMEOUTS, Cluster, event_is, proc_state, tmpfs_available,
                           wait_not_stopped, wait_until)
from tests.faults.victim import Victim

pytestmark = [pytest.mark.netns, pytest.mark.slow,
              pytest.mark.skipif(not (netns.available() and tmpfs_available()),
                                 reason="needs root, iproute2 and tc")]

# The link: slow enough that round 0 of the victim lasts about a second.
LINK_RATE = "100mbit"
VICTIM_MIB = 16
# Stop-and-copy paced so that the target stays frozen for seconds.
FROZEN_OPTIONS = {"max_rounds": 0, "max_bandwidth": 4 << 20, "then": "resume",
                  "timeout_s": 60}
LIVE_OPTIONS = {"downtime_ms": 1, "max_rounds": 3, "then": "resume", "timeout_s": 60}
THAW_DEADLINE_S = 2.0
# A silent link is noticed by the short test timeouts (3 s); this bounds
# the whole reaction including TCP's own (TCP_USER_TIMEOUT, keepalive).
NOTICE_WITHIN_S = 3 * FAST_TIMEOUTS.io_s + 5.0


@pytest.fixture(scope="module")
def pair():
    with netns.TwoHosts(rate=LINK_RATE) as hosts:
        c = Cluster(tls=True, timeouts=FAST_TIMEOUTS, hosts=hosts)
        try:
            a = c.daemon("a", ns="a")
            b = c.daemon("b", ns="b", state_dir=c.tmpfs("b-state", "128M"),
                         extra=["--min-free", "1M"])
            yield hosts, a, b
        finally:
            hosts.restore()
            c.close()


@pytest.fixture
def victim():
    v = Victim(mib=VICTIM_MIB, rate=1000)
    try:
        yield v
    finally:
        v.close()


def _after(hosts, a, b, v, mid, t_src_end) -> None:
    """The checks every fault must pass, then the follow-up migration."""
    assert v.alive
    assert wait_not_stopped(v.pid, THAW_DEADLINE_S), \
        f"target {v.pid} still {proc_state(v.pid)} {THAW_DEADLINE_S} s after the source gave up"
    assert not a.journal()
    wait_until(lambda: (b.status(mid) or {}).get("state") in (None, "failed", "cancelled"),
               NOTICE_WITHIN_S, "the destination to give up")
    assert not b.images(mid), "the destination kept an image of a failed migration"
    wait_until(lambda: not b.partials(), 5, "partial image removed")
    hosts.restore()
    s = a.migrate(v.pid, b, timeout=120, **LIVE_OPTIONS)
    assert s["status"] == "completed", s
    b.remove_images()


def test_blackhole_mid_round(pair, victim):
    hosts, a, b = pair
    blog = b.follow()
    mid = a.send(victim.pid, b.host, b.port, **LIVE_OPTIONS)
    blog.wait(event_is("start", mid), 30, "the destination's start line")
    time.sleep(0.2)                              # well inside round 0
    hosts.blackhole()
    t0 = time.monotonic()
    st = a.wait_done(mid, NOTICE_WITHIN_S + 10)
    took = time.monotonic() - t0
    print(f"source gave up after {took:.2f} s: {st['summary'].get('error')}")
    assert st["state"] == "failed", st
    assert took <= NOTICE_WITHIN_S, took
    _after(hosts, a, b, victim, mid, time.monotonic())


def test_blackhole_while_frozen(pair, victim):
    hosts, a, b = pair
    alog = a.follow()
    mid = a.send(victim.pid, b.host, b.port, **FROZEN_OPTIONS)
    alog.wait(event_is("freeze", mid), 30, "the source's freeze line")
    time.sleep(0.3)
    assert proc_state(victim.pid) == "T"
    hosts.blackhole()
    t0 = time.monotonic()
    st = a.wait_done(mid, NOTICE_WITHIN_S + 10)
    took = time.monotonic() - t0
    print(f"frozen target released after {took:.2f} s of dead link")
    assert st["state"] == "failed", st
    assert took <= NOTICE_WITHIN_S, took
    _after(hosts, a, b, victim, mid, time.monotonic())


def test_source_daemon_killed_while_frozen(pair, victim):
    hosts, a, b = pair
    alog = a.follow()
    mid = a.send(victim.pid, b.host, b.port, **FROZEN_OPTIONS)
    alog.wait(event_is("freeze", mid), 30, "the source's freeze line")
    time.sleep(0.3)
    assert proc_state(victim.pid) == "T"
    a.kill()
    time.sleep(0.2)
    assert proc_state(victim.pid) == "T"          # nobody thawed it yet
    a.start()                                     # same state dir: journal replay
    _after(hosts, a, b, victim, mid, time.monotonic())
    assert "journal" in a.log_tail(60)
