"""ConvergencePolicy driven with synthetic round figures (no I/O, no clock)."""

import pytest

from migrated.engine.policy import (STOP_AND_COPY, STOP_DOWNTIME, STOP_MAX_ROUNDS,
                                    STOP_PLATEAU, STOP_TIMEOUT, TIMEOUT_MESSAGE,
                                    ConvergencePolicy)
from migrated.runs import PAGE_SIZE

MIB = 1024 * 1024
PAGES_PER_MIB = MIB // PAGE_SIZE


def make(**kw):
    kw.setdefault("clock", lambda: 0.0)
    p = ConvergencePolicy(**kw)
    assert p.begin(now=0.0).stop is False
    return p


def test_converging_writer_stops_at_downtime_target():
    # 100 MiB/s link; the dirty set shrinks 64 -> 16 -> 8 -> 6 MiB.
    p = make(downtime_ms=50, max_rounds=30)
    p.round_sent(256 * MIB, 2.56)
    d = p.after_collect(64 * PAGES_PER_MIB, now=2.6)
    assert not d.stop and d.expected_downtime_ms == pytest.approx(640, rel=1e-6)
    p.round_sent(64 * MIB, 0.64)
    assert not p.after_collect(16 * PAGES_PER_MIB, now=3.3).stop
    p.round_sent(16 * MIB, 0.16)
    assert not p.after_collect(8 * PAGES_PER_MIB, now=3.5).stop     # 80 ms > 50
    p.round_sent(8 * MIB, 0.08)
    d = p.after_collect(4.5 * PAGES_PER_MIB, now=3.6)                # 45 ms <= 50, not halved
    assert d.stop and d.reason == STOP_DOWNTIME and p.stop_reason == STOP_DOWNTIME
    assert d.expected_downtime_ms == pytest.approx(45, rel=1e-6)


def test_under_target_keeps_going_while_the_set_halves():
    # 100 MiB/s; under the 300 ms target from the first collection, but a
    # steady writer's set keeps halving: take those rounds, then stop at
    # its steady state (no longer halving) -- a freeze far below the target.
    p = make(downtime_ms=300, max_rounds=30)
    p.round_sent(256 * MIB, 2.56)
    sizes_mib = [20, 6, 2, 1.5]
    decisions = []
    for size in sizes_mib:
        d = p.after_collect(int(size * PAGES_PER_MIB))
        decisions.append(d)
        if d.stop:
            break
        p.round_sent(size * MIB, size / 100)
    assert [d.stop for d in decisions] == [False, False, False, True]
    assert decisions[-1].reason == STOP_DOWNTIME
    assert decisions[-1].expected_downtime_ms == pytest.approx(15, rel=1e-6)


def test_under_target_extra_rounds_respect_the_cap():
    p = make(downtime_ms=300, max_rounds=2)
    p.round_sent(256 * MIB, 2.56)
    assert not p.after_collect(20 * PAGES_PER_MIB).stop          # halving may continue
    p.round_sent(20 * MIB, 0.2)
    d = p.after_collect(5 * PAGES_PER_MIB)                       # halved, but cap reached
    assert d.stop and d.reason == STOP_DOWNTIME


def test_nothing_left_stops_at_once():
    p = make(downtime_ms=300)
    p.round_sent(256 * MIB, 2.56)
    assert not p.after_collect(20 * PAGES_PER_MIB).stop
    p.round_sent(20 * MIB, 0.2)
    d = p.after_collect(0)
    assert d.stop and d.reason == STOP_DOWNTIME


def test_fixed_cost_counts_against_the_target():
    # 100 MiB/s; after round 0 (100 MiB) 60 MiB are pending: not halved, so
    # the target alone decides: 600 ms fits 700, but 600 + a 150 ms fixed
    # cost (the frozen collection) does not.
    p = make(downtime_ms=700)
    p.round_sent(100 * MIB, 1.0)
    assert p.after_collect(60 * PAGES_PER_MIB, fixed_ms=0).stop
    p = make(downtime_ms=700)
    p.round_sent(100 * MIB, 1.0)
    d = p.after_collect(60 * PAGES_PER_MIB, fixed_ms=150)
    assert not d.stop and d.expected_downtime_ms == pytest.approx(750)


def test_bandwidth_is_a_byte_weighted_moving_window():
    p = make()
    p.round_sent(100 * MIB, 1.0)          # 100 MiB/s
    p.round_sent(1 * PAGE_SIZE, 0.5)      # a latency-bound tiny round barely counts
    assert p.bandwidth == pytest.approx((100 * MIB + PAGE_SIZE) / 1.5)
    for _ in range(3):                    # the window forgets old rounds
        p.round_sent(10 * MIB, 1.0)
    assert p.bandwidth == pytest.approx(10 * MIB)


def test_a_round_is_stretched_to_when_it_reached_the_destination():
    p = make()
    p.round_sent(10 * MIB, 1.0)
    p.round_sent(1 * MIB, 0.001)          # sent into the kernel's buffers ...
    p.round_drained(1.0)                  # ... delivered a second later
    assert p.bandwidth == pytest.approx(11 * MIB / 2.0)
    p.round_drained(0.5)                  # never shortened
    assert p.bandwidth == pytest.approx(11 * MIB / 2.0)


def test_hot_writer_stops_at_plateau():
    # Link 10 MiB/s, writer dirties a steady 20 MiB per round: never fits.
    p = make(downtime_ms=300, max_rounds=30, plateau_rounds=3, timeout_s=1e6)
    p.round_sent(64 * MIB, 6.4)
    decisions = []
    for r in range(10):
        d = p.after_collect(20 * PAGES_PER_MIB - r, now=10 + r)  # noise, no real shrink
        decisions.append(d)
        if d.stop:
            break
        p.round_sent(20 * MIB, 2.0)
    assert decisions[-1].stop and decisions[-1].reason == STOP_PLATEAU
    # first collection sets the best; three stale ones follow
    assert len(decisions) == 4


def test_real_shrinking_resets_plateau():
    p = make(downtime_ms=1, plateau_rounds=2, timeout_s=1e6)
    p.round_sent(MIB, 1.0)
    sizes = [1000, 990, 800, 795, 600, 590, 585]
    reasons = []
    for s in sizes:
        d = p.after_collect(s)
        reasons.append(d.reason)
        if d.stop:
            break
        p.round_sent(s * PAGE_SIZE, 1.0)
    assert reasons[-1] == STOP_PLATEAU and len(reasons) == 7


def test_max_rounds_cap():
    p = make(downtime_ms=0, max_rounds=2, plateau_rounds=100)
    p.round_sent(MIB, 1.0)
    assert not p.after_collect(1000).stop
    p.round_sent(MIB, 1.0)
    d = p.after_collect(500)
    assert d.stop and d.reason == STOP_MAX_ROUNDS


def test_max_rounds_zero_is_stop_and_copy():
    p = ConvergencePolicy(max_rounds=0, clock=lambda: 0.0)
    d = p.begin()
    assert d.stop and d.reason == STOP_AND_COPY and p.stop_reason == STOP_AND_COPY


def test_max_rounds_one_copies_once_live():
    p = make(downtime_ms=0, max_rounds=1)
    p.round_sent(MIB, 0.1)
    d = p.after_collect(10)
    assert d.stop and d.reason == STOP_MAX_ROUNDS


def test_timeout_stops_when_final_delta_fits():
    # 100 MiB/s, pending 20 MiB (200 ms > target 100 ms); rounds take 2 s;
    # 1.5 s of budget left: another round does not fit, the final delta does.
    p = make(downtime_ms=100, timeout_s=10.0, plateau_rounds=100)
    p.round_sent(200 * MIB, 2.0, round_seconds=2.0)
    d = p.after_collect(20 * PAGES_PER_MIB, now=8.5)
    assert d.stop and d.reason == STOP_TIMEOUT and d.fail is None


def test_timeout_fails_cleanly_when_final_delta_does_not_fit():
    p = make(downtime_ms=100, timeout_s=10.0, plateau_rounds=100)
    p.round_sent(200 * MIB, 2.0, round_seconds=2.0)
    d = p.after_collect(200 * PAGES_PER_MIB, now=8.5)   # 2 s final delta, 1.5 s left
    assert not d.stop and d.fail == TIMEOUT_MESSAGE and d.reason == STOP_TIMEOUT


def test_timeout_far_away_does_not_interfere():
    p = make(downtime_ms=100, timeout_s=600.0, plateau_rounds=100)
    p.round_sent(200 * MIB, 2.0, round_seconds=2.0)
    d = p.after_collect(20 * PAGES_PER_MIB, now=8.5)
    assert not d.stop and d.fail is None


def test_expired():
    p = make(timeout_s=5.0)
    assert not p.expired(now=4.9)
    assert p.expired(now=5.0)


def test_idle_target_stops_after_round_zero():
    p = make()
    p.round_sent(64 * MIB, 0.1)
    d = p.after_collect(0)
    assert d.stop and d.reason == STOP_DOWNTIME and d.expected_downtime_ms == 0


@pytest.mark.parametrize("kw", [dict(max_rounds=-1), dict(plateau_rounds=0), dict(timeout_s=0)])
def test_invalid_settings_rejected(kw):
    with pytest.raises(ValueError):
        ConvergencePolicy(**kw)


def test_fixed_cost_floor_stops_early():
    # The frozen collection alone costs 400 ms > 300 ms target; 2 MiB of
    # transfer (20 ms) is under 10 % of it: more rounds cannot help.
    p = make(downtime_ms=300, plateau_rounds=5)
    p.round_sent(100 * MIB, 1.0)
    d = p.after_collect(60 * PAGES_PER_MIB, fixed_ms=400)          # transfer 600 ms: go on
    assert not d.stop
    p.round_sent(60 * MIB, 0.6)
    d = p.after_collect(2 * PAGES_PER_MIB, fixed_ms=400)
    assert d.stop and d.reason == STOP_PLATEAU


def test_the_destinations_flush_counts_in_the_expected_downtime():
    # 100 MiB/s; 2 MiB pending = 20 ms of transfer, far under 300 ms -- but
    # a destination that still has 400 ms of writeback to do would carry it
    # into the freeze: not yet.  Once it reports the disk caught up, stop.
    p = make(downtime_ms=300, max_rounds=30)
    p.round_sent(256 * MIB, 2.56)
    d = p.after_collect(2 * PAGES_PER_MIB, now=2.6, dest_ms=400.0)
    assert not d.stop and d.expected_downtime_ms == pytest.approx(420, rel=1e-6)
    p.round_sent(2 * MIB, 0.02)
    d = p.after_collect(2 * PAGES_PER_MIB, now=3.1, dest_ms=30.0)
    assert d.stop and d.reason == STOP_DOWNTIME
    assert d.expected_downtime_ms == pytest.approx(50, rel=1e-6)


def test_the_destinations_flush_is_not_a_fixed_cost_floor():
    # The floor rule (transfer small next to the fixed cost: stop) looks
    # at the transfer alone: a big flush estimate must not trigger it.
    # Here the fixed cost alone is at the target and the transfer is 10 ms:
    # without the flush that is the floor; with 500 ms of flush to wait
    # out, another round (after the wait) can still help.
    p = make(downtime_ms=100, max_rounds=30)
    p.round_sent(100 * MIB, 1.0)
    d = p.after_collect(1 * PAGES_PER_MIB, fixed_ms=100.0, now=1.1)
    assert d.stop and d.reason == STOP_PLATEAU
    p = make(downtime_ms=100, max_rounds=30)
    p.round_sent(100 * MIB, 1.0)
    d = p.after_collect(1 * PAGES_PER_MIB, fixed_ms=100.0, now=1.1, dest_ms=500.0)
    assert not d.stop and d.reason is None
